"""headscope.quality (cache sizes, held-out loss, evaluation, tables), the shared corpus rows and headscope.arms
(arm plan, layer-wise masks)."""

from __future__ import annotations

import math

import pytest
import torch

from headscope.arms import arm_mask, evenly_spaced_layers, layerwise_arm_mask, plan_arms
from headscope.heads import HeadMask, HeadscopeError, ModelFingerprint
from headscope.mask import kv_matched_random_mask, layer_matched_random_mask, layerwise_mask, random_mask
from headscope.quality import (capability_means, evaluate_quality, heldout_loss, kv_cache_bytes_per_token, recurrent_state_bytes,
                               results_markdown)
from headscope.transfer.losses import next_token_loss
from conftest import VOCAB, tiny_qwen3

FP = ModelFingerprint("qwen3", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, name="t")


def test_kv_bytes_count_whole_groups_and_gdn_state_counts_the_other_heads():
    full = torch.zeros(2, 4, dtype=torch.bool)
    full[0, 0] = full[0, 1] = True  # one KV group (heads 0, 1) in layer 0
    full[1, 3] = True  # group 1 of layer 1
    mask = HeadMask(full, FP)
    assert kv_cache_bytes_per_token(FP, mask) == 2 * 8 * 2 * 2  # 2 groups x head_dim x (K, V) x bf16
    assert kv_cache_bytes_per_token(FP) == 4 * 8 * 2 * 2
    assert kv_cache_bytes_per_token(FP, mask, dtype_bytes=4) == 2 * 8 * 2 * 4
    assert recurrent_state_bytes(FP, mask) == 5 * (8 * 8 * 4 + 3 * 8 * 4 * 2)
    assert recurrent_state_bytes(FP) == 0


def test_heldout_loss_is_the_row_weighted_mean_cross_entropy():
    model = tiny_qwen3()
    rows = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = float(next_token_loss(model(input_ids=rows).logits, rows))
    assert heldout_loss(model, rows) == pytest.approx(expected, rel=1e-5)


def test_evaluate_quality_records_the_cache_layout_and_heldout_loss_of_the_original_and_a_hybrid():
    model = tiny_qwen3()
    fp = ModelFingerprint("qwen3", n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24)
    rows = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    full = torch.zeros(3, 4, dtype=torch.bool)
    full[1, 0] = full[1, 1] = full[2, 3] = True  # two KV groups
    mask = HeadMask(full, fp)
    original, hybrid = (evaluate_quality(model, fp, m, {}, {12: rows}, progress=False) for m in (None, mask))
    assert original["heldout_loss"] == {"12": pytest.approx(heldout_loss(model, rows))} and original["accuracy"] == {}
    assert (original["n_full"], original["kv_groups"], original["fa_head_share"]) == (12, 6, 1.0)
    assert original["gdn_state_bytes_per_sequence"] == 0
    assert (hybrid["n_full"], hybrid["kv_groups"], hybrid["fa_head_share"]) == (3, 2, 0.25)
    assert hybrid["kv_bytes_per_token"] == kv_cache_bytes_per_token(fp, mask) == original["kv_bytes_per_token"] // 3
    assert hybrid["gdn_state_bytes_per_sequence"] == recurrent_state_bytes(fp, mask) and hybrid["eval_seconds"] >= 0


def _arm(status="done", value=0.5, lengths=(8, 16)):
    probes = ["needle_single", "needle_multikey", "kv_recall", "multihop", "ioi", "comparison"]
    accuracy = {p: {str(n): {"argmax": value, "beats_wrong": 1.0, "logit_diff": 0.1} for n in lengths} for p in probes}
    return {"kind": "random", "status": status, "accuracy": accuracy if status == "done" else None, "kv_bytes_per_token": 64,
            "fa_head_share": 0.125, "n_full": 1, "heldout_loss": {"8": 2.0, "16": 2.5}}


def test_markdown_lists_every_arm_and_names_the_ones_without_results():
    results = {"settings": {"lengths": [8, 16], "teacher_length": 8, "model_name": "m",
                            "probes": ["needle_single", "needle_multikey", "kv_recall", "multihop", "ioi", "comparison"]},
               "arms": {"teacher": dict(_arm(value=1.0), kind="teacher", kv_bytes_per_token=128), "a": _arm(),
                        "b": dict(_arm("failed"), error="boom")}, "notes": ["a note"]}
    table = results_markdown(results)
    assert "## Accuracy at 8 (1x) tokens" in table and "## Accuracy at 16 (2x) tokens" in table and "- a note" in table
    assert "| a | done | 1 | 0.12 | 64 | 0.50 | 2.000 | 2.500 | 0.50 | 0.50 | 0.50 | 0.50 |" in table
    assert "- **b**: failed: boom" in table
    assert capability_means(results["arms"]["a"], 8) == {"retrieval": 0.5, "reasoning": 0.5}
    assert all(math.isnan(v) for v in capability_means(results["arms"]["b"], 8).values())


