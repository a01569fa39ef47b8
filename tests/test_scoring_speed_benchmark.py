"""benchmarks/scoring_speed.py --quick end to end on the CPU (tiny random Qwen3, TransformerLens run for
real): every kind of row is written, the summary tables are built from the row files, a second call
skips the rows already done, and the time budget holds back a row that would not fit; and
benchmarks/prefix_reuse_cpu.py on one short probe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scoring_speed.py"
ROWS = "mix,ioi,long:128,truth:ioi,screen,agreement"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("scoring_speed_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_rows_resume_and_budget(benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rows_dir = tmp_path / "rows"
    common = ["--quick", "--rows-dir", str(rows_dir)]
    assert benchmark.main(common + ["--rows", ROWS]) == 0
    files = {f.name: f.stat().st_mtime_ns for f in rows_dir.glob("*.json")}
    assert sorted(files) == sorted(["mix.json", "ioi.json", "long_128.json", "truth_ioi.json", "screen.json", "agreement.json"])
    mix = json.loads((rows_dir / "mix.json").read_text())
    assert mix["pairs"] == 7 and 0 < mix["shared_prefix_mean"] < 1 and mix["transformer_lens_s"] > 0
    assert mix["max_abs_diff_vs_no_prefix"] < 1e-5 and mix["max_abs_diff_vs_tl"] < 1e-4  # float32 in --quick
    assert len(mix["scores"]) == 2 and len(mix["scores"][0]) == 4
    long = json.loads((rows_dir / "long_128.json").read_text())
    assert long["batch_initial_rows"] >= 1 and "estimated" in long["transformer_lens"]
    assert json.loads((rows_dir / "truth_ioi.json").read_text())["max_rel_diff_vs_fp32"] < 1e-5  # float32 vs float32
    screen = json.loads((rows_dir / "screen.json").read_text())
    assert [point["top_k"] for point in screen["curve"]] == [2, 4] and screen["curve"][-1]["verified_max_abs_diff"] < 1e-5
    summary = json.loads((tmp_path / "out" / "scoring_speed_quick.json").read_text())
    assert list(summary["rows"]) == ["mix", "screen", "ioi", "long:128", "agreement", "truth:ioi"]
    table = (tmp_path / "out" / "scoring_speed_quick.md").read_text()
    assert "| mix | 7 x 64 |" in table and "| long:128 | 1 |" in table and "| 4 |" in table and "Float32 agreement" in table
    assert (tmp_path / "out" / "rows" / "mix.json").is_file()  # row files mirrored to $OUT
    capsys.readouterr()

    assert benchmark.main(common + ["--rows", ROWS]) == 0  # resumed: nothing to do
    assert "6 of 6 rows done" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in rows_dir.glob("*.json")} == files

    (rows_dir / "ioi.json").unlink()
    assert benchmark.main(common + ["--rows", "ioi", "--budget", "0"]) == 0  # mix, a row of its kind, took > 0 s
    assert "ioi: not started" in capsys.readouterr().out and not (rows_dir / "ioi.json").exists()
    with pytest.raises(SystemExit):
        benchmark.main(common + ["--rows", "bogus"])


def test_prefix_reuse_cpu_benchmark(tmp_path, monkeypatch):
    """benchmarks/prefix_reuse_cpu.py on one short probe of the demo model: both timings, equal scores."""
    spec = importlib.util.spec_from_file_location("prefix_reuse_cpu", BENCHMARK.parent / "prefix_reuse_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--length", "64", "--pairs", "1", "--probes", "ioi"]) == 0
    (row,) = json.loads((tmp_path / "prefix_reuse_cpu.json").read_text())["probes"]
    assert row["probe"] == "ioi" and row["shared_mean"] > 0.5 and row["full_cpu_s"] > 0 and row["reuse_cpu_s"] > 0
    assert row["max_abs_diff"] < 1e-5
    assert "| ioi |" in (tmp_path / "prefix_reuse_cpu.md").read_text()
