"""benchmarks/generate_speed.py --smoke end to end on the CPU: both model kinds (a random Qwen3 and a local
model directory), every variant timed and written per row, the static paths' tokens (the hybrid's and the
original's all-FA twin, original_graph) equal to the eager paths' (float32) and consistent with the float32
reference, the summary built from the row files (also alone: --summary-only), a rerun running only missing
variants; the graph check prefilling as the timed call did; the memory guard's decisions at the H200 rows'
shapes; the per-token table pairing both baselines with the hybrid at one batch, '-' and why where a side is
missing; --prompt-file prompts (tiled text, recorded per row, never mixed with random ones in a row; a bad
file is one line, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark, save_model, tiny_llama, tiny_qwen3


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
    assert row["prompt"] == "random ids"
    for result in row["variants"].values():
        assert result["ttft_ms"] > 0 and result["per_token_ms"] > 0 and len(result["new_tokens"]) == 3
        assert all(len(tokens) == 6 for tokens in result["new_tokens"])
        check = result["reference_check"]
        assert check["rows"] == 1 and check["checked_tokens"] == 4 and check["consistent"] == 4 and check["max_gap"] < 1e-4
    assert set(graph["phase_s"]) == {"timed", "graph_check", "reference_check"} and set(row["variants"]["original"]["phase_s"]) == {"timed", "reference_check"}
    assert all(seconds >= 0 for seconds in graph["phase_s"].values())
    for name in ("original", "hybrid_eager", "hybrid_graph"):  # a short row: TTFT again in 2 interleaved rounds (--smoke)
        assert len(row["variants"][name]["ttft_rounds_ms"]) == 2 and min(row["variants"][name]["ttft_rounds_ms"]) > 0
        assert "ttft_gpu" not in row["variants"][name]  # no GPU work without CUDA
    smol = json.loads((rows_dir / "smollm2_16_b1.json").read_text())
    assert "random KV-aware 7:1" in smol["mask"]  # the SmolLM2 mask file does not fit the tiny Llama
    before = (rows_dir / "qwen3-1.7b_40_b3.json").read_text()
    (tmp_path / "out" / "rows" / "smollm2_16_b1.json").unlink()  # only the rows a run saves reach $OUT (a box returns 8 files)
    assert benchmark.main(common + ["--rows", "qwen3-1.7b:40:b3", "--variants", "original,original_compiled,original_graph",
                                    "--prefill-chunk", "16"]) == 0
    after = json.loads((rows_dir / "qwen3-1.7b_40_b3.json").read_text())
    rounds = ("ttft_rounds_ms", "per_token_rounds_ms")
    kept = {k: v for k, v in after["variants"]["hybrid_graph"].items() if k not in rounds}
    assert kept == {k: v for k, v in json.loads(before)["variants"]["hybrid_graph"].items() if k not in rounds}  # not rerun
    for name in ("hybrid_graph", "original_graph"):  # (timed again beside the new variants: TTFT, and per token for the graphs)
        assert all(len(after["variants"][name][key]) == 2 for key in rounds)
    assert "per_token_rounds_ms" not in after["variants"]["original"]  # (an eager variant: 256 tokens would take it 10-20 s)
    table = [line for line in benchmark.summary_lines({"r": after}) if line.startswith("| qwen3-1.7b | 40 | 3 | random ids | cpu |")]
    assert len(table) == 1 and table[0].endswith("x |")  # original_graph's median over hybrid_graph's, from one run
    assert after["variants"]["original_compiled"]["run"] == after["variants"]["original_graph"]["run"] != after["variants"]["hybrid_graph"]["run"]
    line = [line for line in benchmark.summary_lines({"r": after}) if line.startswith("| qwen3-1.7b | 40 | 3 |") and line.count("|") == 11]
    assert len(line) == 1 and "x (not side by side) |" in line[0]  # original_graph (this run) against the first run's hybrid
    assert after["variants"]["original_compiled"]["vs_original"]["match_fraction"] == 1.0
    twin = after["variants"]["original_graph"]  # the original on the hybrid's static path: its tokens, checked against the original
    assert twin["vs_original"]["match_fraction"] == 1.0 and twin["graph_equals_static_eager"] and twin["reference_check"]["max_gap"] < 1e-4
    mirrored = json.loads((tmp_path / "out" / "rows" / "qwen3-1.7b_40_b3.json").read_text())
    assert "original_graph" in mirrored["variants"]  # each save reaches $OUT, not only the end of the run
    assert twin["estimated_cache_gb"] > 0 and after["weights_gb"] > 0 and set(after["sdpa_backends"]) == {
        "hf_static_decode", "gqa_masked_decode", "gqa_decode", "gqa_chunk_prefill"}
    assert after["sdpa_backends"]["gqa_chunk_prefill"].startswith("materialised mask, ")  # the CPU: CausalBias materialises
    summary = (tmp_path / "out" / "generate_speed.md").read_text()
    assert "| qwen3-1.7b | 40 | 3 | random ids | one pass | hybrid_graph |" in summary
    assert "## Time to first token, interleaved rounds" in summary and "2 rounds)" in summary
    assert "| qwen3-1.7b | 40 | 3 | random ids | chunks of 16 | original_compiled |" in summary
    assert "| qwen3-1.7b | 40 | 3 | random ids | chunks of 16 | original_graph |" in summary
    assert "| smollm2 | 16 | 1 | random ids | one pass | original |" in summary
    assert "| smollm2 | 16 | 1 | random ids | " in summary.split("## Per-token")[1]  # a pair row (twin and hybrid not run there)
    assert not (tmp_path / "out" / "rows" / "smollm2_16_b1.json").exists()  # not run this time: not copied again
    smol = json.loads((rows_dir / "smollm2_16_b1.json").read_text())
    smol["variants"]["original"] = {"skipped": "needs ~9 GB + 4 GB headroom, 8 GB free"}  # a skipped variant runs again
    smol["variants"]["hybrid_eager"][benchmark.UNCHECKED] = True  # as if killed in its checks: timed and checked again
    (rows_dir / "smollm2_16_b1.json").write_text(json.dumps(smol))
    assert benchmark.main(common + ["--rows", "smollm2:16:b1", "--variants", "original,original_graph,hybrid_eager"]) == 0
    assert (tmp_path / "out" / "rows" / "smollm2_16_b1.json").is_file()  # the row files a run saves travel with $OUT
    smol = json.loads((rows_dir / "smollm2_16_b1.json").read_text())
    eager = smol["variants"]["hybrid_eager"]
    assert benchmark.UNCHECKED not in eager and eager["reference_check"]["consistent"] == eager["reference_check"]["checked_tokens"]
    assert "per_token_ms" in smol["variants"]["original"] and set(smol["variants"]) == {"original", "original_graph", "hybrid_eager", "hybrid_graph"}
    twin = smol["variants"]["original_graph"]  # an untied model (its tokens are not one repeated token), the static path's tokens
    assert twin["vs_original"]["match_fraction"] == 1.0 and twin["graph_equals_static_eager"] and len(set(twin["new_tokens"][0])) > 1
    smol["variants"]["hybrid_eager"][benchmark.UNCHECKED] = True  # every asked-for variant timed, one unchecked: the row still runs
    (rows_dir / "smollm2_16_b1.json").write_text(json.dumps(smol))
    assert benchmark.main(common + ["--rows", "smollm2:16:b1", "--variants", "original,hybrid_eager"]) == 0
    smol = json.loads((rows_dir / "smollm2_16_b1.json").read_text())
    assert benchmark.UNCHECKED not in smol["variants"]["hybrid_eager"] and smol["variants"]["original"]["run"] != smol["variants"]["hybrid_eager"]["run"]
    summary = (tmp_path / "out" / "generate_speed.md").read_text()
    (tmp_path / "out" / "generate_speed.md").unlink()
    monkeypatch.setattr(benchmark, "Bench", None)  # --summary-only loads no model
    assert benchmark.main(common + ["--summary-only"]) == 0 and (tmp_path / "out" / "generate_speed.md").read_text() == summary


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
    compiled, _ = benchmark.timed_generate(bench, "original_compiled", ids, 5, prefill_chunk=8)
    assert len(seen) == 2 and seen[0] == seen[1]
    bench.original.generate = generate
    assert compiled["new_tokens"] == benchmark.timed_generate(bench, "original", ids, 5)[0]["new_tokens"]
    bench.release()
    assert bench._static is None


def test_summary_flags_failed_captures_and_inconsistent_tokens_and_reads_old_rows(benchmark):
    timing = {"ttft_ms": 1.0, "per_token_ms": 0.5, "tokens_per_s": 8.0, "graph_equals_static_eager": True}
    for captured, flagged in ((True, False), (False, True)):
        rows = {"qwen3-1.7b_4096_b1": {"row": "qwen3-1.7b:4096:b1", "variants": {"hybrid_graph": {**timing, "graph_captured": captured}}}}
        line = next(x for x in benchmark.summary_lines(rows) if x.startswith("| qwen3-1.7b | 4096 | 1 | random ids | one pass | hybrid_graph"))
        assert ("capture failed" in line) == flagged  # a row from before the prompt and prefill fields: random ids, one pass
    check = {"rows": 1, "checked_tokens": 32, "max_gap": 9.5, "mean_gap": 1.25, "consistent": 20, "first_inconsistent": 3,
             "tolerance": 0.1, "first_step_max_abs_diff": 0.5}
    rows = {"smollm2_4096_b1_text-a": {"row": "smollm2:4096:b1", "prompt": "text a.txt (9 tokens, ids sha256 0)", "variants": {
        "hybrid_graph": {**timing, "prefill_chunk": 1024, "reference_check": check, "vs_hybrid_eager": {"first_mismatch": [7], "rows_identical": 0}},
        "original": {**timing, "reference_check": {"failed": "out of memory: CUDA"}}}}}
    lines = [x for x in benchmark.summary_lines(rows) if x.startswith("| smollm2")]
    assert "| text a.txt | chunks of 1024 | hybrid_graph |" in lines[1] and "| parts at 7 | 1.2 / 9.5; **20/32** (from step 3) <= 0.1 | 0.5 | yes |" in lines[1]
    assert "| original |" in lines[0] and "check out of memory: CUDA" in lines[0]
    unchecked = {"row": "qwen3-1.7b:4096:b1", "variants": {"hybrid_graph": {**timing, benchmark.UNCHECKED: True}}}
    assert "checks not finished" in "".join(benchmark.summary_lines({"qwen3-1.7b_4096_b1": unchecked}))


def test_a_run_killed_in_a_check_keeps_the_timing_and_names_the_check(benchmark, tmp_path, monkeypatch, one_thread):
    """The row file is saved before each check with the check under way, so a call stopped by its limit there (here:
    interrupted in the graph check) leaves a timed variant whose row says which check never finished."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: attempt() does not catch it, as it cannot catch a kill

    monkeypatch.setattr(benchmark, "graph_check", stopped)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--smoke", "--rows-dir", str(tmp_path / "rows"), "--rows", "qwen3-1.7b:40:b1", "--variants", "hybrid_graph"])
    row = json.loads((tmp_path / "rows" / "qwen3-1.7b_40_b1.json").read_text())
    graph = row["variants"]["hybrid_graph"]
    assert graph[benchmark.UNCHECKED] == "graph_check" and graph["per_token_ms"] > 0 and set(graph["phase_s"]) == {"timed"}
    assert "checks not finished (in graph_check)" in "".join(benchmark.summary_lines({"qwen3-1.7b_40_b1": row}))