@pytest.mark.parametrize(("n_layers", "ratio"), [(4, "3:1"), (12, "3:1"), (28, "3:1"), (8, "7:1"), (32, "7:1"), (36, "5:1")])
def test_evenly_spaced_layers_is_the_qwen3_next_layout_when_the_ratio_divides_the_depth(n_layers, ratio):
    fp = ModelFingerprint("qwen3", n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=8)
    reference = layerwise_mask(fp, ratio).full[:, 0].nonzero().flatten().tolist()
    assert evenly_spaced_layers(n_layers, ratio) == reference


def test_layerwise_arms_of_a_six_layer_model():
    fp = ModelFingerprint("qwen3", n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32)
    masks = {ratio: layerwise_arm_mask(fp, ratio) for ratio in ("3:1", "7:1")}
    assert masks["3:1"].full[:, 0].nonzero().flatten().tolist() == [2, 5] and masks["3:1"].n_full == 16
    assert masks["7:1"].full[:, 0].nonzero().flatten().tolist() == [5] and masks["7:1"].n_full == 8
    assert torch.equal(layerwise_arm_mask(ModelFingerprint("qwen3", 8, 8, 4, 32), "3:1").full,
                       layerwise_mask(ModelFingerprint("qwen3", 8, 8, 4, 32), "3:1").full)


def test_arm_plan_runs_transfer_and_mask_seeds_in_rounds_and_filters_by_family():
    arms = plan_arms(["early"], random_seeds=[0, 1], random_kinds=["kv"], transfer_seeds=[0, 1], seeded=["headwise_fused_7to1", "early"])
    assert arms == [("teacher", "teacher"), ("headwise_fused_7to1_t0", "fused"), ("early_t0", "file"), ("layerwise_3to1", "layerwise"),
                    ("layerwise_7to1", "layerwise"), ("headwise_randomkv_7to1_s0", "randomkv"),
                    ("headwise_fused_7to1_t1", "fused"), ("early_t1", "file"), ("headwise_randomkv_7to1_s1", "randomkv")]
    assert plan_arms(random_kinds=["plain", "kv"], only={"headwise_random_7to1", "layerwise_7to1"}) == [
        ("layerwise_7to1", "layerwise"), ("headwise_random_7to1_s0", "random"), ("headwise_random_7to1_s1", "random"),
        ("headwise_random_7to1_s2", "random")]
    with pytest.raises(HeadscopeError, match="seeded-arms"):
        plan_arms(transfer_seeds=[0], seeded=["headwise_fused"])
    with pytest.raises(HeadscopeError, match="unknown arms"):
        plan_arms(only={"layerwise_5to1"})


def test_layer_matched_random_arms_follow_the_kv_matched_ones_and_match_the_fused_mask():
    arms = plan_arms(random_seeds=[0, 1], random_kinds=["kv", "layer"])
    assert arms[4:] == [("headwise_randomkv_7to1_s0", "randomkv"), ("headwise_randomlayer_7to1_s0", "randomlayer"),
                        ("headwise_randomkv_7to1_s1", "randomkv"), ("headwise_randomlayer_7to1_s1", "randomlayer")]
    assert plan_arms(random_seeds=[0, 1, 2], random_kinds=["kv", "layer"], only={"headwise_randomlayer_7to1"}) == [
        (f"headwise_randomlayer_7to1_s{seed}", "randomlayer") for seed in range(3)]
    fp = ModelFingerprint("qwen3", 8, 8, 2, 16, "eight")
    fused = random_mask(fp, "7:1", seed=4)
    for name, kind in arms[4:]:
        made, seed = arm_mask(name, kind, fp, fused, {}), int(name[-1])
        expected = (kv_matched_random_mask if kind == "randomkv" else layer_matched_random_mask)(fused, seed)
        assert torch.equal(made.full, expected.full)
    assert arm_mask("headwise_randomlayer_7to1_s1", "randomlayer", fp, fused, {}).full.sum(1).tolist() == fused.full.sum(1).tolist()
    with pytest.raises(HeadscopeError, match="fused mask is missing"):
        arm_mask("headwise_randomlayer_7to1_s0", "randomlayer", fp, None, {})


