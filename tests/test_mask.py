"""Head masks: budget arithmetic, per-layer minimums, GQA groups, baselines, JSON file and exports."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from headscope.fusion import fuse
from headscope.heads import Head, HeadMask, HeadscopeError, HeadScores, ModelFingerprint
from headscope.mask import (
    budget_note,
    export_duo_tsv,
    export_retrieval_json,
    head_budget,
    kv_matched_random_mask,
    layer_matched_random_mask,
    layer_types,
    layerwise_mask,
    load_mask,
    mask_from_layer_types,
    random_mask,
    ranking_from_mask,
    save_mask,
    select_mask,
    select_units,
)
from headscope.maskfile import mask_to_dict

FP8 = ModelFingerprint("qwen3", 8, 8, 2, 16, "eight")  # group size 4


def distinct(fp: ModelFingerprint, seed: int = 0) -> torch.Tensor:
    return torch.randperm(fp.n_layers * fp.n_heads, generator=torch.Generator().manual_seed(seed)).float().view(fp.shape)


def test_budget_arithmetic():
    assert head_budget(FP8, "7:1") == 8
    assert head_budget(FP8, "3:1") == 16
    assert head_budget(FP8) == 8  # default 7:1
    assert head_budget(ModelFingerprint("qwen3", 28, 16, 8, 128), "7:1") == 56
    assert head_budget(ModelFingerprint("x", 3, 4, 4, 8), "7:1") == 2  # 1.5 rounds up
    assert head_budget(ModelFingerprint("x", 1, 10, 10, 8), "7:1") == 1  # 1.25
    assert head_budget(ModelFingerprint("x", 1, 3, 3, 8), "7:1") == 1  # 0.375 -> at least 1
    assert head_budget(FP8, n_full=5) == 5
    for kwargs, message in [({"ratio": "7:1", "n_full": 3}, "not both"), ({"ratio": "7/1"}, "cannot read ratio"),
                            ({"ratio": "0:1"}, "cannot read ratio"), ({"n_full": 0}, "between 1 and 64"), ({"n_full": 65}, "between 1 and 64")]:
        with pytest.raises(HeadscopeError, match=message):
            head_budget(FP8, **kwargs)


def test_select_keeps_the_top_heads():
    importance = distinct(FP8)
    mask = select_mask(importance, FP8, ratio="7:1")
    assert mask.n_full == 8
    assert set(mask.heads()) == {Head(int(i) // 8, int(i) % 8) for i in importance.flatten().topk(8).indices}
    assert mask.provenance["ratio"] == "7:1" and mask.provenance["selection"]["n_full"] == 8
    assert mask.provenance["scores"] == importance.tolist()


def test_excluded_heads_give_their_budget_to_the_next_ones():
    importance = distinct(FP8)
    top = [Head(int(i) // 8, int(i) % 8) for i in importance.flatten().topk(10).indices]
    mask = select_mask(importance, FP8, ratio="7:1", exclude=top[:2])
    assert set(mask.heads()) == set(top[2:10])
    assert mask.provenance["selection"]["excluded"] == [str(h) for h in sorted(top[:2], key=lambda h: (h.layer, h.head))]
    assert select_mask(importance, FP8, ratio="7:1").provenance["selection"].get("excluded") is None
    with pytest.raises(HeadscopeError, match="cannot exclude L8H0"):
        select_mask(importance, FP8, ratio="7:1", exclude=[Head(8, 0)])
    whole_layer = [Head(0, h) for h in range(8)]
    with pytest.raises(HeadscopeError, match="forces excluded heads"):
        select_mask(importance, FP8, ratio="7:1", min_per_layer=1, exclude=whole_layer)


def test_kv_aware_exclusion_keeps_the_group_budget_and_leaves_excluded_heads_linear():
    """With kv_aware, groups are scored without the excluded heads; a chosen group keeps them linear."""
    importance = distinct(FP8)
    plain = select_mask(importance, FP8, ratio="7:1", kv_aware=True)
    groups = lambda m: {(h.layer, h.head // FP8.group_size) for h in m.heads()}  # noqa: E731
    best = max(plain.heads(), key=lambda h: float(importance[h.layer, h.head]))
    mates = [Head(best.layer, h) for h in range(FP8.n_heads) if h // FP8.group_size == best.head // FP8.group_size]
    one = select_mask(importance, FP8, ratio="7:1", kv_aware=True, exclude=[best])
    assert len(groups(one)) == len(groups(plain))  # the KV cache budget is unchanged
    kept = (best.layer, best.head // FP8.group_size) in groups(one)
    assert best not in one.heads() and len(one.heads()) == len(groups(one)) * FP8.group_size - kept
    assert one.provenance["selection"]["n_full"] == len(one.heads()) and one.provenance["selection"]["excluded"] == [str(best)]
    whole = select_mask(importance, FP8, ratio="7:1", kv_aware=True, exclude=mates)  # the whole group: another one replaces it
    assert (best.layer, best.head // FP8.group_size) not in groups(whole) and len(whole.heads()) == len(plain.heads())


def test_kv_aware_group_sums_leave_excluded_heads_out():
    """``group_score="sum"``: a group is worth the sum of its heads that may be FA. Group (0, 0) is worth 2.0 without
    its excluded head and beats group (1, 0) at 1.3; counting the excluded head (as a floor value) reversed that."""
    fp = ModelFingerprint("qwen3", 2, 4, 2, 16)  # groups of 2
    importance = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.65, 0.65, 0.0, 0.0]])
    importance[0, 1], importance[0, 0] = 2.0, -9.0  # L0H0: excluded, and very negative
    mask = select_mask(importance, fp, n_full=2, kv_aware=True, group_score="sum", exclude=[Head(0, 0)])
    assert mask.heads() == [Head(0, 1)]
    assert select_mask(importance, fp, n_full=2, kv_aware=True, group_score="max", exclude=[Head(0, 0)]).heads() == [Head(0, 1)]


def test_exclusion_that_breaks_the_budget_or_the_minimum_is_one_clear_error():
    importance = distinct(FP8)
    with pytest.raises(HeadscopeError, match="a budget of 64 full heads exceeds the 63 heads not excluded"):
        select_mask(importance, FP8, n_full=64, exclude=[Head(0, 0)])
    whole_layer = [Head(0, h) for h in range(8)]
    with pytest.raises(HeadscopeError, match="cannot be met in layer\\(s\\) 0 without excluded heads"):
        select_mask(importance, FP8, n_full=32, kv_aware=True, min_per_layer=1, exclude=whole_layer)  # a group per layer


def test_a_head_count_rounded_to_whole_groups_or_layers_is_noted():
    from headscope.mask import budget_note

    importance = distinct(FP8)  # 8 layers x 8 heads, groups of 4
    assert budget_note(select_mask(importance, FP8, n_full=6, kv_aware=True)) == "note: 6 full heads asked for; in whole KV groups the mask keeps 8"
    assert budget_note(select_mask(importance, FP8, n_full=12, whole_layers=True)) == "note: 12 full heads asked for; in whole layers the mask keeps 16"
    assert budget_note(select_mask(importance, FP8, n_full=8, kv_aware=True)) is None


def test_min_per_layer_is_honoured():
    importance = distinct(FP8)
    importance[0] += 1000  # layer 0 would take the whole budget
    assert select_mask(importance, FP8, n_full=8).full[0].all()
    mask = select_mask(importance, FP8, n_full=8, min_per_layer=1)
    assert mask.full.sum(1).tolist() == [1] * 8
    assert all(mask.full[l, int(importance[l].argmax())] for l in range(8))
    mask = select_mask(importance, FP8, n_full=20, min_per_layer=2)
    assert (mask.full.sum(1) >= 2).all() and mask.n_full == 20
    with pytest.raises(HeadscopeError, match="min_per_layer=2 needs 16 full heads"):
        select_mask(importance, FP8, n_full=8, min_per_layer=2)


def test_greedy_selection_is_optimal_by_brute_force():
    generator = torch.Generator().manual_seed(1)
    for n_units, minimum in [(4, 1), (5, 1), (6, 2), (3, 0)]:
        importance = torch.randn(3, 3, generator=generator)
        best = max(
            (combo for combo in itertools.combinations(range(9), n_units)
             if all(sum(1 for c in combo if c // 3 == l) >= minimum for l in range(3))),
            key=lambda combo: sum(float(importance.flatten()[c]) for c in combo),
        )
        chosen = select_units(importance, n_units, minimum)
        assert sorted(chosen.flatten().nonzero().flatten().tolist()) == list(best)


def test_kv_aware_picks_whole_groups():
    fp = ModelFingerprint("qwen3", 4, 8, 2, 16)  # groups: heads 0-3, 4-7
    importance = torch.zeros(fp.shape)
    importance[0, 0] = 7.0  # one critical head in group (0, 0): best max, worst sum
    importance[1, 4:] = 3.0  # a uniformly useful group (1, 1)
    importance[2, 0:4] = 2.0  # another (2, 0)
    per_head = select_mask(importance, fp, n_full=6)  # (0, 0), all of group (1, 1), one head of (2, 0)
    assert per_head.kv_fraction == 3 / 8 and per_head.head_fraction == 6 / 32
    by_max = select_mask(importance, fp, n_full=8, kv_aware=True)
    assert set(by_max.heads()) == {Head(0, h) for h in range(4)} | {Head(1, h) for h in range(4, 8)}
    by_sum = select_mask(importance, fp, n_full=8, kv_aware=True, group_score="sum")
    assert set(by_sum.heads()) == {Head(1, h) for h in range(4, 8)} | {Head(2, h) for h in range(4)}
    for mask in (by_max, by_sum):
        assert mask.kv_fraction == mask.head_fraction == 2 / 8
        assert mask.kv_groups_full().sum() == 2 and mask.provenance["selection"]["kv_aware"]
    assert select_mask(importance, fp, n_full=5, kv_aware=True).n_full == 4  # 1.25 groups -> 1
    assert select_mask(importance, fp, n_full=6, kv_aware=True).n_full == 8  # 1.5 groups -> 2
    with_min = select_mask(importance, fp, n_full=16, kv_aware=True, min_per_layer=1)  # 1 head -> 1 group per layer
    assert with_min.kv_groups_full().sum(1).tolist() == [1, 1, 1, 1]
    with pytest.raises(HeadscopeError, match="group score"):
        select_mask(importance, fp, kv_aware=True, group_score="mean")


def test_whole_layers_picks_the_layers_the_scores_rank_first_and_builds_them_as_plain_attention():
    from headscope.hybrid.plan import plan_layer

    fp = ModelFingerprint("qwen3", 4, 8, 2, 16)
    importance = torch.zeros(fp.shape)
    importance[0, 0] = 7.0  # one critical head: best max, worst sum
    importance[2, :] = 1.5  # a uniformly useful layer: best sum (12)
    importance[3, :4] = 2.0  # sum 8
    by_max = select_mask(importance, fp, n_full=16, whole_layers=True)
    assert set(by_max.heads()) == {Head(0, h) for h in range(8)} | {Head(3, h) for h in range(8)}
    by_sum = select_mask(importance, fp, n_full=16, whole_layers=True, group_score="sum")
    assert set(by_sum.heads()) == {Head(l, h) for l in (2, 3) for h in range(8)}
    assert by_sum.provenance["selection"]["whole_layers"] and by_sum.provenance["selection"]["group_score"] == "sum"
    assert select_mask(importance, fp, n_full=11, whole_layers=True).n_full == 8  # 1.375 layers -> 1
    assert select_mask(importance, fp, ratio="1:1", whole_layers=True).n_full == 16
    plans = [plan_layer(row, fp.group_size, None, True, layer).kind for layer, row in enumerate(by_sum.full.tolist())]
    assert plans == ["linear", "linear", "full", "full"]  # an all-FA layer stays the pretrained attention
    for kwargs, match in (({"kv_aware": True}, "kv_aware"), ({"min_per_layer": 1}, "per-layer minimum"), ({"exclude": [Head(2, 0)]}, "exclude")):
        with pytest.raises(HeadscopeError, match=match):
            select_mask(importance, fp, n_full=16, whole_layers=True, **kwargs)


def test_select_from_scores_and_ranking():
    fp = ModelFingerprint("qwen3", 2, 4, 2, 16)
    raw = HeadScores(torch.tensor([[0.1, -5.0, 0.2, 0.0], [0.3, 0.0, 0.0, 0.0]]), "needle", "activation", fp, "retrieval")
    assert select_mask(raw, n_full=1).heads() == [Head(0, 1)]  # by |score|
    mask = select_mask(fuse([raw]), n_full=2)
    assert mask.heads() == [Head(0, 1), Head(1, 0)]
    assert mask.provenance["probes"] == ["needle"] and mask.provenance["fusion"]["rule"] == "mean"
    with pytest.raises(HeadscopeError, match="another model"):
        select_mask(raw, ModelFingerprint("qwen3", 2, 4, 4, 16))
    with pytest.raises(HeadscopeError, match="needs the model fingerprint"):
        select_mask(torch.zeros(2, 4))


def test_random_mask_is_seeded_with_exact_budget():
    state = torch.random.get_rng_state()
    first, again, other = random_mask(FP8, "7:1", seed=3), random_mask(FP8, "7:1", seed=3), random_mask(FP8, "7:1", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.full, again.full) and not torch.equal(first.full, other.full)
    assert first.n_full == 8 and random_mask(FP8, n_full=13, seed=0).n_full == 13
    grouped = random_mask(FP8, "3:1", seed=5, kv_aware=True)
    assert grouped.n_full == 16 and grouped.kv_fraction == grouped.head_fraction == 0.25
    assert first.provenance["selection"] == {"method": "random", "seed": 3, "n_full_budget": 8, "n_full": 8, "min_per_layer": 0, "kv_aware": False}


def test_kv_matched_random_masks_have_the_head_and_group_counts_of_the_mask():
    concentrated = HeadMask(torch.zeros(FP8.shape, dtype=torch.bool).index_fill_(1, torch.tensor([0, 1, 2]), True), FP8)  # 24 heads, 8 groups
    state = torch.random.get_rng_state()
    draws = [kv_matched_random_mask(concentrated, seed) for seed in range(12)]
    assert torch.equal(torch.random.get_rng_state(), state)
    for mask in draws:
        assert mask.n_full == 24 and int(mask.kv_groups_full().sum()) == 8
    assert len({tuple(m.full.flatten().tolist()) for m in draws}) == 12
    assert torch.equal(kv_matched_random_mask(concentrated, 5).full, draws[5].full)
    plain = random_mask(FP8, n_full=24, seed=0)
    assert int(plain.kv_groups_full().sum()) > 8  # what the matching is for
    selection = draws[0].provenance["selection"]
    assert selection["kv_groups"] == 8 and selection["kv_matched_to"]["n_full"] == 24 and selection["method"] == "random"
    one_per_group = random_mask(FP8, n_full=16, seed=1, kv_groups=16)
    assert one_per_group.full.view(8, 2, 4).sum(-1).eq(1).all()  # 16 heads in 16 groups: one each
    full_groups = random_mask(FP8, n_full=16, seed=1, kv_groups=4)
    assert torch.isin(full_groups.full.view(8, 2, 4).sum(-1), torch.tensor([0, 4])).all()


def test_random_masks_with_fixed_groups_are_uniform_over_all_such_masks():
    fp = ModelFingerprint("qwen3", 2, 4, 2, 16, "small")  # 4 KV groups of 2 heads
    every = [m for m in itertools.combinations(range(8), 3) if len({h // 2 for h in m}) == 2]  # 3 heads in exactly 2 groups
    counts = dict.fromkeys(every, 0)
    n_draws = 40 * len(every)
    for seed in range(n_draws):
        counts[tuple(random_mask(fp, n_full=3, seed=seed, kv_groups=2).full.flatten().nonzero().flatten().tolist())] += 1
    assert len(every) == 24 and sum(counts.values()) == n_draws
    assert min(counts.values()) > 20 and max(counts.values()) < 60  # 40 expected each; binomial sd 6.2


def _layer_counts(mask: HeadMask) -> tuple[list[int], list[int]]:
    return mask.full.sum(1).tolist(), mask.kv_groups_full().sum(1).tolist()


def _layouts_per_layer(mask: HeadMask) -> list[list[tuple[int, ...]]]:
    """Every set of flat head ids of each layer with that layer's head and KV-group counts in ``mask`` (by enumeration)."""
    fp = mask.fingerprint
    heads = [range(layer * fp.n_heads, (layer + 1) * fp.n_heads) for layer in range(fp.n_layers)]
    return [[m for m in itertools.combinations(ids, n) if len({h // fp.group_size for h in m}) == g]
            for ids, n, g in zip(heads, *_layer_counts(mask))]


def test_layer_matched_random_masks_keep_every_layers_head_and_group_counts():
    all_fa_layer = HeadMask(torch.zeros(FP8.shape, dtype=torch.bool).index_fill_(0, torch.tensor([5]), True), FP8)  # layer 5 all FA
    all_fa_layer.full[2, [0, 1, 4]] = True  # plus 3 heads in 2 groups of layer 2
    sources = [random_mask(FP8, "7:1", seed=1), random_mask(FP8, "3:1", seed=2, kv_aware=True),
               random_mask(FP8, n_full=20, seed=3, kv_groups=7), all_fa_layer]
    state = torch.random.get_rng_state()
    for source in sources:
        draws = [layer_matched_random_mask(source, seed) for seed in range(12)]
        for mask in draws:
            assert _layer_counts(mask) == _layer_counts(source) and mask.fingerprint is source.fingerprint
        layouts = math.prod(len(ms) for ms in _layouts_per_layer(source))  # 4 (the KV-aware one) to 589,824
        assert len({tuple(m.full.flatten().tolist()) for m in draws}) >= min(layouts, 4)
        assert torch.equal(layer_matched_random_mask(source, 7).full, draws[7].full)
    assert torch.equal(torch.random.get_rng_state(), state)
    matched_to = draws[0].provenance["selection"]["layer_matched_to"]
    assert matched_to["forced_heads"] == 8 and matched_to["forced_layers"] == [5] and all(bool(m.full[5].all()) for m in draws)
    assert matched_to["heads_per_layer"] == [0, 0, 3, 0, 0, 8, 0, 0] and matched_to["kv_groups_per_layer"] == [0, 0, 2, 0, 0, 2, 0, 0]
    assert draws[0].provenance["selection"]["method"] == "random" and draws[0].provenance["selection"]["kv_groups"] == 4
    assert layer_matched_random_mask(sources[0]).provenance["selection"]["layer_matched_to"]["forced_heads"] == 0
    layerwise = layerwise_mask(FP8, "3:1")  # whole layers: the only mask with its per-layer counts
    assert all(torch.equal(layer_matched_random_mask(layerwise, seed).full, layerwise.full) for seed in range(3))


def test_layer_matched_random_masks_are_uniform_over_all_masks_with_the_per_layer_counts():
    fp = ModelFingerprint("qwen3", 4, 6, 2, 16, "small")  # 2 KV groups of 3 heads per layer
    source = torch.zeros(fp.shape, dtype=torch.bool)
    source[0, [0, 1, 3, 4]] = True  # 4 heads in 2 groups: 15 layouts, the groups holding 1+3, 2+2 or 3+1 heads
    source[1, [4, 5]] = True  # 2 heads in 1 group: 6 layouts
    source[2] = True  # all FA: 1 layout; layer 3 none: 1 layout
    source = HeadMask(source, fp)
    per_layer = _layouts_per_layer(source)
    every = [sum(ms, ()) for ms in itertools.product(*per_layer)]
    assert [len(ms) for ms in per_layer] == [15, 6, 1, 1] and len(every) == 90
    counts = dict.fromkeys(every, 0)
    n_draws = 40 * len(every)
    for seed in range(n_draws):
        counts[tuple(layer_matched_random_mask(source, seed).full.flatten().nonzero().flatten().tolist())] += 1
    assert sum(counts.values()) == n_draws
    chi2 = sum((c - 40) ** 2 / 40 for c in counts.values())
    dof = len(every) - 1  # the chi-square quantile at p = 0.999 (Wilson-Hilferty; 136 for 89 dof)
    assert chi2 < dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3, chi2


@pytest.mark.parametrize("n_full, kv_groups, message", [(3, 4, "cannot place 3"), (9, 2, "cannot place 9"), (4, 0, "exactly 0 KV groups"),
                                                        (4, 17, "the model has 16 groups")])
def test_impossible_group_counts_are_one_clear_error(n_full, kv_groups, message):
    with pytest.raises(HeadscopeError, match=message):
        random_mask(FP8, n_full=n_full, kv_groups=kv_groups)
    with pytest.raises(HeadscopeError, match="kv_aware"):
        random_mask(FP8, n_full=8, kv_groups=2, kv_aware=True)


def test_layerwise_layout_and_layer_types():
    twelve = ModelFingerprint("qwen3", 12, 4, 2, 8)
    mask = layerwise_mask(twelve)
    assert mask.full.all(1).nonzero().flatten().tolist() == [3, 7, 11] and mask.n_full == 12
    assert mask.kv_fraction == mask.head_fraction == 0.25
    assert layerwise_mask(twelve, "1:1").full.any(1).nonzero().flatten().tolist() == [1, 3, 5, 7, 9, 11]
    types = layer_types(mask)
    assert types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert torch.equal(mask_from_layer_types(types, twelve).full, mask.full)
    with pytest.raises(HeadscopeError, match="no full-attention layer"):
        layerwise_mask(ModelFingerprint("qwen3", 3, 4, 2, 8), "3:1")
    with pytest.raises(HeadscopeError, match="layer 0 mixes 1 full-attention and 3 linear"):
        layer_types(HeadMask(torch.tensor([[True, False, False, False]] * 12), twelve))
    with pytest.raises(HeadscopeError, match="unknown layer types"):
        mask_from_layer_types(["linear_attention"] * 11 + ["sliding"], twelve)
    with pytest.raises(HeadscopeError, match="11 entries"):
        mask_from_layer_types(["linear_attention"] * 11, twelve)


def test_json_round_trip(tmp_path):
    fp = ModelFingerprint("qwen3", 4, 8, 2, 16, "tiny")
    generator = torch.Generator().manual_seed(0)
    inputs = [HeadScores(torch.randn(4, 8, generator=generator), f"p{i}", "activation", fp, "retrieval") for i in range(2)]
    mask = select_mask(fuse(inputs, rule="rrf"), ratio="7:1", kv_aware=True)
    loaded = load_mask(save_mask(mask, tmp_path / "mask.json"), expect=fp)
    assert torch.equal(loaded.full, mask.full) and loaded.fingerprint == fp
    assert loaded.provenance == json.loads(json.dumps(mask.provenance))
    data = json.loads((tmp_path / "mask.json").read_text())
    assert data["ratio"] == "7:1" and data["kv_fraction"] == mask.kv_fraction and data["head_fraction"] == 0.125
    assert data["full_attention_heads"] == [[h.layer, h.head] for h in mask.heads()]
    assert data["provenance"]["probes"] == ["p0", "p1"] and data["provenance"]["fusion"]["rule"] == "rrf"
    assert torch.allclose(ranking_from_mask(loaded).values, fuse(inputs, rule="rrf").values)
    with pytest.raises(HeadscopeError, match="stores no head scores"):
        ranking_from_mask(random_mask(fp))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schema_version=2), "unknown mask schema version 2"),
        (lambda d: d.update(kind="headscope.scores"), "not a headscope mask file"),
        (lambda d: d.pop("kv_fraction"), "lacks the keys kv_fraction"),
        (lambda d: d["model"].pop("n_kv_heads"), "lacks the field 'n_kv_heads'"),
        (lambda d: d["full_attention_heads"].append([0, 0]), r"\[0, 0\] is listed twice"),
        (lambda d: d["full_attention_heads"].append([4, 0]), r"\[4, 0\] is out of range for 4 layers x 8 heads"),
        (lambda d: d["full_attention_heads"].append([1, -1]), "out of range"),
        (lambda d: d["full_attention_heads"].append([1, "2"]), "not a \\[layer, head\\] pair of integers"),
        (lambda d: d.update(kv_fraction=0.5), "'kv_fraction' is 0.5 but the listed heads give 0.25"),
        (lambda d: d["provenance"].update(scores=[[0.0] * 8] * 3), "provenance 'scores' must be 4 lists of 8"),
        (lambda d: d.update(ratio=7), "'ratio' must be a string"),
    ],
)
def test_load_names_each_problem(tmp_path, edit, message):
    fp = ModelFingerprint("qwen3", 4, 8, 2, 16)
    data = mask_to_dict(select_mask(distinct(fp), fp, n_full=2, kv_aware=False))
    data["full_attention_heads"] = [[0, 0], [1, 1]]
    data.update(n_full=2, head_fraction=2 / 32, kv_fraction=2 / 8)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HeadscopeError, match=message):
        load_mask(path)


