"""HybridForCausalLM as a Hugging Face model: save/load, hybrid cache decoding, generate, padding, CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from conftest import save_model, tiny_llama, tiny_qwen3
from headscope.cli import main
from headscope.heads import HeadMask
from headscope.hybrid import HybridConfig, HybridForCausalLM, build_hybrid
from headscope.hybrid.functional import log_position_scale
from headscope.hybrid.modeling import CACHE_FIELD
from headscope.mask import save_mask
from headscope.models import load_model


@pytest.fixture(scope="module")
def hybrid() -> HybridForCausalLM:
    """Layers: 0 hybrid (1 FA head), 1 plain full attention, 2 pure GDN; log scaling active from pos 3."""
    lm = load_model(tiny_qwen3(seed=7).float())
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[0, 2] = True
    full[1] = True
    return build_hybrid(lm, HeadMask(full, lm.fingerprint), HybridConfig(floor_scale=4))


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cache_layout_follows_the_heads(hybrid):
    assert hybrid.config.layer_types == ["hybrid", "full_attention", "linear_attention"]
    cache = DynamicCache(config=hybrid.config)
    with torch.no_grad():
        hybrid(ids_of(2, 6), cache=cache, use_cache=True)
    d = hybrid.config.head_dim
    assert cache.layers[0].keys.shape == (2, 1, 6, d)  # one FA KV head
    assert cache.layers[0].recurrent_states[0].shape == (2, 3, d, d) and cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert cache.layers[0].conv_states[0].shape == (2, 3 * 3 * d, 4)
    assert cache.layers[1].keys.shape == (2, 2, 6, d)
    assert not hasattr(cache.layers[2], "keys") and cache.layers[2].recurrent_states[0].shape == (2, 4, d, d)


def test_prefill_then_decode_equals_full_forward(hybrid):
    ids = ids_of(2, 17)
    with torch.no_grad():
        full = hybrid(ids).logits
        out = hybrid(ids[:, :7], use_cache=True)
        pieces = [out.logits]
        for t in range(7, 12):  # token by token
            out = hybrid(ids[:, t : t + 1], cache=getattr(out, CACHE_FIELD), use_cache=True)
            pieces.append(out.logits)
        out = hybrid(ids[:, 12:], past_key_values=getattr(out, CACHE_FIELD), use_cache=True)  # the pre-5.24 keyword
        pieces.append(out.logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-4


def test_query_scale_is_one_float_while_every_position_is_below_the_floor(hybrid):
    """floor_scale 4: the scale is exactly 1 up to position 2; the model passes 1.0 (no multiply) when the
    positions it made stay there, the tensor otherwise, and the logits do not change."""
    model, a = hybrid.model, float(hybrid.config.attn_scale)
    three, four = torch.arange(3)[None], torch.arange(4)[None]
    assert model._query_scale(three, 2, torch.float32) == 1.0
    scale = model._query_scale(four, 3, torch.float32)  # position 3: floor(4 / 4) = 1
    assert isinstance(scale, torch.Tensor) and torch.equal(scale, log_position_scale(four, a, 4.0)) and scale[0, 3] > 1
    assert isinstance(model._query_scale(three, None, torch.float32), torch.Tensor)  # positions passed in: no bound
    ids = ids_of(2, 3, seed=3)
    with torch.no_grad():
        made_here, passed = hybrid(ids).logits, hybrid(ids, position_ids=three.expand(2, 3)).logits
        mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # positions from the mask: bounded by its length - 1
        padded = hybrid(ids, attention_mask=mask).logits
        padded_passed = hybrid(ids, attention_mask=mask, position_ids=torch.tensor([[0, 1, 2], [0, 0, 1]])).logits
    assert torch.equal(made_here, passed) and torch.equal(padded, padded_passed)


def test_greedy_generate_equals_argmax_of_full_forward(hybrid):
    prompt = ids_of(2, 5, seed=1)
    generated = hybrid.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, hybrid(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq)


def test_left_padding_is_exact(hybrid):
    long, short = ids_of(1, 8, seed=2), ids_of(1, 5, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = hybrid(batch, attention_mask=mask).logits[1, 3:]
        alone = hybrid(short).logits[0]
    assert (padded - alone).abs().max().item() < 1e-4
    together = hybrid.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(together[1, 3:], hybrid.generate(short, max_new_tokens=4, do_sample=False)[0])


def test_save_load_roundtrip_through_auto_classes(hybrid, tmp_path):
    hybrid.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, HybridConfig) and config.head_order == hybrid.config.head_order
    assert config.full_attention_heads == hybrid.config.full_attention_heads and config.floor_scale == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, HybridForCausalLM)
    ids = ids_of(2, 10, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hybrid(ids).logits)


def test_loss_and_backward_through_the_whole_model():
    lm = load_model(tiny_llama(seed=1))
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[:, 0] = True
    model = build_hybrid(lm, HeadMask(full, lm.fingerprint)).train()
    ids = ids_of(2, 12, seed=5)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    attn = model.model.layers[0].self_attn
    for param in (attn.A_log, attn.gamma, attn.gate_proj.weight, attn.q_proj.weight, model.model.embed_tokens.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_cli_build_from_mask_file_and_baselines(tmp_path, capsys):
    model_dir = save_model(tiny_qwen3(seed=8), tmp_path / "model")
    lm = load_model(model_dir)
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[1, 1] = True
    mask_path = save_mask(HeadMask(full, lm.fingerprint, {"ratio": None}), tmp_path / "mask.json")
    assert main(["build", "--model", model_dir, "--mask", str(mask_path), "--out", str(tmp_path / "hybrid")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid")
    assert reloaded.config.full_attention_heads == [[1, 1]]
    assert (tmp_path / "hybrid" / "tokenizer.json").is_file()
    assert main(["build", "--model", model_dir, "--layerwise", "2:1", "--out", str(tmp_path / "lw")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "lw").layer_types == ["linear_attention", "linear_attention", "full_attention"]
    assert main(["build", "--model", model_dir, "--random", "3:1", "--seed", "2", "--out", str(tmp_path / "rnd")]) == 0
    foreign_dir = save_model(tiny_llama(), tmp_path / "llama")
    capsys.readouterr()
    assert main(["build", "--model", foreign_dir, "--mask", str(mask_path), "--out", str(tmp_path / "bad")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("headscope: error:")]
    assert len(errors) == 1 and "made for another model" in errors[0] and "architecture is qwen3 in the file but llama" in errors[0]


def test_a_build_keeps_the_generation_config_and_a_saved_config_keeps_its_edits(tmp_path):
    """The original's generation config (stop tokens, sampling defaults) comes along; fields changed on the hybrid's
    config after the build (a resized vocabulary, stop tokens, the norm's eps) survive save and load."""
    base = tiny_qwen3(seed=8)
    base.generation_config.eos_token_id, base.generation_config.do_sample, base.generation_config.temperature = [1, 5], True, 0.3
    lm = load_model(base)
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[1, 1] = True
    hybrid = build_hybrid(lm, HeadMask(full, lm.fingerprint))
    assert hybrid.generation_config.eos_token_id == [1, 5] and hybrid.generation_config.temperature == 0.3
    hybrid.resize_token_embeddings(hybrid.config.vocab_size + 3)
    hybrid.config.eos_token_id, hybrid.config.max_position_embeddings = [1, 5], 512
    hybrid.save_pretrained(tmp_path / "edited")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    for name in ("vocab_size", "eos_token_id", "max_position_embeddings"):
        assert getattr(again.config, name) == getattr(hybrid.config, name), name
    assert again.model.embed_tokens.weight.shape[0] == again.lm_head.weight.shape[0] == hybrid.config.vocab_size
    ids = ids_of(2, 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hybrid(ids).logits)
    assert again.generation_config.eos_token_id == [1, 5]
    hybrid.config.rms_norm_eps = 1e-5  # (the built norms keep theirs; a model loaded from this config takes it)
    hybrid.config.save_pretrained(tmp_path / "eps")
    assert AutoConfig.from_pretrained(tmp_path / "eps").rms_norm_eps == 1e-5


def test_the_cache_goes_under_one_name(hybrid):
    with pytest.raises(ValueError, match="not both"):
        hybrid(ids_of(1, 3), cache=DynamicCache(config=hybrid.config), past_key_values=DynamicCache(config=hybrid.config))