def test_row_store_serves_exactly_the_library_rows_from_the_pool_and_on_a_miss():
    from headscope.probes.tasks import TASK_NAMES, sample_task_text, task_vocabulary
    from headscope.transfer.config import DataConfig
    from headscope.transfer.data import sequence_source
    from headscope.transfer.rowstore import RowStore
    from headscope.zoo.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary(), seed=0, samples_per_task=3)
    reference = sequence_source(DataConfig(source="demo_corpus"), 0, tokenizer)
    store = RowStore(DataConfig(source="demo_corpus"), 0, tokenizer, workers=1)
    try:
        seconds, tokens = store.fill([("train", 1, 48, 5), ("heldout", 0, 48, 3), ("heldout", 1, 48, 2)], chunk=2)
        assert tokens == (5 + 3) * 48 and seconds >= 0
        assert store.fill([("heldout", 0, 48, 3)])[1] == 0  # nothing left to generate
        stream, expected = store.stream("train", 1, 48), reference("train", 1, 48)
        assert stream.preshuffled and len(stream) == len(expected) and sorted(stream.store) == list(range(5))
        for index in range(7):  # rows 5 and 6 are generated on the spot
            assert torch.equal(stream[index], expected[index]) and stream[index].dtype == torch.int64
        held = store.stream("heldout", 2, 48)  # another stage's held-out stream is the same stream
        assert torch.equal(held[2], reference("heldout", 0, 48)[2]) and held.store is store.stream("heldout", 0, 48).store
        other_seed, expected = store.source(3)("train", 1, 48), sequence_source(DataConfig(source="demo_corpus"), 3, tokenizer)("train", 1, 48)
        assert store.fill([("train", 1, 48, 2)], seed=3)[1] == 2 * 48 and sorted(other_seed.store) == [0, 1]
        assert torch.equal(other_seed[1], expected[1]) and not torch.equal(other_seed[1], stream[1])  # a transfer seed reads its own rows
    finally:
        store.close()


def _scored(kind: str, retrieval: float, reasoning: float = 0.5, kv: int = 64) -> dict:
    accuracy = {p: {str(n): {"argmax": retrieval if p == "needle_single" else reasoning} for n in (8, 16)} for p in ("needle_single", "ioi")}
    return {"kind": kind, "status": "done", "accuracy": accuracy, "kv_bytes_per_token": kv, "heldout_loss": {"8": 1.0}}


def test_seed_summary_weighs_masks_equally_pools_transfer_noise_and_checks_the_goals():
    from headscope.seeds import arm_family, family_stats, goal_checks, mask_name, seeds_markdown

    settings = {"lengths": [8, 16], "teacher_length": 8, "retrieval_probes": ["needle_single"], "reasoning_probes": ["ioi"]}
    arms = {"headwise_fused_7to1_t0": _scored("fused", 0.80), "headwise_fused_7to1_t1": _scored("fused", 0.90),
            "headwise_randomkv_7to1_s0_t0": _scored("randomkv", 0.20), "headwise_randomkv_7to1_s0_t1": _scored("randomkv", 0.40),
            "headwise_randomkv_7to1_s1": _scored("randomkv", 0.60), "layerwise_3to1": _scored("layerwise", 0.81, 0.52, kv=128),
            "headwise_randomkv_7to1_s2": {"kind": "randomkv", "status": "failed"}}
    results = {"settings": settings, "arms": arms}
    assert mask_name("headwise_randomkv_7to1_s0_t1") == "headwise_randomkv_7to1_s0" and arm_family("headwise_randomkv_7to1_s0_t1") == "headwise_randomkv_7to1"
    families = family_stats(results)
    random_family = families["headwise_randomkv_7to1"]["metrics"]["retrieval@8"]
    assert random_family["mean"] == pytest.approx((0.30 + 0.60) / 2)  # mask s0 (two runs) weighs as much as mask s1
    assert random_family["sd"] == pytest.approx(math.sqrt(2) * 0.15) and random_family["n_masks"] == 2 and random_family["n_runs"] == 3
    assert random_family["transfer_sd"] == pytest.approx(math.sqrt(0.02))  # only mask s0 was run twice
    fused = families["headwise_fused_7to1"]["metrics"]["retrieval@8"]
    assert fused["mean"] == pytest.approx(0.85) and fused["transfer_sd"] == pytest.approx(math.sqrt(0.005)) and fused["sd"] is None
    goals = {(g["goal"], g.get("length")): g for g in goal_checks(results, families)}
    beats = goals[("beats_random", 8)]
    assert beats["margin"] == pytest.approx(0.40) and beats["threshold"] == pytest.approx(2 * math.sqrt(0.005)) and beats["met"] is True
    assert goals[("beats_random", 32)]["met"] is None and "not evaluated" in goals[("beats_random", 32)]["reason"]
    near = goals[("near_layerwise", None)]
    assert near["gaps"]["retrieval@8"] == pytest.approx(0.04) and near["gaps"]["reasoning@8"] == pytest.approx(-0.02)
    assert near["kv_at_most_half"] and near["met"] is True  # 2 points below on reasoning is still within 2 points
    arms["layerwise_3to1"] = _scored("layerwise", 0.81, 0.53, kv=128)
    assert goal_checks(results)[-1]["met"] is False
    text = seeds_markdown(results, families, goal_checks(results, families))
    assert "| headwise_randomkv_7to1 | 2 | 0,1 (runs: 3) | 64 | 0.45 ± 0.21 |" in text and "**met**" in text
    alone = {"settings": settings, "arms": {"headwise_fused_7to1_t0": arms["headwise_fused_7to1_t0"]}}
    assert "beats the random masks on retrieval at 8 tokens by more than 2 transfer sd: no random arm is done" in seeds_markdown(
        alone, family_stats(alone), goal_checks(alone))


