"""Shared-prefix reuse: every scorer that replays patched runs from the positions after a pair's shared
prefix gives the scores of the full-length path (prefix reuse off) and of the one-head-at-a-time full
forwards, on pairs whose first difference is at position 0, only at the last token, and in between; on
GQA (Qwen3, Llama), MHA (GPT-2) and a sliding window (Mistral), sdpa and eager. Plus the batching it relies on: batches start at
their rows' smallest shared prefix, are packed by row cost, and halve on CUDA out-of-memory."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, prefix_probe, tiny_gpt2_sharp, tiny_llama, tiny_qwen3

import headscope.patching.common as common
from headscope import load_model
from headscope.patching import activation_scores_by_position, attribution_scores, path_scores, score
from headscope.patching.batching import AdaptiveBatcher, row_cost
from headscope.patching.common import prepare
from headscope.patching.path import parse_receivers
from headscope.patching.prefix import CACHE_SLOT, cache_kwarg, shared_prefix
from headscope.patching.reference import path_reference, reference_scores, reference_scores_by_position

def tiny_mistral_sliding(seed: int = 0):
    """Mistral with a 4-token sliding window: suffix masks are not plain causal ones."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=4)
    return MistralForCausalLM(config).eval()


FAMILIES = {"qwen3": tiny_qwen3, "llama": tiny_llama, "gpt2": tiny_gpt2_sharp, "mistral_sliding": tiny_mistral_sliding}
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {name: load_model(make()) for name, make in FAMILIES.items()}


def with_and_without_prefix(monkeypatch, fn):
    """``fn()`` with prefix reuse, then with it off (every pair shares nothing: the full-length path)."""
    reused = fn()
    with monkeypatch.context() as patch:
        patch.setattr(common, "shared_prefix", lambda clean, corrupt: torch.zeros(len(clean), dtype=torch.long))
        current = fn()
    return reused, current


def test_shared_prefix_is_the_first_difference():
    t = prefix_probe(length=12).tensors()
    assert shared_prefix(t["clean"], t["corrupt"]).tolist() == [0, 11, 4, 8]
    assert shared_prefix(t["clean"], t["clean"]).tolist() == [11] * 4  # identical: the last position is still run


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["activation", "direct"])
def test_equals_current_path_and_full_forwards(models, monkeypatch, family, attn, method):
    lm = models[family]
    lm.set_attn_implementation(attn)
    probe = prefix_probe()
    reused, current = with_and_without_prefix(monkeypatch, lambda: score(lm, probe, method, batch_size=5, progress=False).values)
    assert reused.abs().max() > 0.05, "random model should react to the patched tokens"
    torch.testing.assert_close(reused, current, **TOLERANCE)
    torch.testing.assert_close(reused, reference_scores(lm, probe, method=method), **TOLERANCE)


def test_noising_and_by_position(models, monkeypatch):
    lm = models["qwen3"]
    lm.set_attn_implementation("sdpa")
    probe = prefix_probe()
    reused, current = with_and_without_prefix(monkeypatch, lambda: score(lm, probe, "activation", noising=True, progress=False).values)
    torch.testing.assert_close(reused, current, **TOLERANCE)
    short = prefix_probe(length=6, seed=1)
    reused, current = with_and_without_prefix(monkeypatch, lambda: activation_scores_by_position(lm, short, batch_size=7, progress=False))
    assert reused.shape == (3, 4, 6) and reused.abs().max() > 0.05
    torch.testing.assert_close(reused, current, **TOLERANCE)
    torch.testing.assert_close(reused, reference_scores_by_position(lm, short), **TOLERANCE)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
