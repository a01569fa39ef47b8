"""benchmarks/screen_overlap.py on a tiny random Llama (12 heads, budget 2): the K curve's overlaps, the
timed-vs-derived split, resume from the per-probe work files and refusal of other settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark
from fixtures import make_word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from headscope import load_model
from headscope.heads import HeadscopeError
from headscope.patching import screen_scores
from headscope.probes import make_probe
from headscope.probes.tasks import task_vocabulary

PROBES = ("kv_recall", "induction")
ARGS = ["--probes", ",".join(PROBES), "--top-ks", "1,2,12", "--length", "64", "--pairs", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = make_word_tokenizer(task_vocabulary(), add_bos=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)  # gaps well above round-off
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_curve_overlaps_timed_and_derived_resume(model_dir, tmp_path, monkeypatch, one_thread):
    benchmark = load_benchmark("screen_overlap")
    args = ["--model", model_dir, *ARGS, "--out", str(tmp_path), "--name", "curve"]
    assert benchmark.main(args) == 0
    record = json.loads((tmp_path / "curve.json").read_text())
    summary = record["summary"]
    assert (summary["budget"], summary["n_heads"], summary["top_ks"], summary["timed_top_ks"]) == (2, 12, [1, 2, 12], [1, 12])
    assert summary["complete_probes"] == list(PROBES) and summary["missing"] == {}
    assert sorted(p.name for p in (tmp_path / "curve_work").iterdir()) == sorted(f"{p}.json" for p in PROBES)

    lm = load_model(model_dir)
    for row in record["probes"]:
        by_k = {p["top_k"]: p for p in row["curve"]}
        assert [by_k[k]["time_derived"] for k in (0, 1, 2, 12)] == [False, False, True, False]
        for k in (1, 12):  # the real screen runs equal AtP + exhaustive exact composed
            assert by_k[k]["scores_from"] == benchmark.SOURCE_RUN and by_k[k]["run_vs_composed_max_abs_diff"] < 1e-5
        assert by_k[12]["overlap"] == 1.0  # K = every head: the screen is the exhaustive exact run
        t1, t12 = by_k[1]["screen_s"], by_k[12]["screen_s"]
        assert by_k[2]["screen_s"] == pytest.approx(t1 + (t12 - t1) / 11)
        # the derived K = 2 point against a real screen run of it
        probe = make_probe(row["probe"], lm.tokenizer, length=64, n_pairs=2, seed=0)
        screened = screen_scores(lm, probe, top_k=2, progress=False).values
        exact = torch.tensor(row["exact_values"])
        assert by_k[2]["overlap"] == benchmark.overlap(screened, exact, 2)
        assert by_k[0]["overlap"] == benchmark.overlap(torch.tensor(row["attribution_values"]), exact, 2)
    every_head = record["curve"][-1]
    assert every_head["top_k"] == 12 and every_head["fused_mask_overlap"] == 1.0
    assert every_head["fused_only_exact"] == every_head["fused_only_screen"] == []
    text = (tmp_path / "curve.md").read_text()
    assert "| K=2 | ~" in text and "Goals at K = budget (2)" in text

    # resume: every stage is in the work files, nothing runs again, the summary is rebuilt the same
    monkeypatch.setattr(benchmark, "run_stage", lambda *a: pytest.fail("a finished stage ran again"))
    before = (tmp_path / "curve.json").read_text()
    assert benchmark.main(args) == 0
    assert (tmp_path / "curve.json").read_text() == before
    with pytest.raises(HeadscopeError, match="other settings"):
        benchmark.main([*args, "--pairs", "3"])
    assert (tmp_path / "curve.json").read_text() == before


def test_partial_summary_names_what_is_missing(model_dir, tmp_path, monkeypatch, one_thread):
    benchmark = load_benchmark("screen_overlap")
    run_stage = benchmark.run_stage

    def stop_at_induction(lm, probe, stage):
        if probe.name == "induction" and stage == "attribution":
            raise KeyboardInterrupt
        return run_stage(lm, probe, stage)

    monkeypatch.setattr(benchmark, "run_stage", stop_at_induction)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--model", model_dir, *ARGS, "--out", str(tmp_path)])
    record = json.loads((tmp_path / "screen_overlap.json").read_text())
    assert record["summary"]["complete_probes"] == ["kv_recall"]
    assert record["summary"]["missing"] == {"induction": ["attribution", "screen_1", "screen_12"]}
    assert record["summary"]["goals_at_budget"] is None
    assert "**Incomplete:** induction: attribution, screen_1, screen_12 not run" in (tmp_path / "screen_overlap.md").read_text()


@pytest.mark.parametrize("bad, message", [(["--top-ks", "0,2"], "between 1 and"), (["--top-ks", "2,x"], "comma list"),
                                          (["--probes", "kv_recall,nope"], "unknown probe")])
def test_bad_arguments(model_dir, tmp_path, bad, message):
    benchmark = load_benchmark("screen_overlap")
    with pytest.raises(HeadscopeError, match=message):
        benchmark.main(["--model", model_dir, *ARGS, *bad, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
