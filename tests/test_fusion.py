"""Score fusion: hand-computed normalisations and rules, weighting, validation."""

from __future__ import annotations

import math

import pytest
import torch

from headscope.fusion import average_ranks, fuse, input_weights, normalise_scores
from headscope.heads import Head, HeadscopeError, HeadScores, ModelFingerprint

FP = ModelFingerprint("qwen3", 1, 4, 2, 16, "row")


def scores(values, probe="p", capability="retrieval", fp=FP, method="activation", **meta) -> HeadScores:
    return HeadScores(torch.as_tensor(values, dtype=torch.float32).view(fp.shape), probe, method, fp, capability, meta)


def close(tensor: torch.Tensor, expected) -> bool:
    return torch.allclose(tensor.to(torch.float64), torch.tensor(expected, dtype=torch.float64).view(tensor.shape), atol=1e-6)


def test_average_ranks_matches_slow_definition():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    values = torch.randint(0, 6, (200,)).float()  # many ties
    slow = [sum(1.0 for w in values if w < v) + (sum(1.0 for w in values if w == v) + 1) / 2 for v in values]
    assert average_ranks(values).tolist() == slow


def test_rank_normalisation_uses_magnitude_and_averages_ties():
    norm = normalise_scores(torch.tensor([[-3.0, 1.0, 3.0, 2.0]]), "rank")
    assert close(norm, [2.5 / 3, 0.0, 2.5 / 3, 1 / 3])


def test_zscore_normalisation_by_hand():
    # |s| = 3, 1, 3, 2: mean 2.25, population variance 0.6875
    std = math.sqrt(0.6875)
    norm = normalise_scores(torch.tensor([[-3.0, 1.0, 3.0, 2.0]]), "zscore")
    assert close(norm, [0.75 / std, -1.25 / std, 0.75 / std, -0.25 / std])
    assert close(normalise_scores(torch.full((1, 4), -2.0), "zscore"), [0.0] * 4)


def test_default_weights_balance_capabilities():
    a1, a2 = scores([4, 3, 2, 1], "a1", "A"), scores([4, 3, 2, 1], "a2", "A")
    b = scores([1, 2, 3, 4], "b", "B")
    assert close(input_weights([a1, a2, b], None), [0.25, 0.25, 0.5])
    # rank norms: A -> [1, 2/3, 1/3, 0], B -> [0, 1/3, 2/3, 1]; equal per capability -> all 0.5
    assert close(fuse([a1, a2, b], normalise="rank").values, [0.5] * 4)
    # equal per input: (2 * A + B) / 3
    assert close(fuse([a1, a2, b], normalise="rank", weights=[1, 1, 1]).values, [2 / 3, 5 / 9, 4 / 9, 1 / 3])
    # per capability 3:1 -> 0.75 * A + 0.25 * B
    assert close(fuse([a1, a2, b], normalise="rank", weights={"A": 3, "B": 1}).values, [0.75, 7 / 12, 5 / 12, 0.25])


def test_default_keeps_a_head_that_matters_for_one_probe_only():
    # Two probes each with one dominant specialist head and a shared mid-level head: zscore + mean
    # (the default) ranks both specialists above the shared head; rank + mean would not.
    six = ModelFingerprint("qwen3", 1, 6, 2, 16)
    a = scores([9, 0.1, 1, 0.2, 0.3, 0.4], "a", "A", fp=six)
    b = scores([0.2, 9, 1, 0.1, 0.4, 0.3], "b", "B", fp=six)
    assert fuse([a, b]).provenance["normalisation"] == "zscore"
    assert set(fuse([a, b]).top(2)) == {Head(0, 0), Head(0, 1)}
    assert fuse([a, b], normalise="rank").top(1) == [Head(0, 2)]


def test_mean_with_zscore():
    a, b = scores([4, 3, 2, 1], "a", "A"), scores([0, 0, 0, 8], "b", "B")
    za = [(x - 2.5) / math.sqrt(1.25) for x in (4, 3, 2, 1)]
    zb = [(x - 2.0) / math.sqrt(12.0) for x in (0, 0, 0, 8)]
    assert close(fuse([a, b], normalise="zscore").values, [(p + q) / 2 for p, q in zip(za, zb)])