def test_graph_check_prefills_as_the_timed_call_did(benchmark, one_thread):
    """The check compares the graph path with the static path run eagerly: it must prefill in the timed call's
    chunks (a whole prefill rounds differently in bf16, and the tokens part at the first near-tie)."""
    from types import SimpleNamespace

    bench = benchmark.Bench("qwen3-1.7b", SimpleNamespace(smoke=True, model=None, mask=None), torch.device("cpu"), torch.float32)
    chunks, generate = [], bench.hybrid.generate

    def spy(*args, **kwargs):
        chunks.append((kwargs["decode_mode"], kwargs["generation_config"].prefill_chunk_size))
        return generate(*args, **kwargs)

    bench.hybrid.generate = spy
    ids = bench.prompt_ids(2, 40)
    result, first = benchmark.timed_generate(bench, "hybrid_graph", ids, 5, prefill_chunk=16, keep_rows=1)
    assert benchmark.graph_check(bench, "hybrid_graph", ids, result["new_tokens"], 4, prefill_chunk=16)
    assert chunks == [("static", 16)] * 3 and result["prefill_chunk"] == 16 and first.shape == (1, bench.vocab)


def test_prompt_file_rows_are_tiled_text_recorded_per_row(benchmark, tmp_path, monkeypatch, capsys, one_thread):
    from headscope.cli import script_main
    from headscope.heads import HeadscopeError

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    model_dir = save_model(tiny_llama(seed=3), tmp_path / "llama")
    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"w{i}" for i in range(10, 30)))  # 20 tokens and eos: rows of 16 wrap around
    ids, name = benchmark.read_prompt(text, model_dir)
    assert ids.tolist() == [*range(12, 32), 1] and name.startswith("text prose.txt (21 tokens, ids sha256 ")
    from types import SimpleNamespace

    bench = benchmark.Bench("smollm2", SimpleNamespace(smoke=True, model=model_dir, mask=None), torch.device("cpu"), torch.float32, (ids, name))
    rows = bench.prompt_ids(3, 16)
    assert rows[0].tolist() == list(range(12, 28)) and rows[1].tolist() == [*range(28, 32), 1, *range(12, 23)]
    rows_dir = tmp_path / "rows"
    common = ["--smoke", "--rows-dir", str(rows_dir), "--model", model_dir, "--rows", "smollm2:16:b1,qwen3-1.7b:16:b1", "--variants", "original"]
    assert benchmark.main(common + ["--prompt-file", str(text)]) == 0
    assert json.loads((rows_dir / "smollm2_16_b1_text-prose.json").read_text())["prompt"] == name  # the text names the row file
    assert json.loads((rows_dir / "qwen3-1.7b_16_b1.json").read_text())["prompt"] == "random ids"  # no tokenizer: random ids
    assert benchmark.main(common[:-1] + ["original,hybrid_eager", "--rows", "smollm2:16:b1"]) == 0  # random ids: another row file
    assert set(json.loads((rows_dir / "smollm2_16_b1.json").read_text())["variants"]) == {"original", "hybrid_eager"}
    summary = (tmp_path / "out" / "generate_speed.md").read_text()  # every row file, also those this run did not name
    assert "| smollm2 | 16 | 1 | text prose.txt | one pass | original |" in summary and "| smollm2 | 16 | 1 | random ids | one pass | original |" in summary
    assert "| qwen3-1.7b | 16 | 1 | random ids | one pass | original |" in summary
    before = (rows_dir / "smollm2_16_b1_text-prose.json").read_text()
    text.write_text("w5 w6 w7")  # another text under the same name
    with pytest.raises(HeadscopeError, match="made with the prompt 'text prose.txt"):
        benchmark.main(common[:-1] + ["original,hybrid_eager", "--prompt-file", str(text)])
    assert (rows_dir / "smollm2_16_b1_text-prose.json").read_text() == before
    (tmp_path / "empty.jsonl").write_text("")
    for bad, says in ((tmp_path / "missing.txt", "not found"), (tmp_path / "empty.jsonl", "hold no tokens")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            script_main(lambda: benchmark.main(common + ["--prompt-file", str(bad), "--rows-dir", str(tmp_path / "never")]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and says in err and err.startswith("headscope: error:") and not (tmp_path / "never").exists()


def test_memory_guard_at_the_h200_rows(benchmark):
    """The estimate for the Qwen3-1.7B shape (bf16, chunks of 4096) against what the H200 rows measured (peak less
    the 7.12 GB of weights both models hold) and had free (141 GB): 32K x 32 fits for the originals (the old guard,
    0.92 x free, skipped it); 128K fits the originals up to batch 8."""
    from headscope.heads import HeadMask, ModelFingerprint

    device = load_benchmark("generate_speed_device")
    config = load_benchmark("generate_speed_models").qwen3_config(smoke=False)
    full = torch.zeros(28, 16, dtype=torch.bool)
    full[:, :2] = True  # KV group 0 of every layer
    mask = HeadMask(full, ModelFingerprint("qwen3", 28, 16, 8, 128))

    def need(variant, batch, context):
        return device.memory_need(variant, config, mask.fingerprint, mask, 4, 2, batch, context, 256, 4096)["total"] / 1e9

    assert abs(need("original_compiled", 24, 32768) - (104.69 - 7.12)) < 0.5  # measured: 32K x 24
    assert 0 < need("hybrid_graph", 32, 32768) - (30.61 - 7.12) < 2.5  # measured: 32K x 32, a little over
    free = 141e9
    for variant in ("original_compiled", "original_graph"):
        assert device.fits(need(variant, 32, 32768) * 1e9, free) and need(variant, 32, 32768) > 0.92 * free / 1e9
        assert device.fits(need(variant, 8, 131072) * 1e9, free) and not device.fits(need(variant, 9, 131072) * 1e9, free)
    assert need("original", 1, 32768) > need("original_compiled", 1, 32768)  # the dynamic cache's cat and repeat_kv copies
    repeat = 8 * 16 * (131072 + 256) * 128 * 2 * 2 / 1e9  # one layer's keys and values repeated to 16 heads: 8.6 GB
    assert abs(need("original_compiled", 8, 131072) - need("original_graph", 8, 131072) - (repeat - 2.28)) < 0.05  # not the 2.28 GB chunk


def test_per_token_table_pairs_both_baselines_with_the_hybrid_at_one_batch(benchmark):
    timing = lambda ms: {"ttft_ms": 1.0, "per_token_ms": ms, "tokens_per_s": 8.0}  # noqa: E731
    rows = {
        "a": {"row": "qwen3-1.7b:32768:b32", "variants": {
            "original_compiled": {"skipped": "needs ~130 GB + 4 GB headroom, 120 GB free"}, "original_graph": timing(30.0),
            "hybrid_graph": timing(7.5)}},
        "b": {"row": "qwen3-1.7b:131072:b8", "variants": {
            "original": timing(900.0), "original_compiled": timing(140.0), "original_graph": {"skipped": "out of memory: CUDA"}}},
        "c": {"row": "qwen3-1.7b:4096:b32", "variants": {"original_compiled": timing(6.0), "original_graph": timing(5.0),
                                                          "hybrid_graph": timing(5.5)}},
    }
    lines = {line.split(" | ")[1] + ":" + line.split(" | ")[2]: line for line in benchmark.summary_lines(rows)
             if line.startswith("| qwen3") and line.count("|") == 11}
    assert lines["32768:32"] == ("| qwen3-1.7b | 32768 | 32 | random ids | - (original_compiled: needs ~130 GB + 4 GB headroom, 120 GB free) "
                                 "| 30.00 | 7.50 | - | 4.00x | >= 2x: met vs same kernels |")
    assert lines["131072:8"] == ("| qwen3-1.7b | 131072 | 8 | random ids | 140.00 | - (original_graph: out of memory: CUDA) "
                                 "| - (not run) | - | - |  |")
    assert lines["4096:32"].endswith("| 6.00 | 5.00 | 5.50 | 1.09x | 0.91x | >= 1x: met vs as shipped, not met vs same kernels |")
    bad = {"rows": 1, "checked_tokens": 32, "consistent": 3, "first_inconsistent": 0, "max_gap": 3.2, "mean_gap": 1.5, "tolerance": 0.1,
           "first_step_max_abs_diff": 3.9}
    rows["a"]["variants"]["original_graph"]["reference_check"] = bad  # a baseline whose tokens fail its check earns no ratio
    rows["c"]["variants"]["hybrid_graph"]["graph_equals_static_eager"] = False
    lines = {line.split(" | ")[1] + ":" + line.split(" | ")[2]: line for line in benchmark.summary_lines(rows)
             if line.startswith("| qwen3") and line.count("|") == 11}
    assert "| - (original_graph: 30.00 ms, **ref check 3/32**) | 7.50 | - | - | >= 2x: no pair at this batch |" in lines["32768:32"]
    assert lines["4096:32"].endswith("| 6.00 | 5.00 | - (hybrid_graph: 5.50 ms, **graph != static eager**) | - | - | >= 1x: no pair at this batch |")


def test_ttft_table_takes_the_median_of_the_interleaved_rounds(benchmark):
    timing = lambda ttft, rounds=None: {"ttft_ms": ttft, "per_token_ms": 1.0, "tokens_per_s": 8.0,  # noqa: E731
                                        **({"ttft_rounds_ms": rounds} if rounds else {})}
    rows = {
        "a": {"row": "smollm2:4096:b1", "variants": {
            "original": timing(21.0, [30.0, 20.0, 22.0]), "original_compiled": timing(26.0), "hybrid_eager": timing(39.0, [40.0, 41.0, 39.0]),
            "hybrid_graph": timing(53.0, [33.0, 50.0, 40.0])}},
        "b": {"row": "qwen3-1.7b:32768:b32", "variants": {"original_graph": timing(900.0), "hybrid_graph": timing(450.0)}},  # no rounds
    }
    lines = benchmark.summary_lines(rows)
    table = [line for line in lines if line.startswith("| smollm2 | 4096 | 1 | random ids | 40.0 |")]
    assert table == ["| smollm2 | 4096 | 1 | random ids | 40.0 | 22.0 (0.55x) | 26.0 (0.65x) | - | 40.0 |"]
    assert not any(line.startswith("| qwen3-1.7b | 32768 | 32 | random ids | 450.0") for line in lines)
    assert any("| hybrid_graph | 40.0 (33.0-50.0, 3 rounds) |" in line for line in lines)  # the row table shows the median too
    assert any("| original_compiled | 26.0 |" in line for line in lines)
    bad = {"rows": 1, "checked_tokens": 32, "consistent": 30, "first_inconsistent": 19, "max_gap": 1.1, "mean_gap": 0.09,
           "tolerance": 0.1, "first_step_max_abs_diff": 1.8}
    rows["a"]["variants"]["hybrid_graph"]["reference_check"] = bad  # tokens failing their checks: no ratio, as per token
    assert "| smollm2 | 4096 | 1 | random ids | 40.0 (**ref check 30/32**) | 22.0 | 26.0 | - | 40.0 |" in benchmark.summary_lines(rows)
    del rows["a"]["variants"]["hybrid_graph"]["reference_check"]
    rows["a"]["variants"]["original"]["reference_check"] = bad
    assert "| smollm2 | 4096 | 1 | random ids | 40.0 | 22.0 (**ref check 30/32**) | 26.0 (0.65x) | - | 40.0 |" in benchmark.summary_lines(rows)
    del rows["a"]["variants"]["hybrid_graph"]["ttft_rounds_ms"]
    assert "## Time to first token, interleaved rounds: the original's / the hybrid's" not in benchmark.summary_lines(rows)


def test_the_smollm2_shape_rows_need_no_model_directory(benchmark, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rows_dir = tmp_path / "rows"
    assert benchmark.main(["--smoke", "--rows-dir", str(rows_dir), "--rows", "smollm2-shape:16:b1", "--variants", "original,hybrid_graph"]) == 0
    row = json.loads((rows_dir / "smollm2-shape_16_b1.json").read_text())
    assert "random KV-aware 7:1" in row["mask"] and row["variants"]["hybrid_graph"]["graph_equals_static_eager"]
    with pytest.raises(SystemExit):
        benchmark.main(["--smoke", "--rows-dir", str(rows_dir), "--rows", "smollm2-base:16:b1"])


def test_tokens_past_the_tolerance_pass_only_within_the_eager_twins_largest_gap(benchmark):
    """A bf16 near-tie: hybrid_graph takes a token 0.104 nats below the exact model's best (tolerance 0.1). It earns
    its ratio when hybrid_eager, checked in the same row over as many tokens, went at least that far; not when the
    twin stayed closer, ran fewer tokens or never ran."""
    timing = lambda ms: {"ttft_ms": 1.0, "per_token_ms": ms, "tokens_per_s": 8.0, "graph_equals_static_eager": True}  # noqa: E731
    check = lambda max_gap, consistent, tokens=32: {"rows": 1, "checked_tokens": tokens, "consistent": consistent,  # noqa: E731
                                                    "first_inconsistent": 11 if consistent < tokens else None, "max_gap": max_gap,
                                                    "mean_gap": 0.006, "tolerance": 0.1, "first_step_max_abs_diff": 0.17}

    def lines(twin):
        variants = {"original_graph": timing(8.8), "hybrid_graph": {**timing(5.41), "reference_check": check(0.104, 31)}}
        if twin is not None:
            variants["hybrid_eager"] = {**timing(49.6), "reference_check": twin}
        summary = benchmark.summary_lines({"r": {"row": "qwen3-1.7b:4096:b32", "variants": variants}})
        return [x for x in summary if x.startswith("| qwen3-1.7b | 4096 | 32 |")]

    passed = lines(check(0.35, 30))
    assert "31/32 (from step 11), all <= eager twin's max 0.35 <= 0.1" in passed[-2]  # hybrid_graph's row of the first table
    assert passed[-1].endswith("| 8.80 | 5.41 | - | 1.63x | >= 1x: met vs same kernels |")
    for twin in (check(0.05, 32), check(0.35, 7, tokens=8), None):
        failed = lines(twin)
        assert "**31/32** (from step 11)" in "".join(failed) and "1.63x" not in failed[-1], twin  # the hybrid side: the eager twin or none
    assert "hybrid_graph: 5.41 ms, **ref check 31/32**" in failed[-1]


def test_gpu_work_of_the_first_token_call_is_kept_per_variant_and_tabled(benchmark, monkeypatch):
    import sys
    from types import SimpleNamespace

    device = sys.modules["generate_speed_device"]
    assert device.work_of([(10.0, 1510.0), (2000.0, 2500.0)]) == {"kernel_ms": 2.0, "launches": 2}
    if not torch.cuda.is_available():
        assert device.gpu_work(lambda: None) is None
    timing = sys.modules["generate_speed_timing"]
    calls = []
    monkeypatch.setattr(timing, "first_token_ms", lambda bench, name, *rest: calls.append(name) or 5.0)
    monkeypatch.setattr(timing, "per_token_call_ms", lambda bench, name, *rest: {"hybrid_graph": 2.0, "original_graph": 2.2}[name])
    work = {"hybrid_graph": {"kernel_ms": 28.8, "launches": 810}, "original_graph": {"kernel_ms": 27.4, "launches": 700}}
    monkeypatch.setattr(timing, "gpu_work", lambda fn: (fn(), work.get(calls[-1]))[1])
    timing = {"ttft_ms": 9.0, "per_token_ms": 1.0, "tokens_per_s": 8.0}
    variants = {"hybrid_graph": dict(timing, ttft_gpu={"kernel_ms": 1.0, "launches": 1}), "original_graph": dict(timing),
                "hybrid_eager": dict(timing, ttft_gpu={"kernel_ms": 1.0, "launches": 1})}
    bench = SimpleNamespace(release=lambda: None)
    benchmark.ttft_rounds(bench, variants, None, SimpleNamespace(ttft_rounds=2, new_tokens=4), float("inf"), "NVIDIA H100 80GB HBM3")
    assert variants["hybrid_graph"]["ttft_gpu"] == work["hybrid_graph"] and variants["original_graph"]["ttft_gpu"] == work["original_graph"]
    assert "ttft_gpu" not in variants["hybrid_eager"]  # an earlier run's, dropped; none measured this time
    assert all(len(v["ttft_rounds_ms"]) == 2 and v["rounds_device"] == "NVIDIA H100 80GB HBM3" for v in variants.values())
    assert variants["original_graph"]["per_token_rounds_ms"] == [2.2, 2.2] and "per_token_rounds_ms" not in variants["hybrid_eager"]
    rows = {"a": {"row": "qwen3-1.7b:4096:b1", "variants": variants}}
    table = [line for line in benchmark.summary_lines(rows) if line.startswith("| qwen3-1.7b | 4096 | 1 | random ids | 28.8")]
    assert table == ["| qwen3-1.7b | 4096 | 1 | random ids | 28.8 (810) | - | 27.4 (700) | - | 0.95x |"]
    variants["original_graph"]["ttft_gpu"] = {"failed": "RuntimeError: CUPTI busy"}  # the profiler could not run
    table = [line for line in benchmark.summary_lines(rows) if line.startswith("| qwen3-1.7b | 4096 | 1 | random ids | 28.8")]
    assert table == ["| qwen3-1.7b | 4096 | 1 | random ids | 28.8 (810) | - | - (RuntimeError: CUPTI busy) | - | - |"]
    del variants["hybrid_graph"]["ttft_gpu"]
    assert not any(line.startswith("## GPU work") for line in benchmark.summary_lines(rows))


def test_a_trained_hybrid_gets_its_own_row_files_and_one_hybrid_per_row(benchmark, tmp_path, monkeypatch, one_thread):
    from headscope.heads import HeadscopeError
    from headscope.hybrid import build_hybrid
    from headscope.mask import random_mask
    from headscope.models import load_model

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    original = tiny_llama(seed=3)
    model_dir = save_model(original, tmp_path / "llama")
    lm = load_model(original)
    mask = random_mask(lm.fingerprint, n_full=3, seed=1, kv_aware=True)
    trained = build_hybrid(lm, mask)
    with torch.no_grad():
        trained.model.layers[0].self_attn.dt_bias.add_(0.5)  # weights no build of the original has
    trained.save_pretrained(tmp_path / "run" / "final")
    rows_dir = tmp_path / "rows"
    common = ["--smoke", "--rows-dir", str(rows_dir), "--model", model_dir, "--rows", "smollm2:16:b1", "--variants", "original,hybrid_eager"]
    assert benchmark.main(common + ["--hybrid", str(tmp_path / "run" / "final")]) == 0
    row = json.loads((rows_dir / "smollm2_16_b1_hybrid-run-final.json").read_text())
    assert row["mask"].startswith(f"trained hybrid {tmp_path / 'run' / 'final'} (") and row["n_full_heads"] == mask.n_full
    assert " trained " + str((tmp_path / "run" / "final").resolve()) + " weights " in row["hybrid_id"]
    assert row["variants"]["hybrid_eager"]["reference_check"]["max_gap"] < 1e-4  # checked against the trained model itself
    assert not (rows_dir / "smollm2_16_b1.json").exists()  # the built hybrid's rows stay apart
    summary = (tmp_path / "out" / "generate_speed.md").read_text()
    assert "| smollm2 (trained hybrid run/final) | 16 | 1 |" in summary and "| smollm2 | 16 |" not in summary
    (tmp_path / "empty").mkdir()
    for bad, says in ((model_dir, "not a headscope hybrid"), (str(tmp_path / "empty"), "no loadable model")):
        with pytest.raises(HeadscopeError, match=says):
            benchmark.main(common + ["--hybrid", bad, "--rows-dir", str(tmp_path / "other")])
    qwen = load_model(tiny_qwen3())  # the hybrid of a model of another shape
    build_hybrid(qwen, random_mask(qwen.fingerprint, n_full=3, seed=1, kv_aware=True)).save_pretrained(tmp_path / "other_final")
    with pytest.raises(HeadscopeError, match="another shape than --model"):
        benchmark.main(common + ["--hybrid", str(tmp_path / "other_final"), "--rows-dir", str(tmp_path / "other")])
    with torch.no_grad():  # retrained into the same directory: another hybrid for the same row file
        trained.model.layers[0].self_attn.dt_bias.add_(0.5)
    trained.save_pretrained(tmp_path / "run" / "final")
    before = (rows_dir / "smollm2_16_b1_hybrid-run-final.json").read_text()
    with pytest.raises(HeadscopeError, match="holds variants of another hybrid"):
        benchmark.main(common + ["--hybrid", str(tmp_path / "run" / "final"), "--redo"])
    assert (rows_dir / "smollm2_16_b1_hybrid-run-final.json").read_text() == before
    for argv in (common[:3] + common[5:] + ["--hybrid", "x"], common + ["--hybrid", "x", "--mask", "y"],  # no --model; both;
                 common + ["--hybrid", str(tmp_path / "nothing")]):  # no such directory
        with pytest.raises(SystemExit):
            benchmark.main(argv)
    assert benchmark.main(common) == 0  # the built hybrid: its own row file
    mask_file = tmp_path / "mask.json"
    from headscope.maskfile import save_mask

    save_mask(random_mask(lm.fingerprint, n_full=3, seed=2, kv_aware=True), mask_file)
    before = (rows_dir / "smollm2_16_b1.json").read_text()
    with pytest.raises(HeadscopeError, match="holds variants of another hybrid"):  # another mask into the same row file
        benchmark.main(common[:-1] + ["original,hybrid_graph", "--mask", str(mask_file)])
    assert (rows_dir / "smollm2_16_b1.json").read_text() == before


def test_variants_of_one_row_timed_on_two_gpus_are_named_and_never_compared_as_twins(benchmark):
    """A rerun of some variants on another GPU keeps the others': each variant's line names its GPU (its own
    ``device``, else the row's), a per-token ratio across GPUs says which, and greedy streams of two GPUs are not
    compared (``twin_agreements``)."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    result = lambda ms, run, device=None, tokens=(1, 2, 3): {"ttft_ms": 30.0, "per_token_ms": ms, "tokens_per_s": 8.0, "run": run,  # noqa: E731
                                                             "new_tokens": [list(tokens)], **({"device": device} if device else {})}
    record = {"row": "qwen3-1.7b:4096:b1", "device": h100, "variants": {
        "original": result(78.5, "r1", h200), "original_graph": result(2.65, "r2"), "hybrid_eager": result(38.0, "r1", h200),
        "hybrid_graph": result(2.77, "r2", h100, tokens=(1, 2, 4))}}
    record["variants"]["hybrid_graph"]["vs_hybrid_eager"] = {"first_mismatch": [0], "rows_identical": 0, "match_fraction": 0.0}
    benchmark.twin_agreements(record)
    assert "vs_hybrid_eager" not in record["variants"]["hybrid_graph"]  # the stale H200 comparison is dropped
    assert "vs_original" not in record["variants"]["original_graph"]
    record["variants"]["hybrid_eager"].update(device=h100, run="r2")
    benchmark.twin_agreements(record)
    assert record["variants"]["hybrid_graph"]["vs_hybrid_eager"]["first_mismatch"] == [2]
    lines = benchmark.summary_lines({"a": record})
    assert lines[2].startswith("NVIDIA H100 80GB HBM3 / NVIDIA H200, ")
    by_variant = {line.split(" | ")[5]: line for line in lines if line.startswith("| qwen3-1.7b | 4096 | 1 |") and line.count("|") == 16}
    assert by_variant["original"].endswith("| H200 |") and by_variant["original_graph"].endswith("| H100 |")  # (the row's GPU)
    ratio = [line for line in lines if line.startswith("| qwen3-1.7b | 4096 | 1 |") and line.count("|") == 11]
    assert ratio == ["| qwen3-1.7b | 4096 | 1 | random ids | 78.50 | 2.65 | 2.77 | 28.34x (not side by side: H200 / H100) | 0.96x |  |"]
