"""benchmarks/generate_speed.py --smoke end to end on the CPU: both model kinds (a random Qwen3 and a local
model directory), every variant timed and written per row, the static path's tokens equal to the eager
paths' (float32), the summary built from the row files, a rerun running only missing variants."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark, save_model, tiny_llama


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("generate_speed")


def test_smoke_rows_variants_and_resume(benchmark, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rows_dir = tmp_path / "rows"
    model_dir = save_model(tiny_llama(seed=3), tmp_path / "llama")
    common = ["--smoke", "--rows-dir", str(rows_dir), "--model", model_dir]
    assert benchmark.main(common + ["--rows", "qwen3-1.7b:40:b3,smollm2:16:b1", "--variants", "original,hybrid_eager,hybrid_graph"]) == 0
    row = json.loads((rows_dir / "qwen3-1.7b_40_b3.json").read_text())
    assert row["n_full_heads"] == 3 * 2 and set(row["variants"]) == {"original", "hybrid_eager", "hybrid_graph"}
    graph = row["variants"]["hybrid_graph"]
    assert graph["graph_equals_static_eager"] and graph["vs_hybrid_eager"]["match_fraction"] == 1.0  # float32: same tokens
    for result in row["variants"].values():
        assert result["ttft_ms"] > 0 and result["per_token_ms"] > 0 and len(result["new_tokens"]) == 3
        assert all(len(tokens) == 6 for tokens in result["new_tokens"])
    smol = json.loads((rows_dir / "smollm2_16_b1.json").read_text())
    assert "random KV-aware 7:1" in smol["mask"]  # the SmolLM2 mask file does not fit the tiny Llama
    before = (rows_dir / "qwen3-1.7b_40_b3.json").read_text()
    assert benchmark.main(common + ["--rows", "qwen3-1.7b:40:b3", "--variants", "original,original_compiled", "--prefill-chunk", "16"]) == 0
    after = json.loads((rows_dir / "qwen3-1.7b_40_b3.json").read_text())
    assert after["variants"]["hybrid_graph"] == json.loads(before)["variants"]["hybrid_graph"]  # kept, not rerun
    assert after["variants"]["original_compiled"]["vs_original"]["match_fraction"] == 1.0
    summary = (tmp_path / "out" / "generate_speed.md").read_text()
    assert "| qwen3-1.7b | 40 | 3 | hybrid_graph |" in summary and "| smollm2 | 16 | 1 | original |" in summary
    assert (tmp_path / "out" / "rows" / "smollm2_16_b1.json").is_file()  # the row files travel with $OUT


def test_bad_rows_are_one_clear_error(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--smoke", "--rows", "smollm2:16:b1"])
    assert exit_info.value.code == 2 and "needs --model" in capsys.readouterr().err


def test_original_compiled_reuses_one_static_cache_for_warm_up_and_timed_call(benchmark, one_thread):
    """The compiled original's graphs take the cache tensors as static addresses: the timed call must get the
    warm-up's cache (reset), not a fresh one whose new addresses would re-record the CUDA graphs mid-timing."""
    from types import SimpleNamespace

    bench = benchmark.Bench("qwen3-1.7b", SimpleNamespace(smoke=True, model=None, mask=None), torch.device("cpu"), torch.float32)
    seen, generate = [], bench.original.generate

    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        assert cache is not None and cache.get_seq_length() == 0  # passed in, and empty
        out = generate(*args, **kwargs)
        seen.append((id(cache), cache.layers[0].keys.data_ptr()))
        return out

    bench.original.generate = spy
    ids = torch.randint(0, bench.vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    compiled = benchmark.timed_generate(bench, "original_compiled", ids, 5, prefill_chunk=8)
    assert len(seen) == 2 and seen[0] == seen[1]
    bench.original.generate = generate
    assert compiled["new_tokens"] == benchmark.timed_generate(bench, "original", ids, 5)["new_tokens"]
    bench.release()
    assert bench._static is None


def test_summary_flags_a_graph_row_whose_capture_failed(benchmark):
    settings = {"device": "gpu", "dtype": "bfloat16", "torch": "t", "transformers": "t", "new_tokens": 4}
    timing = {"ttft_ms": 1.0, "per_token_ms": 0.5, "tokens_per_s": 8.0, "graph_equals_static_eager": True}
    for captured, flagged in ((True, False), (False, True)):
        rows = {"qwen3-1.7b:4096:b1": {"variants": {"hybrid_graph": {**timing, "graph_captured": captured}}}}
        line = next(x for x in benchmark.summary_lines(rows, settings) if "hybrid_graph" in x)
        assert ("capture failed" in line) == flagged
