"""benchmarks/decode_step_speed.py --smoke on the CPU: both models timed per row (and with the block ops eager), rows
written and skipped on a rerun, the summary reads every row file, bad rows are one clear line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("decode_step_speed")


def test_smoke_rows_resume_and_summary(benchmark, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--smoke", "--rows", "qwen3-1.7b:40:b2", "--steps", "2", "--rounds", "2", "--ablate"]
    assert benchmark.main(args) == 0
    row = json.loads((tmp_path / "decode_step_rows" / "qwen3-1.7b_40_b2.json").read_text())
    for name in benchmark.MODELS:
        assert row[name]["ms"] > 0 and row[name]["ms_eager_block_ops"] > 0 and len(row[name]["rounds"]) == 2
    assert row["ratio"] == row["original_graph"]["ms"] / row["hybrid_graph"]["ms"]
    assert all(row[name]["first_step_max_abs_dlogit_vs_eager_block_ops"] == 0.0 for name in benchmark.MODELS)  # CPU: the same torch ops
    assert all(row[name]["kernels_per_step"] is None for name in benchmark.MODELS)  # no CUDA activity to count on the CPU
    capsys.readouterr()
    assert benchmark.main(args) == 0 and "qwen3-1.7b_40_b2.json: recorded" in capsys.readouterr().out
    table = (tmp_path / "decode_step_speed.md").read_text()
    assert "| qwen3-1.7b | 40 | 2 | cpu |" in table and json.loads((tmp_path / "decode_step_speed.json").read_text())["qwen3-1.7b_40_b2"] == row


def test_the_cache_holds_the_context_and_the_step_writes_after_it(benchmark):
    bench = benchmark.Bench("qwen3-1.7b", type("A", (), {"smoke": True, "model": None, "mask": None})(), torch.device("cpu"), torch.float32)
    cache = benchmark.filled_cache(bench.hybrid, batch=2, context=30, extra=4, graphed=False, seed=0)
    layer = next(i for i, k in enumerate(cache.keys) if k is not None)
    assert cache.seen_tokens == 30 and int(cache.seen) == 30 and cache.valid[:, :30].all() and not cache.valid[:, 30:].any()
    assert cache.keys[layer][:, :, :30].std() > 0.5 and not cache.keys[layer][:, :, 30:].any()
    benchmark.time_steps(bench.hybrid, cache, bench.vocab, steps=1, rounds=1)
    assert cache.seen_tokens == 34 and cache.keys[layer][:, :, 30:34].abs().sum() > 0 and cache.valid[:, :34].all()


@pytest.mark.parametrize("rows", ["qwen3:40:b2", "qwen3-1.7b:40:2", "qwen3-1.7b:0:b2", "smollm2:40:b1"])
def test_bad_rows_are_one_clear_error(benchmark, rows, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--smoke", "--rows", rows])
    assert exit_info.value.code == 2 and "bad row" in capsys.readouterr().err and not (tmp_path / "decode_step_rows").exists()