def test_family_figure_draws_each_family_mean_with_its_mask_sd_and_every_run():
    from headscope.quality import family_figure
    from headscope.seeds import family_stats

    settings = {"lengths": [8, 16], "teacher_length": 8, "retrieval_probes": ["needle_single"], "reasoning_probes": ["ioi"], "model_name": "t"}
    arms = {"teacher": _scored("teacher", 0.9), "headwise_fused_7to1_t0": _scored("fused", 0.80), "headwise_fused_7to1_t1": _scored("fused", 0.90),
            "headwise_randomkv_7to1_s0": _scored("randomkv", 0.20), "headwise_randomkv_7to1_s1": _scored("randomkv", 0.60),
            "headwise_randomkv_7to1_s2": {"kind": "randomkv", "status": "failed"}}
    results = {"settings": settings, "arms": arms}
    figure = family_figure(results, family_stats(results))
    lines = {t.name: t for t in figure.data if t.mode == "lines+markers" and t.xaxis == "x"}
    assert set(lines) == {"teacher", "headwise_fused_7to1 (2 runs)", "headwise_randomkv_7to1 (2 masks, 2 runs)"}
    random_line = lines["headwise_randomkv_7to1 (2 masks, 2 runs)"]
    assert list(random_line.y) == pytest.approx([0.4, 0.4]) and list(random_line.error_y.array) == pytest.approx([math.sqrt(0.08)] * 2)
    assert random_line.line.dash == "dot" and lines["teacher"].line.dash == "dash" and not lines["teacher"].error_y.visible
    dots = [t for t in figure.data if t.mode == "markers" and t.xaxis == "x"]  # the runs of the families run more than once
    assert sorted(sorted(t.y) for t in dots) == [pytest.approx([0.2, 0.2, 0.6, 0.6]), pytest.approx([0.8, 0.8, 0.9, 0.9])]