def test_load_rejects_wrong_model(tmp_path):
    path = save_mask(random_mask(FP8, seed=0), tmp_path / "m.json")
    assert load_mask(path, expect=ModelFingerprint("qwen3", 8, 8, 2, 16, "another name")).n_full == 8
    with pytest.raises(HeadscopeError, match=r"made for another model: n_heads is 8 in the file but 16 in the model"):
        load_mask(path, expect=ModelFingerprint("qwen3", 8, 16, 2, 16))
    with pytest.raises(HeadscopeError, match="not found"):
        load_mask(tmp_path / "missing.json")


def test_duo_tsv(tmp_path):
    fp = ModelFingerprint("llama", 2, 8, 4, 16)  # group size 2
    full = torch.zeros(fp.shape, dtype=torch.bool)
    full[0, 0] = full[0, 1] = full[1, 5] = True  # layer 0 group 0 whole, layer 1 half of group 2
    mask = HeadMask(full, fp)
    path = export_duo_tsv(mask, tmp_path / "pattern" / "full_attention_heads.tsv", sink_size=64, recent_size=256)
    assert path.read_text() == "1.0\t0.0\t0.0\t0.0\n0.0\t0.0\t1.0\t0.0\n"
    assert np.loadtxt(path, delimiter="\t").shape == (2, 4)
    assert json.loads((path.parent / "config.json").read_text()) == {"sink_size": 64, "recent_size": 256}
    fraction = export_duo_tsv(mask, tmp_path / "f.tsv", group_value="fraction").read_text()
    assert fraction == "1.0\t0.0\t0.0\t0.0\n0.0\t0.0\t0.5\t0.0\n"
    with pytest.raises(HeadscopeError, match="both sink_size and recent_size"):
        export_duo_tsv(mask, tmp_path / "x.tsv", sink_size=64)
    with pytest.raises(HeadscopeError, match="recent_size > 0"):
        export_duo_tsv(mask, tmp_path / "x.tsv", sink_size=-5, recent_size=0)
    (tmp_path / "pattern" / "config.json").write_text(json.dumps({"sink_size": 1, "recent_size": 2, "threshold": 0.5}))
    export_duo_tsv(mask, path, sink_size=64, recent_size=256)  # a DuoAttention pattern config: its other keys stay
    assert json.loads((path.parent / "config.json").read_text()) == {"sink_size": 64, "recent_size": 256, "threshold": 0.5}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HeadscopeError, match="is not DuoAttention's"):
        export_duo_tsv(mask, tmp_path / "model" / "t.tsv", sink_size=64, recent_size=256)
    assert not (tmp_path / "model" / "t.tsv").exists()
    with pytest.raises(HeadscopeError, match="group value"):
        export_duo_tsv(mask, tmp_path / "x.tsv", group_value="all")