@pytest.mark.parametrize("receivers", ["2.1:k,1.2:v", "1.0:k,1.1:q,2.3"])
def test_path_equals_current_path_and_full_forwards(models, monkeypatch, family, receivers):
    lm = models[family]
    lm.set_attn_implementation("sdpa")
    probe, parsed = prefix_probe(), parse_receivers(receivers)
    reused, current = with_and_without_prefix(monkeypatch, lambda: path_scores(lm, probe, receivers=parsed, batch_size=3, progress=False).values)
    assert reused[:2].abs().max() > 0.02
    torch.testing.assert_close(reused, current, **TOLERANCE)
    torch.testing.assert_close(reused, path_reference(lm, probe, parsed), **TOLERANCE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attribution_and_screen_equal_current_path(models, monkeypatch, attn):
    lm = models["qwen3"]
    lm.set_attn_implementation(attn)
    probe = prefix_probe()
    reused, current = with_and_without_prefix(monkeypatch, lambda: attribution_scores(lm, probe, batch_size=2, progress=False).values)
    assert reused.abs().max() > 0.05
    torch.testing.assert_close(reused, current, **TOLERANCE)
    reused, current = with_and_without_prefix(monkeypatch, lambda: score(lm, probe, "screen", top_k=5, batch_size=3, progress=False).values)
    torch.testing.assert_close(reused, current, **TOLERANCE)


def test_prefix_cache_is_the_models_own(models):
    """The kept keys/values are the model's cache of the shared positions (after k-norm and RoPE, KV
    heads), and suffix replays get a lower-right causal sdpa mask and the cache slot."""
    from transformers import DynamicCache

    lm = models["qwen3"]
    lm.set_attn_implementation("sdpa")
    probe = prefix_probe()
    run = prepare(lm, probe)
    fp = lm.fingerprint
    assert run.engine.shared.tolist() == [0, 11, 4, 8]
    cache = DynamicCache()
    with torch.no_grad():
        lm.model(run.ids["corrupt"], **{cache_kwarg(lm.model): cache}, use_cache=True)
    for layer, (keys, values) in enumerate(run.engine.prefix_kv):
        assert keys.shape == values.shape == (4, fp.n_kv_heads, 11, fp.head_dim)
        for pair, shared in enumerate(run.engine.shared.tolist()):
            torch.testing.assert_close(keys[pair, :, :shared], cache.layers[layer].keys[pair, :, :shared], atol=1e-6, rtol=0)
            torch.testing.assert_close(values[pair, :, :shared], cache.layers[layer].values[pair, :, :shared], atol=1e-6, rtol=0)
    call = run.engine.layer_calls(4)[0]
    arguments = list(call.args) + list(call.kwargs.values())
    assert any(value is CACHE_SLOT for value in arguments)
    assert any(type(value).__name__ == "CausalBias" for value in arguments)
    lm.set_attn_implementation("eager")
    eager = prepare(lm, probe).engine.layer_calls(4)[0]
    assert not any(type(value).__name__ == "CausalBias" for value in list(eager.args) + list(eager.kwargs.values()))


def test_batches_start_at_their_smallest_prefix_and_pack_by_cost(models):
    lm = models["qwen3"]
    run = prepare(lm, prefix_probe())
    pair_of = torch.arange(4).repeat(4)  # 16 items, 4 per pair
    seen = []

    def fn(items, start):
        seen.append((items.tolist(), start))
        assert start == int(run.engine.shared[pair_of[items]].min())
        return items.float()

    out = run.engine.run_items(AdaptiveBatcher(4), pair_of, fn)
    torch.testing.assert_close(out, torch.arange(16).float())  # results back in item order
    starts = [start for _, start in seen]
    assert starts == sorted(starts) and starts[0] == 0
    assert [len(items) for items, _ in seen] == [4, 5, 7]  # shorter suffixes, wider batches than 4 full rows
    for items, start in seen:
        assert len(items) <= max(1, int(4 / row_cost(lm, 12, start) + 1e-9))


def test_cuda_oom_halves_the_batch_and_scores_stay(models, monkeypatch):
    """An out-of-memory error in a patched batch (injected: layer 1 refuses more than 3 rows) halves the
    batch and retries; the recording forwards shrink the same way; scores are unchanged."""
    lm = models["qwen3"]
    lm.set_attn_implementation("sdpa")
    probe = prefix_probe()
    expected = score(lm, probe, "activation", batch_size=16, progress=False).values
    layer = lm.layers[1]
    forward, rows_seen, refused = layer.forward, [], []

    def tight_forward(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        if hidden.shape[0] > 3:
            refused.append(hidden.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(hidden, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", tight_forward)
    got = score(lm, probe, "activation", batch_size=16, progress=False).values
    assert refused and max(rows_seen) > 3
    torch.testing.assert_close(got, expected, **TOLERANCE)
    batcher = AdaptiveBatcher(8)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batcher.run(3, lambda rows: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("injected")))
    assert batcher.batch_size < 2