def test_a_layer_matched_random_family_adds_its_own_goal_beside_the_kv_matched_one():
    from headscope.seeds import family_stats, goal_checks, seeds_markdown

    settings = {"lengths": [8, 16], "teacher_length": 8, "retrieval_probes": ["needle_single"], "reasoning_probes": ["ioi"]}
    arms = {"headwise_fused_7to1_t0": _scored("fused", 0.80), "headwise_fused_7to1_t1": _scored("fused", 0.90),
            "headwise_randomkv_7to1_s0": _scored("randomkv", 0.20), "layerwise_3to1": _scored("layerwise", 0.81, kv=128)}
    results = {"settings": settings, "arms": arms}
    without = goal_checks(results)
    arms.update({"headwise_randomlayer_7to1_s0": _scored("randomlayer", 0.60), "headwise_randomlayer_7to1_s1": _scored("randomlayer", 0.40),
                 "headwise_randomlayer_7to1_s2": {"kind": "randomlayer", "status": "pending"}})
    families = family_stats(results)
    checks = goal_checks(results, families)
    assert [(c["goal"], c.get("length")) for c in checks] == [("beats_random", 8), ("beats_random", 32), ("beats_layer_random", 8),
                                                             ("beats_layer_random", 32), ("near_layerwise", None)]
    assert [c for c in checks if c["goal"] != "beats_layer_random"] == without  # the primary goal is unchanged
    layer = checks[2]
    assert layer["random_family"] == "headwise_randomlayer_7to1" and layer["random_masks"] == 2 and "kv_matched" not in layer
    assert layer["random_mean"] == pytest.approx(0.50) and layer["margin"] == pytest.approx(0.35) and layer["met"] is True
    assert checks[3]["met"] is None and "not evaluated" in checks[3]["reason"]
    arms["headwise_randomlayer_7to1_s1"] = _scored("randomlayer", 0.90)  # mean 0.75: margin 0.10 < 2 x transfer sd 0.141
    assert goal_checks(results)[2]["met"] is False
    text = seeds_markdown(results, families, checks)
    assert "| headwise_randomlayer_7to1 | 2 | — (runs: 2) | 64 | 0.50 ± 0.14 |" in text
    assert ("**met**: headwise_fused_7to1 beats the layer-matched random headwise_randomlayer_7to1 (the same FA heads and KV groups "
            "in every layer) on retrieval at 8 tokens") in text
    assert "beats the KV-matched random headwise_randomkv_7to1 on retrieval at 8 tokens" in text


def test_shared_heads_count_heads_and_kv_groups_full_in_both_masks_and_refuse_another_model():
    a, b = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    a[0, 0] = a[1, 2] = a[1, 3] = True  # groups (0, 0) and (1, 1)
    b[0, 1] = b[1, 3] = True  # groups (0, 0) and (1, 1): one head in common, both groups
    assert HeadMask(a, FP).shared_with(HeadMask(b, FP)) == (1, 2) == HeadMask(b, FP).shared_with(HeadMask(a, FP))
    assert HeadMask(a, FP).shared_with(HeadMask(a, FP)) == (3, 2)
    other = ModelFingerprint("qwen3", n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8)
    with pytest.raises(HeadscopeError, match="different models"):
        HeadMask(a, FP).shared_with(HeadMask(a, other))


def test_the_table_and_overlap_figure_place_every_run_by_the_heads_it_shares_with_the_fused_mask():
    from headscope.maskfile import mask_to_dict
    from headscope.seeds import overlap_figure

    fused = torch.zeros(2, 4, dtype=torch.bool)
    fused[1, :2] = True
    near, far = fused.clone(), torch.zeros(2, 4, dtype=torch.bool)
    near[1, 1], near[1, 2] = False, True  # one head and one group in common
    far[0, 2] = far[0, 3] = True
    settings = {"lengths": [8, 16], "teacher_length": 8, "retrieval_probes": ["needle_single"], "reasoning_probes": ["ioi"],
                "probes": ["needle_single", "ioi"], "model_name": "t"}
    arms = {"teacher": _scored("teacher", 0.9), "headwise_fused_7to1": {**_scored("fused", 0.8), "mask": mask_to_dict(HeadMask(fused, FP))},
            "headwise_randomlayer_7to1_s0": {**_scored("randomlayer", 0.6), "mask": mask_to_dict(HeadMask(near, FP))},
            "headwise_randomkv_7to1_s0": {**_scored("randomkv", 0.1), "mask": mask_to_dict(HeadMask(far, FP))}}
    results = {"settings": settings, "arms": arms, "fused_mask": mask_to_dict(HeadMask(fused, FP))}
    table = results_markdown(results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[6] for line in table.splitlines() if line.startswith("| ") and "| done |" in line}
    assert "| shared |" in table and rows == {"teacher": "all", "headwise_fused_7to1": "2 (1)", "headwise_randomlayer_7to1_s0": "1 (1)",
                                              "headwise_randomkv_7to1_s0": "0 (0)"}
    figure = overlap_figure(results)
    points = {(t.name, t.xaxis): (list(t.x), list(t.y)) for t in figure.data}
    assert points[("headwise_randomlayer_7to1", "x")] == ([1], [pytest.approx(0.6)]) and points[("headwise_randomkv_7to1", "x2")][0] == [0]
    assert ("teacher", "x") not in points and len(figure.data) == 6  # 3 masked families x 2 lengths
    assert overlap_figure({**results, "fused_mask": None}) is None and "| shared |" not in results_markdown({**results, "fused_mask": None})
