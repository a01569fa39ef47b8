"""build_hybrid: parity with the pretrained model, weight migration, layer kinds, refusal of foreign masks."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from conftest import OFF_BY_ONE, plant_off_by_one, tiny_gpt2, tiny_llama, tiny_qwen3
from headscope.heads import HeadMask, HeadscopeError, ModelFingerprint
from headscope.hybrid import HybridConfig, build_hybrid
from headscope.mask import layerwise_mask, random_mask
from headscope.models import load_model

PARITY = dict(fa_rope=True, log_scaling=False, output_gate=False, fusion_norm=False)


def tied_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(5)
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def small(config_class, model_class, **extra):
    def make():
        torch.manual_seed(6)
        config = config_class(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **extra)
        return model_class(config).eval()
    return make


FAMILIES = {
    "qwen3-gqa": tiny_qwen3,
    "qwen3-tied": tied_qwen3,
    "llama": tiny_llama,
    "qwen2-bias": small(Qwen2Config, Qwen2ForCausalLM),
    "mistral-window5": small(MistralConfig, MistralForCausalLM, sliding_window=5),  # 21 tokens > window
}


@pytest.mark.parametrize("make", list(FAMILIES.values()), ids=list(FAMILIES))
@pytest.mark.parametrize("plain", [False, True], ids=["hybrid-path", "plain-layers"])
def test_all_full_mask_reproduces_the_model(make, plain):
    model = make().float()
    lm = load_model(model)
    mask = HeadMask(torch.ones(lm.fingerprint.shape, dtype=torch.bool), lm.fingerprint)
    hybrid = build_hybrid(model, mask, HybridConfig(plain_full_layers=plain, **PARITY))
    kinds = {hybrid.config.layer_plan(l).kind for l in range(lm.fingerprint.n_layers)}
    assert kinds == {"full" if plain else "hybrid"}
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hybrid(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.fixture(scope="module")
def qwen3():
    return load_model(tiny_qwen3(seed=2).float())


def test_migration_permutes_rows_and_keeps_the_rest(qwen3):
    fp, d = qwen3.fingerprint, qwen3.fingerprint.head_dim
    full = torch.zeros(fp.shape, dtype=torch.bool)
    full[0, [1, 3]] = True  # one FA head in each KV group of layer 0
    hybrid = build_hybrid(qwen3, HeadMask(full, fp))
    order = hybrid.config.head_order[0]
    assert order == [1, 3, 0, 2]
    attn, new = qwen3.attention(0), hybrid.model.layers[0].self_attn
    for p, head in enumerate(order):
        torch.testing.assert_close(new.q_proj.weight[p * d : (p + 1) * d], attn.q_proj.weight[head * d : (head + 1) * d], rtol=0, atol=0)
        torch.testing.assert_close(new.o_proj.weight[:, p * d : (p + 1) * d], attn.o_proj.weight[:, head * d : (head + 1) * d], rtol=0, atol=0)
    kv_groups = [0, 1, 0, 1]  # FA KV heads = groups 0, 1; GDN heads 0 and 2 repeat groups 0 and 1
    for row, group in enumerate(kv_groups):
        for name in ("k_proj", "v_proj"):
            torch.testing.assert_close(getattr(new, name).weight[row * d : (row + 1) * d], getattr(attn, name).weight[group * d : (group + 1) * d], rtol=0, atol=0)
    hybrid_params = dict(hybrid.named_parameters())
    for name, param in qwen3.model.named_parameters():
        if ".self_attn." not in name:
            torch.testing.assert_close(hybrid_params[name], param, rtol=0, atol=0)
    assert torch.all(new.gate_proj.weight == 0) and torch.allclose(torch.sigmoid(new.gate_proj.bias), torch.tensor(0.982), atol=1e-3)
    assert torch.all(new.conv1d.weight[..., -1] == 1) and torch.all(new.conv1d.weight[..., :-1] == 0)
    assert torch.all(new.gamma == 1)


def test_new_parameters_follow_the_seed(qwen3):
    mask = random_mask(qwen3.fingerprint, ratio="3:1", seed=1)
    a = build_hybrid(qwen3, mask, HybridConfig(init_seed=4))
    b = build_hybrid(qwen3, mask, HybridConfig(init_seed=4))
    c = build_hybrid(qwen3, mask, HybridConfig(init_seed=5))
    layer = next(l for l in range(3) if a.config.layer_plan(l).kind != "full")
    pa, pb, pc = (m.model.layers[layer].self_attn.A_log for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_every_tensor_of_a_build_is_loaded_none_left_uninitialised(qwen3, monkeypatch):
    """build_hybrid allocates without initialising (meta, then to_empty): two builds must agree tensor for tensor,
    the tied unembedding must stay the embedding, and a buffer nobody fills is refused."""
    mask = random_mask(qwen3.fingerprint, ratio="3:1", seed=1)
    a, b = build_hybrid(qwen3, mask), build_hybrid(qwen3, mask)
    tensors_b = dict(b.named_buffers()) | dict(b.named_parameters())
    for name, tensor in list(a.named_buffers()) + list(a.named_parameters()):
        assert torch.equal(tensor, tensors_b[name]), name
    tied = build_hybrid(tied_qwen3(), HeadMask(torch.ones(2, 4, dtype=torch.bool), load_model(tied_qwen3()).fingerprint))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    monkeypatch.setattr("headscope.hybrid.builder.copy_buffers", lambda source, target, share=False: set())
    with pytest.raises(HeadscopeError, match="no pretrained value for the buffers .*rotary_emb.inv_freq"):
        build_hybrid(qwen3, mask)


def test_layerwise_mask_gives_plain_and_pure_gdn_layers(qwen3):
    mask = layerwise_mask(qwen3.fingerprint, "2:1")  # layer 2 full, layers 0-1 linear
    hybrid = build_hybrid(qwen3, mask)
    kinds = [hybrid.config.layer_plan(l).kind for l in range(3)]
    assert kinds == ["linear", "linear", "full"]
    assert hybrid.config.layer_types == ["linear_attention", "linear_attention", "full_attention"]
    plain = hybrid.model.layers[2].self_attn
    assert plain.spec.fa_rope and not (plain.spec.log_scaling or plain.spec.output_gate or plain.spec.fusion_norm)
    assert not hasattr(plain, "conv1d") and not hasattr(plain, "gate_proj")
    linear = hybrid.model.layers[0].self_attn
    assert linear.spec.n_fa_heads == 0 and linear.k_proj.out_features == 4 * qwen3.fingerprint.head_dim
    # the plain layer is the pretrained attention
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9)[None].expand(2, 9)
    cos, sin = hybrid.model.rotary_emb(x, pos)
    with torch.no_grad():
        ours = plain(x, (cos, sin), pos)
        theirs, _ = qwen3.attention(2)(x, (cos, sin), attention_mask=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_mask_for_another_model_is_refused(qwen3):
    other = ModelFingerprint("qwen3", 3, 8, 2, 24, "bigger")
    with pytest.raises(HeadscopeError, match="n_heads is 8 in the file but 4 in the model"):
        build_hybrid(qwen3, HeadMask(torch.zeros(3, 8, dtype=torch.bool), other))


def test_unsupported_family_is_refused():
    gpt2 = tiny_gpt2()
    fp = load_model(gpt2).fingerprint
    with pytest.raises(HeadscopeError, match="gpt2"):
        build_hybrid(gpt2, HeadMask(torch.zeros(fp.shape, dtype=torch.bool), fp))


def test_calibrate_gamma_sets_each_head_to_its_pretrained_rms(qwen3):
    from headscope.hybrid import calibrate_gamma

    fp, d = qwen3.fingerprint, qwen3.fingerprint.head_dim
    full = torch.zeros(fp.shape, dtype=torch.bool)
    full[0, 2] = full[1, [0, 1]] = True
    hybrid = build_hybrid(qwen3, HeadMask(full, fp))
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    rms = calibrate_gamma(hybrid, qwen3, ids)
    assert not qwen3.model.training
    inputs = {}
    handles = [qwen3.out_proj(l).register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0])) for l in range(fp.n_layers)]
    try:
        with torch.no_grad():
            qwen3.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    for l, layer in enumerate(hybrid.model.layers):
        expected = inputs[l].reshape(-1, fp.n_heads, d).pow(2).mean((0, 2)).sqrt()  # (H,) pretrained order
        torch.testing.assert_close(rms[l], expected, rtol=1e-5, atol=0)
        attention, order = layer.self_attn, hybrid.config.head_order[l]
        gate = torch.sigmoid(torch.tensor(4.0))  # FA heads: gamma x initial gate value = pretrained RMS
        scale = torch.tensor([gate if p < attention.spec.n_fa_heads else 1.0 for p in range(fp.n_heads)])
        torch.testing.assert_close(attention.gamma * scale, expected[order], rtol=1e-5, atol=0)


def greedy(model, ids, **kwargs):
    """Greedy tokens and per-step scores ``(steps, B, V)`` of 8 new tokens."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores)


