"""Exact scorers: the fast batched, prefix-cached path equals one-head-at-a-time full forwards, agrees
with TransformerLens' activation patching, and with the nnsight backend."""

from __future__ import annotations

import pytest
import torch

from conftest import prefix_probe, random_probe, tiny_gpt2_sharp, tiny_llama, tiny_qwen3
from headscope import HeadscopeError, load_model
from headscope.patching import activation_scores, activation_scores_by_position, direct_scores, score
from headscope.patching.reference import reference_scores, reference_scores_by_position

# GPT-2 with the sharper init: the default one's logit-difference gap (~4e-3) makes normalised scores
# magnify float32 round-off past 1e-5.
MODELS = {"qwen3": tiny_qwen3, "gpt2": tiny_gpt2_sharp, "llama": tiny_llama}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", ["activation", "direct"])
def test_fast_equals_one_head_at_a_time(family, method):
    lm = load_model(MODELS[family]())
    probe = random_probe(n_pairs=3, length=10, seed=1)
    fast = score(lm, probe, method, batch_size=5, progress=False).values  # odd batch: heads split across batches
    slow = reference_scores(lm, probe, method=method)
    assert fast.abs().max() > 0.05, "random model should react to the patched tokens"
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_noising_equals_reference():
    lm = load_model(tiny_qwen3())
    probe = random_probe(seed=2)
    fast = activation_scores(lm, probe, noising=True, progress=False).values
    torch.testing.assert_close(fast, reference_scores(lm, probe, noising=True), atol=1e-5, rtol=0)


def test_by_position_equals_reference():
    lm = load_model(tiny_qwen3(n_layers=2))
    probe = random_probe(n_pairs=2, length=6, seed=3)
    fast = activation_scores_by_position(lm, probe, batch_size=7, progress=False)
    assert fast.shape == (2, 4, 6)
    torch.testing.assert_close(fast, reference_scores_by_position(lm, probe), atol=1e-5, rtol=0)


def test_direct_differs_from_total_effect_and_last_layer_agrees():
    lm = load_model(tiny_qwen3())
    probe = random_probe(seed=4)
    total = activation_scores(lm, probe, progress=False).values
    direct = direct_scores(lm, probe, progress=False).values
    torch.testing.assert_close(total[-1], direct[-1], atol=1e-5, rtol=0)  # nothing downstream to freeze
    assert (total[0] - direct[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_agrees_with_transformer_lens(family, qwen3_dir, gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    path = {"qwen3": qwen3_dir, "gpt2": gpt2_dir}[family]
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    lm = load_model(path, attn_implementation="eager")  # the bridge forces eager attention
    probe = prefix_probe()  # first differences at position 0, at the last token only, and in between
    t = probe.tensors()
    rows = torch.arange(len(probe))

    def ld(logits):
        return (logits[rows, -1, t["answer"]] - logits[rows, -1, t["wrong"]]).mean()

    with torch.no_grad():
        clean_logits, clean_cache = bridge.run_with_cache(t["clean"])
        ld_clean, ld_corrupt = ld(clean_logits), ld(bridge(t["corrupt"]))

    def metric(logits):
        return (ld(logits) - ld_corrupt) / (ld_clean - ld_corrupt)

    with torch.no_grad():
        expected = get_act_patch_attn_head_out_all_pos(bridge, t["corrupt"], clean_cache, metric)
    ours = activation_scores(lm, probe, progress=False).values
    assert expected.shape == ours.shape
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree(qwen3_dir):
    probe = random_probe(seed=6)
    sdpa = activation_scores(load_model(qwen3_dir, attn_implementation="sdpa"), probe, progress=False)
    eager = activation_scores(load_model(qwen3_dir, attn_implementation="eager"), probe, progress=False)
    assert sdpa.meta["attn_implementation"] == "sdpa" and eager.meta["attn_implementation"] == "eager"
    torch.testing.assert_close(sdpa.values, eager.values, atol=1e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:LanguageModel is deprecated")
def test_nnsight_backend_agrees(qwen3_dir):
    from nnsight import LanguageModel

    from headscope.patching.nnsight_backend import nnsight_activation_scores

    lm = load_model(qwen3_dir)
    probe = random_probe(seed=7)
    native = activation_scores(lm, probe, progress=False).values
    via_nnsight = nnsight_activation_scores(LanguageModel(lm.model, tokenizer=lm.tokenizer), probe, progress=False).values
    torch.testing.assert_close(via_nnsight, native, atol=1e-5, rtol=1e-4)


def test_deterministic():
    lm = load_model(tiny_qwen3())
    probe = random_probe(seed=8)
    first = activation_scores(lm, probe, progress=False).values
    second = activation_scores(lm, probe, batch_size=3, progress=False).values
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)


def test_errors_name_the_problem():
    lm = load_model(tiny_qwen3())
    same = random_probe(n_changed=0)
    with pytest.raises(HeadscopeError, match="same on clean and corrupt"):
        activation_scores(lm, same, progress=False)
    with pytest.raises(HeadscopeError, match="context is 256"):
        activation_scores(lm, random_probe(length=300), progress=False)
    with pytest.raises(HeadscopeError, match="unknown scoring method 'bogus'"):
        score(lm, random_probe(), "bogus")
