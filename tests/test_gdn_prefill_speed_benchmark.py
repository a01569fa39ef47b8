"""benchmarks/gdn_prefill_speed.py --tiny on the CPU, with the fused kernels through the Triton interpreter: every
section runs, the fused configs agree with the float32 reference, every path has core and layer rows, and
the summary reads the goals and the fused path's break-even from the rows."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("gdn_prefill_speed")


def test_tiny_run_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gdn_prefill_speed.py"), "--tiny", "--configs", "32,16", "--batched", "2x16"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gdn_prefill_speed.json").read_text())
    assert result["meta"]["interpreter"] and not result["meta"]["errors"] and "partial" not in result["meta"]
    assert result["meta"]["layer_config"] == 16  # default_block_v: 3 heads fit in one wave
    rows = result["rows"]
    kernel_check = next(r for r in rows if r["phase"] == "check" and r["scope"] == "kernel")
    assert set(kernel_check["errors"]) == {"fused_v32", "fused_v16"}
    assert all(e["o"] < 1e-5 and e["state"] < 1e-5 for e in kernel_check["errors"].values())  # float32
    timed = {(r["scope"], r["path"]) for r in rows if r["phase"] == "prefill"}
    paths = ("full", "hybrid_fla", "hybrid_fla_scale", "hybrid_fused", "hybrid_all", "full_qknorm", "hybrid_gdn_first", "hybrid_flash")
    assert timed == {(scope, path) for scope in ("core", "layer") for path in paths} | {
        ("kernel", "fused_v32"), ("kernel", "fused_v16")}
    assert all(r["ms"] > 0 and r["host_ms"] > 0 and r["b2b_ms"] > 0 and r["launches"] is None for r in rows if r["phase"] == "prefill")  # no CUDA: no launch counts
    interleaved = [r for r in rows if r["phase"] == "prefill" and r["scope"] != "kernel"]  # core and layer rows: median of rounds
    assert all(len(r["ms_rounds"]) == 2 and min(r["ms_rounds"]) <= r["ms"] <= max(r["ms_rounds"]) for r in interleaved)
    assert all(len(r["b2b_ms_rounds"]) == 2 and min(r["b2b_ms_rounds"]) <= r["b2b_ms"] <= max(r["b2b_ms_rounds"]) for r in interleaved)
    assert {(r["batch"], r["context"]) for r in rows if r["phase"] == "prefill" and r["scope"] == "kernel"} == {(1, 64), (2, 16)}  # --batched replaces the default 2x32
    profiles = {(r["scope"], r["path"]): r for r in rows if r["phase"] == "profile"}
    assert set(profiles) == {(scope, path) for scope in ("core", "layer") for path in ("hybrid_all", "full_qknorm")}
    assert all(r["host_us"] > 0 and any("core" in f[0] for f in r["functions"]) for r in profiles.values() if r["scope"] == "core")
    report = (tmp_path / "gdn_prefill_speed.md").read_text()
    assert "## Prefill, attention core" in report and "## The GDN call alone (3 heads)" in report and "fused_v16" in report
    assert "## Host profile: core of hybrid_all at T = 64" in report


def test_qk_norm_check_flags_a_faulty_kernel(benchmark, monkeypatch):
    pytest.importorskip("triton")
    import headscope.kernels.qk_norm.ops as qk_ops
    import headscope.kernels.qk_norm.triton_qk_norm as triton_qk_norm
    from headscope.kernels.qk_norm.naive import head_rms_norm_reference

    def run_check():
        run = benchmark.Run(torch.device("cpu"), torch.float32, benchmark.Shape(hidden=64, heads=5, kv_heads=1, head_dim=16, mlp=128), True, ())
        benchmark.check_qk_norm(run, 20)
        return run

    def kernel(q, k, q_weight, k_weight, eps, faulty=False):  # a right kernel, or one whose keys get the query weight
        return head_rms_norm_reference(q, q_weight, eps), head_rms_norm_reference(k, q_weight if faulty else k_weight, eps)

    monkeypatch.setattr(qk_ops, "use_triton", lambda *tensors: qk_ops.FUSED)  # the kernel path, as on CUDA
    monkeypatch.setattr(triton_qk_norm, "triton_qk_rms_norm", kernel)
    run = run_check()
    assert not run.errors and set(run.rows[0]["errors"]) == {"kernel_T20", "torch_T20", "kernel_T1", "torch_T1"}
    monkeypatch.setattr(triton_qk_norm, "triton_qk_rms_norm", partial(kernel, faulty=True))
    run = run_check()
    assert len(run.errors) == 2 and "q/k norm kernel" in run.errors[0]


def test_summary_ratios_and_break_even(benchmark):
    rows = []
    for t, fused_ms in ((1024, 0.2), (2048, 0.3), (4096, 0.6)):
        rows += [{"phase": "prefill", "scope": "kernel", "path": "fla+gates", "context": t, "ms": 0.5},
                 {"phase": "prefill", "scope": "kernel", "path": "fused_v32", "context": t, "ms": fused_ms},
                 {"phase": "prefill", "scope": "kernel", "path": "fused_v16", "context": t, "ms": fused_ms * 0.9}]
        for scope, full in (("core", 0.4), ("layer", 1.6)):
            for path, ms in (("full", full), ("hybrid_fla", 3 * full), ("hybrid_fla_scale", 2.5 * full), ("hybrid_fused", 1.5 * full),
                             ("hybrid_all", 1.25 * full), ("full_qknorm", 0.5 * full)):
                rows.append({"phase": "prefill", "scope": scope, "path": path, "context": t, "ms": ms, "b2b_ms": ms * (0.8 if path == "hybrid_all" else 1.0),
                             "launches": {"busy_ms": ms * (0.5 if path == "hybrid_all" else 0.6)}})
    summary = benchmark.summarise(rows, [1024, 2048, 4096], 32)
    assert summary["fused_faster_at"] == [1024, 2048]  # 0.6 ms > fla's 0.5 at 4K
    assert summary["per_context"][4096]["kernel"]["best_fused"] == "fused_v16"
    assert summary["goals"]["core_4k_over_full"]["value"] == pytest.approx(1.25)
    assert summary["goals"]["layer_4k_over_full"]["before"] == pytest.approx(3.0)
    assert summary["goals"]["layer_4k_over_full"]["vs_full_qknorm"] == pytest.approx(2.5)
    assert summary["goals"]["core_4k_over_full"]["back_to_back"] == pytest.approx(1.0)  # 0.8 x 1.25 over full's 1.0 x
    assert summary["goals"]["layer_4k_over_full"]["back_to_back_vs_full_qknorm"] == pytest.approx(2.0)
    assert summary["goals"]["core_4k_over_full"]["gpu_work"] == pytest.approx(1.25 * 0.5 / 0.6)  # the GPU's kernel time alone
    assert summary["goals"]["layer_4k_over_full"]["gpu_work_vs_full_qknorm"] == pytest.approx(2.5 * 0.5 / 0.6)
    assert summary["goals"]["core_4k_over_full"]["paired_rounds"] is None  # one round: no rounds recorded
    four_k = {(r["scope"], r["path"]): r for r in rows if r.get("context") == 4096 and r["scope"] in ("core", "layer")}
    four_k["core", "full"]["ms_rounds"] = [0.4, 0.8, 0.4]  # the host slowed down in round 2, for both paths
    four_k["core", "hybrid_all"]["ms_rounds"] = [0.5, 1.0, 0.9]
    four_k["layer", "hybrid_all"]["ms_rounds"], four_k["layer", "full_qknorm"]["ms_rounds"] = [3.0, 2.0], [1.0, 1.0]
    four_k["layer", "hybrid_gdn_first"] = {**four_k["layer", "hybrid_all"], "path": "hybrid_gdn_first", "ms": 1.2}
    rows.append(four_k["layer", "hybrid_gdn_first"])
    goals = benchmark.summarise(rows, [1024, 2048, 4096], 32)["goals"]
    assert goals["core_4k_over_full"]["paired_rounds"] == pytest.approx(1.25)  # rounds 1.25, 1.25, 2.25 (medians' ratio 0.9 / 0.4)
    assert goals["layer_4k_over_full"]["paired_rounds_vs_full_qknorm"] == pytest.approx(2.5)
    assert goals["layer_4k_over_full"]["paired_rounds"] is None  # full has no rounds there
    assert goals["core_4k_over_full"]["best_rounds"] == pytest.approx(0.5 / 0.4)
    assert goals["layer_4k_over_full"]["best_rounds_vs_full_qknorm"] == pytest.approx(2.0)
    assert goals["layer_4k_over_full"]["gdn_first"] == pytest.approx(1.2 / 1.6)
    assert goals["core_4k_over_full"]["gdn_first"] is None  # not timed in these rows
    core_line, layer_line = benchmark.goal_lines(goals)
    assert "paired rounds 1.25;" in core_line and "gdn first -;" in core_line
    assert "paired rounds -;" in layer_line and "paired rounds vs full qknorm 2.5;" in layer_line and "gdn first 0.75;" in layer_line
    rows[-2]["launches"] = None  # a CPU run: no GPU work recorded
    assert benchmark.summarise(rows, [1024, 2048, 4096], 32)["goals"]["layer_4k_over_full"]["gpu_work_vs_full_qknorm"] is None
    rows.append({**four_k["core", "hybrid_all"], "path": "hybrid_flash", "ms": 1.0, "ms_rounds": [1.0, 1.25, 0.9]})  # ATen flash for the FA heads
    core = benchmark.summarise(rows, [1024, 2048, 4096], 32)["goals"]["core_4k_over_full"]
    assert core["with_flash"] == pytest.approx(1.0 / 0.4)
    assert core["own_fa_over_flash_paired_rounds"] == pytest.approx(0.8)  # rounds 0.5, 0.8, 1.0
    assert "with flash 2.5; own fa over flash paired rounds 0.8)" in benchmark.goal_lines({"core": core})[0]


def test_summary_only_recomputes_a_recorded_run(benchmark, tmp_path, monkeypatch):
    """The committed H200 run's rows, summarised again without timing anything: the rows stay, the goal lines gain
    every ratio the summary now has; without a recorded run, one line and exit 2, nothing written."""
    import shutil

    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--summary-only"])
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())
    shutil.copy(ROOT / "benchmarks" / "results" / "gdn_prefill_speed.json", tmp_path)
    before = json.loads((tmp_path / "gdn_prefill_speed.json").read_text())
    assert benchmark.main(["--summary-only"]) == 0
    after = json.loads((tmp_path / "gdn_prefill_speed.json").read_text())
    assert after["rows"] == before["rows"] and after["meta"] == before["meta"]
    goals = after["summary"]["goals"]
    assert goals == benchmark.summarise(before["rows"], sorted(int(t) for t in after["summary"]["per_context"]), before["meta"]["layer_config"])["goals"]
    assert "paired rounds" in (tmp_path / "gdn_prefill_speed.md").read_text()


def test_idle_gaps_between_a_calls_kernels(benchmark):
    """Kernels of one call as (name, start us, end us), out of order and one overlapping another (a second
    stream): the GPU idles 20 us before 'scan' and 5 us before 'epilogue', nowhere else."""
    spans = [("scan", 150.0, 400.0), ("flash", 0.0, 100.0), ("prep", 90.0, 130.0), ("epilogue", 405.0, 410.0)]
    gaps = benchmark.idle_gaps(spans)
    assert gaps["largest"] == [[0.02, "scan"], [0.005, "epilogue"]]
    assert abs(gaps["idle_ms"] - 0.025) < 1e-12 and gaps["span_ms"] == 0.41
    assert benchmark.idle_gaps([]) == {"idle_ms": 0, "span_ms": 0.0, "largest": []}


def test_a_run_cut_short_keeps_what_it_measured(benchmark, tmp_path, monkeypatch):
    """The files are written after every section: a run stopped in its kernel sections (an outer timeout) leaves
    the check and prefill rows, marked partial."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(benchmark, "bench_prefill", lambda run, t: run.rows.append(
        {"phase": "prefill", "scope": "core", "path": "full", "context": t, "ms": 1.0, "host_ms": 1.0, "b2b_ms": 1.0, "launches": None}))
    monkeypatch.setattr(benchmark, "check", lambda run: None)
    monkeypatch.setattr(benchmark, "profile_host", lambda run, t: None)

    def killed(run, *args):
        raise KeyboardInterrupt  # what a timeout's signal does to the section in progress

    monkeypatch.setattr(benchmark, "bench_kernel", killed)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--tiny"])
    result = json.loads((tmp_path / "gdn_prefill_speed.json").read_text())
    assert result["meta"]["partial"] and [r["phase"] for r in result["rows"]] == ["prefill"]
    assert "**Partial run**" in (tmp_path / "gdn_prefill_speed.md").read_text()


def test_batched_shapes_parse_and_refuse(benchmark):
    assert benchmark.batch_shapes("8x1024,32x4096") == ((8, 1024), (32, 4096))
    for bad in ("8x", "8*1024", "0x64", "1x64", "8x1024,x2", "8x64,8x64"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.batch_shapes(bad)