@pytest.mark.parametrize("make", list(FAMILIES.values()), ids=list(FAMILIES))
def test_full_attention_twin_shares_the_weights_and_decodes_as_the_model(make):
    """build_full_attention: the original's own tensors in an all-plain HybridForCausalLM, whose static decode path
    (what the benchmark's original_graph replays as a CUDA graph) gives the eager original's greedy tokens and scores,
    in every family: tied and untied embeddings, GQA, q/k norms, q/k/v biases, a sliding window shorter than the prompt."""
    from headscope.hybrid import build_full_attention

    model = make().float().train()
    twin = build_full_attention(model)
    assert model.training and not twin.training  # the original's mode is left as it was
    model.eval()
    ours, theirs = dict(twin.named_parameters()), dict(model.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[n].data_ptr() == theirs[n].data_ptr() for n in ours)  # nothing copied
    assert {twin.config.layer_plan(l).kind for l in range(model.config.num_hidden_layers)} == {"full"}
    ids = torch.randint(2, 128, (3, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, want_scores = greedy(model, ids)
        for chunk in (None, 8):  # one prefill, and chunks (the static cache filled in three calls)
            got, scores = greedy(twin, ids, decode_mode="static", prefill_chunk_size=chunk)
            assert torch.equal(got, want) and torch.equal(scores.isinf(), want_scores.isinf())  # -inf: eos held back by min_new_tokens
            assert (scores - want_scores).nan_to_num(0.0).abs().max() < 1e-5
    assert all(ours[n].data_ptr() == theirs[n].data_ptr() for n in ours)  # still shared after generate() (which fuses)
    assert twin.model.layers[0].self_attn.inference_weights._fused  # the twin's projections fused, the model following


def test_full_attention_twin_rotates_with_the_models_own_rotary_table():
    """A model cast with .to(bfloat16) holds a bf16 inv_freq; the twin shares it (a fresh float32 table rotated
    differently at long positions: 32K-token rows on a random Qwen3-1.7B failed the benchmark's check by ~3 logits)."""
    from headscope.hybrid import build_full_attention

    model = tiny_qwen3(seed=2).to(torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # the cast's rounding, which the twin must share
    twin = build_full_attention(model)
    assert twin.model.rotary_emb.inv_freq.data_ptr() == model.model.rotary_emb.inv_freq.data_ptr()
    x, positions = torch.zeros(1, 16, dtype=torch.bfloat16), torch.arange(20000, 20016)[None]  # far out: whole radians apart
    assert torch.equal(twin.model.rotary_emb(x, positions)[0], model.model.rotary_emb(x, positions)[0])
    hybrid = build_hybrid(model, HeadMask(torch.rand(load_model(model).fingerprint.shape) < 0.3, load_model(model).fingerprint))
    assert torch.equal(hybrid.model.rotary_emb(x, positions)[0], model.model.rotary_emb(x, positions)[0])  # a copy, same values


@pytest.mark.parametrize("bug", OFF_BY_ONE)
def test_full_attention_twin_check_catches_an_off_by_one(monkeypatch, bug):
    """The comparison above fails when the static decode writes its key one slot early or runs RoPE one position ahead."""
    from headscope.hybrid import build_full_attention

    model = tiny_qwen3(seed=2).float()
    twin = build_full_attention(model)
    plant_off_by_one(monkeypatch, bug)
    ids = torch.randint(2, 128, (3, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, want = greedy(model, ids)
        _, got = greedy(twin, ids, decode_mode="static")
    assert (got[0] - want[0]).abs().max() < 1e-5  # the prefill's logits are right
    assert (got[1:] - want[1:]).abs().max() > 1e-2 and not torch.equal(got.argmax(-1), want.argmax(-1))  # the tokens part too


def test_inert_switches_name_what_a_mask_cannot_feel(qwen3):
    """A layer-wise mask keeps whole pretrained layers (no head-wise FA heads): the FA switches are inert there; a
    head-wise mask feels them all but plain_full_layers (no all-FA layer); attn_scale without log scaling, conv_size
    without GDN heads change nothing."""
    from headscope.hybrid.builder import SWITCHES, inert_switches

    fp = qwen3.fingerprint
    everything = {name: getattr(HybridConfig, name) for name in SWITCHES}
    layerwise = layerwise_mask(fp, "2:1")
    assert inert_switches(layerwise, everything) == ["fa_rope", "log_scaling", "attn_scale", "floor_scale", "output_gate", "gate_bias_init"]
    assert inert_switches(layerwise, {"fa_rope": True, "plain_full_layers": False}) == []  # the all-FA layer is then head-wise
    assert inert_switches(random_mask(fp, ratio="3:1", seed=1), everything) == ["plain_full_layers"]  # no all-FA layer
    assert inert_switches(random_mask(fp, ratio="3:1", seed=1), {"log_scaling": False, "attn_scale": 0.2}) == ["attn_scale"]
    full = HeadMask(torch.ones(fp.shape, dtype=torch.bool), fp)
    assert inert_switches(full, {"conv_size": 2, "init_seed": 3, "fusion_norm": False, "plain_full_layers": True}) == [
        "conv_size", "init_seed", "fusion_norm"]
