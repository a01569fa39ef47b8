"""benchmarks/hybrid_quality.py --smoke: every arm trains and is evaluated at every length, on the CPU.

One smoke run (tiny random Qwen3 with the demo model's head layout, so the test does not depend on the
trained demo model) is shared by the tests; a second call checks resume and the retry of a failed arm.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from headscope.heads import HeadscopeError

pytestmark = pytest.mark.usefixtures("one_thread")
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_quality.py"
ARMS = ["teacher", "headwise_fused_7to1", "layerwise_3to1", "layerwise_7to1",
        "headwise_random_7to1_s0", "headwise_random_7to1_s1", "headwise_random_7to1_s2"]
PROBES = ["needle_single", "needle_multikey", "kv_recall", "multihop", "ioi", "comparison"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("hybrid_quality_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_quality")
    argv = ["--smoke", "--tiny-model", "--out", str(root / "out"), "--work", str(root / "work")]
    benchmark = load_benchmark()
    assert benchmark.main(argv) == 0
    return benchmark, argv, root / "out"


def read(out: Path) -> dict:
    return json.loads((out / "hybrid_quality.json").read_text())


def test_every_arm_has_every_metric_at_every_length(smoke):
    _, _, out = smoke
    data = read(out)
    lengths = data["settings"]["lengths"]
    assert lengths == [48, 96, 192, 384] and list(data["arms"]) == ARMS
    for name, arm in data["arms"].items():
        assert arm["status"] == "done", (name, arm.get("error"), arm.get("traceback"))
        assert sorted(arm["accuracy"]) == sorted(PROBES)
        for probe in PROBES:
            assert sorted(arm["accuracy"][probe], key=int) == [str(n) for n in lengths]
            for cell in arm["accuracy"][probe].values():
                assert 0.0 <= cell["argmax"] <= 1.0 and 0.0 <= cell["beats_wrong"] <= 1.0 and math.isfinite(cell["logit_diff"])
        assert all(math.isfinite(v) and v > 0 for v in arm["heldout_loss"].values()) and len(arm["heldout_loss"]) == 2
    teacher = data["arms"]["teacher"]
    assert teacher["kv_bytes_per_token"] == 6 * 4 * 16 * 2 * 2 and teacher["fa_head_share"] == 1.0
    for name in ARMS[1:]:
        arm = data["arms"][name]
        assert arm["kv_bytes_per_token"] < teacher["kv_bytes_per_token"] and arm["gdn_state_bytes_per_sequence"] > 0
        if name.startswith("headwise"):
            assert arm["n_full"] == 6 and arm["fa_head_share"] == 6 / 48


def test_the_token_budget_is_identical_for_every_hybrid_arm(smoke):
    _, _, out = smoke
    data = read(out)
    steps = data["budget"]["steps"]
    budgets = {name: [(s["steps"], s["tokens"], s["seq_len"]) for s in arm["training"]["stages"]]
               for name, arm in data["arms"].items() if name != "teacher"}
    assert len(set(map(tuple, budgets.values()))) == 1
    assert [s for s, _, _ in next(iter(budgets.values()))] == steps
    assert [n for _, _, n in budgets["layerwise_3to1"]] == [48, 48, 96]  # stage 3 at twice the teacher's length
    assert data["budget"]["calibration"]["step_seconds"] and "training budget per hybrid arm" in data["budget"]["description"]
    layers = {name: data["arms"][name]["mask"]["provenance"]["selection"]["full_layers"] for name in ("layerwise_3to1", "layerwise_7to1")}
    assert layers == {"layerwise_3to1": [2, 5], "layerwise_7to1": [5]}


def test_table_and_figure_list_every_arm_and_length(smoke):
    _, _, out = smoke
    table = (out / "hybrid_quality.md").read_text()
    for length, label in zip((48, 96, 192, 384), ("1x", "2x", "4x", "8x")):
        assert f"## Accuracy at {length} ({label}) tokens" in table
        assert f"retrieval {length} ({label})" in table and f"reasoning {length} ({label})" in table
    arm_tables, seed_tables = table.split("## Seeds")
    rows = [line for line in arm_tables.splitlines() if line.startswith("| ")]
    for name in ARMS:
        mine = [row for row in rows if row.startswith(f"| {name} |")]
        assert len(mine) == 5  # the summary table and one table per length
        assert all("—" not in row for row in mine)
    assert "| headwise_random_7to1 | 3 | 0 (runs: 3) | 384 |" in seed_tables  # three random masks, each trained with --seed 0
    assert "plain (not KV-matched) random headwise_random_7to1" in seed_tables
    assert "Arms without results" not in table
    page = (out / "hybrid_quality.html").read_text()
    assert all(name in page for name in ARMS)
    assert "Arm families vs context length" in page and "headwise_random_7to1 (3 masks, 3 runs)" in page  # family_figure, first
    assert page.index("Arm families vs context length") < page.index("Probe accuracy vs context length") and page.count("cdn.plot.ly") == 1
    logs = sorted(p.stem for p in (out / "hybrid_quality_logs").glob("*.jsonl"))
    assert logs == sorted(ARMS[1:])


def test_a_rerun_keeps_finished_arms_and_retries_a_failed_one(smoke):
    benchmark, argv, out = smoke
    data = read(out)
    kept = data["arms"]["headwise_random_7to1_s1"]
    data["arms"]["layerwise_7to1"] = {"kind": "layerwise", "status": "failed", "error": "simulated"}
    (out / "hybrid_quality.json").write_text(json.dumps(data))
    assert benchmark.main(argv) == 0
    again = read(out)
    assert again["arms"]["layerwise_7to1"]["status"] == "done"
    assert again["arms"]["headwise_random_7to1_s1"] == kept
    assert again["budget"] == data["budget"]
    (out / "hybrid_quality.json").unlink()  # an empty --out (the device tool's $OUT): resume from the work copy
    assert benchmark.main(argv) == 0
    assert read(out)["arms"] == again["arms"]
    with pytest.raises(HeadscopeError, match="pairs"):
        benchmark.main(argv + ["--pairs", "3"])


def test_hybrid_options_reach_every_student_and_the_settings(smoke, tmp_path, monkeypatch):
    import headscope.transfer

    benchmark, _, _ = smoke
    assert benchmark.parse_args(["--hybrid-option", "fa_rope=true", "--hybrid-option", "attn_scale=0.2"]).hybrid_options == {
        "fa_rope": True, "attn_scale": 0.2}
    for bad in ("not_a_switch=1", "fa_rope", "fa_rope=yes"):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.parse_args(["--hybrid-option", bad])
        assert exit_info.value.code == 2
    seen, build = [], headscope.transfer.build_student
    monkeypatch.setattr(headscope.transfer, "build_student", lambda teacher, mask, options: seen.append(options) or build(teacher, mask, options))
    argv = ["--smoke", "--tiny-model", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--arms", "teacher,layerwise_7to1", "--hybrid-option", "fa_rope=true"]
    assert benchmark.main(argv) == 0
    assert seen == [{"fa_rope": True}] * len(seen) and seen
    assert read(tmp_path / "out")["settings"]["hybrid_options"] == {"fa_rope": True}


def test_shards_merge_into_the_plan_order_with_one_budget(smoke, tmp_path):
    benchmark, _, _ = smoke
    model = benchmark.build_tiny_model(tmp_path / "tiny", benchmark.SMOKE_LENGTH)  # one teacher for both shards
    common = ["--smoke", "--model", str(model), "--steps", "1,1,1", "--random-seeds", "0,1",
              "--arms", "teacher,layerwise_7to1,headwise_random_7to1_s0,headwise_random_7to1_s1"]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--shard", "0/2"])  # no --steps: shards would calibrate different budgets
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--shard", "2/2", "--steps", "1,1,1"])
    outs = []
    for index in range(2):
        out = tmp_path / f"out{index}"
        assert benchmark.main(common + ["--shard", f"{index}/2", "--out", str(out), "--work", str(tmp_path / f"work{index}")]) == 0
        outs.append(out)
    assert list(read(outs[0])["arms"]) == ["teacher", "layerwise_7to1", "headwise_random_7to1_s1"]
    assert list(read(outs[1])["arms"]) == ["headwise_random_7to1_s0"]
    merged = tmp_path / "merged"
    assert benchmark.main(common + ["--merge", f"{outs[0]},{outs[1]}", "--out", str(merged), "--work", str(tmp_path / "wm")]) == 0
    data = read(merged)
    assert list(data["arms"]) == ["teacher", "layerwise_7to1", "headwise_random_7to1_s0", "headwise_random_7to1_s1"]
    assert all(arm["status"] == "done" for arm in data["arms"].values())
    assert data["summary"]["families"] and (merged / "hybrid_quality.md").is_file()
    other = read(outs[1])
    other["budget"] = {**other["budget"], "steps": [9, 9, 9]}
    (outs[1] / "hybrid_quality.json").write_text(json.dumps(other))
    with pytest.raises(HeadscopeError, match="budget"):
        benchmark.main(common + ["--merge", f"{outs[0]},{outs[1]}", "--out", str(tmp_path / "m2")])


def test_random_kinds_from_flags_and_list():
    parse = load_benchmark().parse_args
    assert parse([]).random_kind == ["plain"] and parse(["--layer-matched"]).random_kind == ["layer"]
    assert parse(["--kv-matched", "--layer-matched"]).random_kind == parse(["--random-kind", "kv,layer"]).random_kind == ["kv", "layer"]
    with pytest.raises(SystemExit) as exit_info:
        parse(["--random-kind", "kv,layers"])
    assert exit_info.value.code == 2