def test_rrf_by_hand():
    a, b = scores([4, 3, 2, 1], "a", "A"), scores([1, 2, 3, 4], "b", "B")
    # descending ranks: a -> 1, 2, 3, 4; b -> 4, 3, 2, 1; weights 0.5 each
    fused = fuse([a, b], rule="rrf", rrf_k=0).values
    assert close(fused, [0.5 * (1 + 1 / 4), 0.5 * (1 / 2 + 1 / 3), 0.5 * (1 / 3 + 1 / 2), 0.5 * (1 / 4 + 1)])
    fused60 = fuse([a, b], rule="rrf").values
    assert close(fused60, [0.5 * (1 / 61 + 1 / 64), 0.5 * (1 / 62 + 1 / 63), 0.5 * (1 / 63 + 1 / 62), 0.5 * (1 / 64 + 1 / 61)])
    tied = fuse([scores([5, 5, 1, 0])], rule="rrf", rrf_k=0).values  # ranks 1.5, 1.5, 3, 4
    assert close(tied, [1 / 1.5, 1 / 1.5, 1 / 3, 1 / 4])


def test_rrf_orders_like_textbook_rrf():
    fp = ModelFingerprint("qwen3", 4, 6, 3, 8)
    generator = torch.Generator().manual_seed(3)
    inputs = [scores(torch.randn(24, generator=generator), f"p{i}", "A" if i < 3 else "B", fp) for i in range(5)]
    ranks = [{h: r + 1 for r, h in enumerate(s.top(24))} for s in inputs]  # no ties in random floats
    textbook = {Head(l, h): sum(1 / (60 + r[Head(l, h)]) for r in ranks) for l in range(4) for h in range(6)}
    fused = fuse(inputs, rule="rrf", weights=[1] * 5)
    assert fused.order == sorted(textbook, key=lambda h: -textbook[h])


def test_max_rule_and_sign():
    a, b = scores([4, 3, 2, 1], "a", "A"), scores([-1, 2, -3, 4], "b", "B")
    assert close(fuse([a, b], normalise="rank", rule="max").values, [1.0, 2 / 3, 2 / 3, 1.0])
    assert close(fuse([scores([-4, 1, 0, 2])], normalise="rank").values, [1.0, 1 / 3, 0.0, 2 / 3])


def test_order_ranks_and_provenance():
    fused = fuse([scores([1, 3, 3, 0], "a", "A", source="a.json")], normalise="rank")
    assert fused.order == [Head(0, 1), Head(0, 2), Head(0, 0), Head(0, 3)]  # tie -> lower index first
    assert fused.ranks().tolist() == [[3, 1, 2, 4]]
    assert fused.top(2) == [Head(0, 1), Head(0, 2)]
    assert fused.provenance["inputs"] == [{"probe": "a", "method": "activation", "capability": "A", "weight": 1.0, "source": "a.json"}]
    assert fused.provenance["normalisation"] == "rank" and fused.provenance["rule"] == "mean"
    assert fuse([scores([1, 2, 3, 4])], rule="rrf").provenance["rrf_k"] == 60.0
    as_scores = fused.to_scores()
    assert as_scores.probe == "fused" and as_scores.method == "rank-mean" and torch.equal(as_scores.values, fused.values)


def test_validation_errors():
    other = ModelFingerprint("qwen3", 1, 4, 1, 16)
    with pytest.raises(HeadscopeError, match=r"b\.json \(b/activation\).*n_kv_heads"):
        fuse([scores([1, 2, 3, 4], "a"), scores([1, 2, 3, 4], "b", fp=other, source="b.json")])
    bad = scores([1, 2, 3, 4], "nanprobe")
    bad.values[0, 1] = float("nan")
    with pytest.raises(HeadscopeError, match="nanprobe/activation contains NaN"):
        fuse([scores([1, 2, 3, 4]), bad])
    ok = [scores([1, 2, 3, 4], "a", "A"), scores([4, 3, 2, 1], "b", "B")]
    for kwargs, message in [
        ({"rule": "rrf", "normalise": "zscore"}, "rrf"),
        ({"rule": "max", "weights": [1, 1]}, "takes no weights"),
        ({"rule": "median"}, "unknown fusion rule"),
        ({"normalise": "minmax"}, "unknown normalisation"),
        ({"weights": [1]}, "1 weights given for 2"),
        ({"weights": [1, -1]}, "non-negative"),
        ({"weights": {"A": 1}}, r"no weight given for capabilities \['B'\]"),
        ({"weights": {"A": 1, "B": 1, "C": 1}}, "that no input has"),
        ({"rule": "rrf", "rrf_k": -1}, "rrf_k"),
    ]:
        with pytest.raises(HeadscopeError, match=message):
            fuse(ok, **kwargs)
    with pytest.raises(HeadscopeError, match="nothing to fuse"):
        fuse([])