def test_retrieval_json(tmp_path):
    fp = ModelFingerprint("qwen3", 2, 2, 1, 8)
    raw = HeadScores(torch.tensor([[0.5, -2.0], [0.0, 1.0]]), "needle", "activation", fp, "retrieval")
    data = json.loads(export_retrieval_json(raw, tmp_path / "r.json").read_text())
    assert data == {"0-0": [0.5], "0-1": [2.0], "1-0": [0.0], "1-1": [1.0]}
    fused = fuse([raw])  # z-scores: negative values, summing to ~0
    text = export_retrieval_json(fused, tmp_path / "f.json").read_text()
    data = json.loads(text.splitlines()[0])  # one line: Retrieval_Head and HeadKV read json.loads(f.readline())
    assert list(data) == ["0-0", "0-1", "1-0", "1-1"]
    assert data == {"0-0": [0.5], "0-1": [1.0], "1-0": [0.25], "1-1": [0.75]}  # (4 - place) / 4, by fused importance
    # a mask: its own heads first (here 1-0, which the fused ranking puts last), then the others by fused importance
    mask = select_mask(fused, n_full=1, exclude=[Head(0, 1), Head(1, 1), Head(0, 0)])
    data = json.loads(export_retrieval_json(mask, tmp_path / "m.json").read_text())
    assert mask.heads() == [Head(1, 0)] and data == {"0-0": [0.25], "0-1": [0.75], "1-0": [1.0], "1-1": [0.5]}
    with pytest.raises(HeadscopeError, match="needs a HeadMask, FusedRanking or HeadScores"):
        export_retrieval_json(torch.zeros(2, 2), tmp_path / "x.json")


def test_a_layerwise_mask_records_the_ratio_its_layers_realise():
    """7:1 of SmolLM2's 30 layers puts layers 7, 15 and 23 at full attention: 27 of 270 heads, 9:1; the mask says so
    (and keeps what was asked), where it had recorded 7:1; a layout that fits the layers records its own ratio."""
    smol = ModelFingerprint("llama", 30, 9, 3, 64)
    mask = layerwise_mask(smol, "7:1")
    assert mask.provenance["selection"]["full_layers"] == [7, 15, 23] and mask.n_full == 27
    assert mask.provenance["ratio"] == "9:1" and mask.provenance["selection"]["requested_ratio"] == "7:1"
    assert "ratio 7:1 cannot be met exactly" in budget_note(mask) and "9:1 (recorded as such)" in budget_note(mask)
    exact = layerwise_mask(FP8, "3:1")
    assert exact.provenance["ratio"] == "3:1" and "requested_ratio" not in exact.provenance["selection"] and budget_note(exact) is None
