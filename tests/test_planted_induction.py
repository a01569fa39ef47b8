"""A planted induction circuit: path patching into an induction head's key input finds the
previous-token head, which attention patterns identify independently of any scorer.

The model (``tests/fixtures/induction_qwen3``, trained by ``tests/fixtures/train_induction.py``) is a
2-layer attention-only Qwen3 (4 query heads, 2 KV heads per layer) trained on random tokens with a
repeated segment. The probe is built here: the clean prompt holds a segment ``s0 .. s7`` and ends with
its first ``k`` tokens, so the next token is ``s_k``. The corrupt prompt swaps ``s_{k-1}`` (the trigger)
and a later ``s_i`` inside the first copy, so the trigger is now followed by ``s_{i+1}``: the answer
flips while the tokens the induction head copies stay where they were. Only *which key matches* changes,
and a key's "previous token" feature comes from layer 0, so the key path carries the effect.
(``headscope.probes``' ``induction`` corrupts the copied token instead, a value-path change, and needs
an English-word tokenizer, so it is not used here.)
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from headscope import Head, load_model
from headscope.patching import activation_scores, attribution_scores, path_scores, rank_correlation, screen_scores
from headscope.patching.path import Receiver
from headscope.patching.reference import path_reference
from headscope.probes.base import Probe, PromptPair

FIXTURE = Path(__file__).parent / "fixtures" / "induction_qwen3"
VOCAB = 64


def swap_induction_probe(n_pairs: int = 8, length: int = 32, segment_length: int = 8, seed: int = 0) -> Probe:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        repeated = rng.randint(2, segment_length - 3)  # the prompt ends with s_0 .. s_{repeated-1}
        trigger = repeated - 1
        swapped = rng.randint(trigger + 2, segment_length - 2)  # not in the repeat, not the answer
        tokens = rng.sample(range(2, VOCAB), VOCAB - 2)
        segment, filler = tokens[:segment_length], tokens[segment_length:]
        start = rng.randint(0, length - repeated - segment_length)
        clean = [rng.choice(filler) for _ in range(length)]
        clean[start : start + segment_length] = segment
        clean[length - repeated :] = segment[:repeated]
        corrupt = list(clean)
        corrupt[start + trigger], corrupt[start + swapped] = segment[swapped], segment[trigger]
        pairs.append(PromptPair(tuple(clean), tuple(corrupt), segment[trigger + 1], segment[swapped + 1]))
    return Probe("induction_swap", "retrieval", pairs, meta={"seed": seed})


@pytest.fixture(scope="module")
def lm():
    return load_model(FIXTURE, attn_implementation="eager")  # eager: attention weights are returned


@pytest.fixture(scope="module")
def pattern_scores(lm):
    """Per head: mean attention to the previous position, and to the token after the current token's
    earlier occurrence, on 64 random 16-token sequences repeated once."""
    half = 16
    ids = torch.randint(2, VOCAB, (64, half), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([ids, ids], dim=1)
    with torch.no_grad():
        attentions = lm.model(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    t = torch.arange(1, 2 * half)
    second = torch.arange(half, 2 * half)
    previous = torch.stack([a[:, :, t, t - 1].mean(dim=(0, 2)) for a in attentions])  # (L, H)
    induction = torch.stack([a[:, :, second, second - half + 1].mean(dim=(0, 2)) for a in attentions])  # (L, H)
    return previous, induction


def test_patterns_show_a_planted_circuit(pattern_scores):
    previous, induction = pattern_scores
    print(f"\nprevious-token scores:\n{previous}\ninduction scores:\n{induction}")
    assert previous[0].max() > 0.5, "layer 0 should have a previous-token head"
    assert induction[1].max() > 0.5 and induction[0].max() < 0.1, "induction heads should sit in layer 1 only"


def test_key_path_finds_the_previous_token_head(lm, pattern_scores):
    previous, induction = pattern_scores
    prev_head = int(previous[0].argmax())
    probe = swap_induction_probe()
    inductors = [h for h in range(4) if induction[1, h] > 0.5]
    assert inductors
    for head in inductors:
        receivers = [Receiver(Head(1, head), frozenset("k"))]
        fast = path_scores(lm, probe, receivers=receivers, progress=False)
        slow = path_reference(lm, probe, receivers)
        key_path = fast.values[0]
        print(f"induction head L1H{head}: key-path scores of layer-0 heads {[round(v, 4) for v in key_path.tolist()]}, "
              f"previous-token head L0H{prev_head}")
        torch.testing.assert_close(fast.values, slow, atol=1e-5, rtol=0)
        assert torch.equal(torch.argsort(key_path.abs(), descending=True), torch.argsort(slow[0].abs(), descending=True))
        assert int(key_path.abs().argmax()) == prev_head
        others = key_path.abs()[torch.arange(4) != prev_head]
        assert key_path[prev_head] > 0.1 and key_path[prev_head] > 10 * others.max()
        query_path = path_scores(lm, probe, receivers=[Receiver(Head(1, head), frozenset("q"))], progress=False).values[0]
        assert query_path.abs().max() < 0.1 * key_path[prev_head], "the query is the current token: layer 0 barely matters"


def test_attribution_on_the_planted_model(lm, pattern_scores):
    """AtP underrates the previous-token head (exact total effect ~0.9, estimate ~0.06: its effect runs
    through the induction heads' saturated softmax) and ranks it below the four induction heads; screen
    with K=5 verifies it and restores its exact score."""
    prev_head = int(pattern_scores[0][0].argmax())
    probe = swap_induction_probe()
    exact = activation_scores(lm, probe, progress=False).values
    estimate = attribution_scores(lm, probe, progress=False).values
    correlation = rank_correlation(estimate, exact)
    screened = screen_scores(lm, probe, top_k=5, progress=False)
    print(f"\nplanted induction: Spearman(attribution, activation) = {correlation:.3f}; previous-token head L0H{prev_head}: "
          f"exact {exact[0, prev_head]:.3f}, attribution {estimate[0, prev_head]:.3f}; screen verified {screened.meta['exact_heads']}")
    assert correlation > 0.5
    assert int(exact.flatten().argmax()) == prev_head and estimate[0, prev_head] < 0.5 * exact[0, prev_head]
    assert [0, prev_head] in screened.meta["exact_heads"]
    for layer, head in screened.meta["exact_heads"]:
        assert abs(screened.values[layer, head] - exact[layer, head]) < 1e-5
