"""benchmarks/scale_out.py --smoke: scoring, transfer and a killed rank on 1 and 2 CPU processes (gloo), end to end.

Its ``resume`` phase is the CPU test of a rank killed mid-run: rank 0 (the checkpoint writer) gets SIGKILL once
distill's checkpoint of step 2 is in place, ``torchrun --max-restarts 1`` starts both ranks again with
``--resume``, and the run must continue from the newest complete checkpoint and end with the weights and losses
of the uninterrupted 2-process run, bit for bit (same process count on the CPU).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_out.py"


def test_smoke_scores_trains_and_resumes_a_killed_rank(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_out_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "scale_out.json").read_text())

    scoring = results["scoring"]
    assert scoring["seconds_1"] > 0 and scoring["seconds_2"] > 0
    assert scoring["max_abs_diff"] <= 1e-5 * max(1.0, scoring["score_abs_max"])  # float32: 2 processes score as one

    transfer = results["transfer"]
    assert set(transfer["runs"]) == {"1", "2_ddp"}
    for stage in ("align", "distill"):
        one, two = transfer["runs"]["1"][stage], transfer["runs"]["2_ddp"][stage]
        assert len(one["loss"]) == len(two["loss"]) == 8 and one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
        assert transfer[f"2_ddp_{stage}_max_loss_diff"] < 1e-4  # the same global batches: one loss curve
        assert transfer[f"2_ddp_{stage}_speedup"] == two["tokens_per_s"] / one["tokens_per_s"]

    resume = results["resume"]
    assert resume["complete_at_kill"].startswith("s01-distill-") and int(resume["complete_at_kill"][-8:]) < 8  # killed mid-stage
    assert resume["resumed_from"] == resume["complete_at_kill"] and resume["every_step_once"] and resume["ok"]
    assert resume["weights_identical"] and resume["max_loss_diff"] == 0.0

    report = (tmp_path / "out" / "scale_out.md").read_text()
    assert "## Scoring" in report and "| 2_ddp | distill |" in report and "| True |" in report
