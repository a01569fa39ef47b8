"""``headscope demo`` end to end on a tiny random Qwen3 with the demo tokenizer: probes, scores, mask,
report and the hybrid step (build, calibrate, align, accuracies); score reuse on a rerun; the CLI's
errors; the GPT-2 path without a hybrid; the fallback model when none is bundled."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

import headscope.zoo
from headscope.cli import main
from headscope.demo import STAGES, DemoSettings, corpus_batches, run_demo
from headscope.heads import HeadscopeError
from headscope.maskfile import load_mask
from headscope.models import load_model

PROBES = ("needle_single", "kv_recall", "ioi")
CLI_ARGS = ["--length", "64", "--pairs", "2", "--probes", ",".join(PROBES), "--no-progress"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_tokenizer():
    from headscope.probes import TASK_NAMES, sample_task_text, task_vocabulary
    from headscope.zoo.tokenizer import build_demo_tokenizer

    return build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary(), seed=0, samples_per_task=3, model_max_length=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, demo_tokenizer):
    """A 2-layer, 4-head random Qwen3 whose context (128) is shorter than the demo's alignment rows (256)."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=demo_tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_demo")
    Qwen3ForCausalLM(config).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def test_demo_pipeline_with_hybrid(tiny_dir, tmp_path):
    lines: list[str] = []
    settings = DemoSettings(length=64, n_pairs=2, align_steps=3, align_batch=2, eval_pairs=4, probes=PROBES, progress=False)
    result = run_demo(tiny_dir, tmp_path, settings, log=lines.append)
    text = "\n".join(lines)

    for name in PROBES:
        assert (tmp_path / "scores" / f"{name}.direct.json").is_file()
        assert (tmp_path / "scores" / f"{name}.path.json").is_file()  # receivers come from layer 1
    assert (tmp_path / "report.html").stat().st_size > 0
    fingerprint = load_model(tiny_dir).fingerprint
    mask = load_mask(tmp_path / "mask.json", expect=fingerprint)
    assert mask.heads() == result.mask.heads() and mask.n_full == 1  # 7:1 of 8 heads
    assert "note: the model's context is 128 tokens" in text and "KV-cache kept" in text

    retrieval = {"needle_single", "kv_recall"}
    assert set(result.accuracies) == set(STAGES)
    for stage in STAGES:
        assert set(result.accuracies[stage]) == retrieval
        assert all(0.0 <= v <= 1.0 for v in result.accuracies[stage].values())
    assert len(result.align_losses) == 3 and all(math.isfinite(x) for x in result.align_losses)
    assert "argmax" in text
    for name in retrieval:
        row = re.search(rf"^\s+{name}\s+(\d\.\d\d)\s+(\d\.\d\d)\s+(\d\.\d\d)$", text, re.M)
        assert row, text
        assert [float(x) for x in row.groups()] == [round(result.accuracies[s][name], 2) for s in STAGES]
    stored = json.loads((tmp_path / "hybrid.json").read_text())
    assert stored["accuracies"] == result.accuracies and stored["align_losses"] == result.align_losses


def test_demo_cli_reuses_matching_scores_only(tiny_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path), "--no-hybrid", *CLI_ARGS]) == 0
    first = capsys.readouterr().out
    assert "reused" not in first and "mask 7:1" in first
    assert len(re.findall(r"^scored \w+: clean - corrupt gap [+-]\d+\.\d\d, direct and path in \d+ s$", first, re.M)) == 3  # a line per probe
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()}
    assert len(stamps) == 6 and not (tmp_path / "hybrid.json").exists()

    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path), "--no-hybrid", *CLI_ARGS]) == 0
    again = capsys.readouterr().out
    assert "reused 6 score files" in again and "scored " not in again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()} == stamps

    other = ["--length", "64", "--pairs", "3", "--probes", "ioi", "--no-progress"]  # the stored scores have 2 pairs
    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path), "--no-hybrid", *other]) == 0
    assert "reused" not in capsys.readouterr().out
    assert json.loads((tmp_path / "scores" / "ioi.direct.json").read_text())["meta"]["n_pairs"] == 3


def test_demo_cli_errors(tiny_dir, qwen3_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path), "--probes", "needle_single,nope"]) == 2
    assert "unknown probe 'nope'" in capsys.readouterr().err
    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path), "--align-steps", "0"]) == 2
    assert "--align-steps" in capsys.readouterr().err
    # conftest's model has a w0..w125 tokenizer: no probe's words are single tokens in it
    assert main(["demo", "--model", qwen3_dir, "--out", str(tmp_path), "--no-hybrid", *CLI_ARGS]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("headscope: error")]
    assert len(errors) == 1 and "none of the probes can be built" in errors[0]


def test_demo_gpt2_skips_the_hybrid(demo_tokenizer, tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(demo_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        eos_token_id=demo_tokenizer.eos_token_id, bos_token_id=demo_tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    demo_tokenizer.save_pretrained(tmp_path / "gpt2")
    lines: list[str] = []
    settings = DemoSettings(length=48, n_pairs=2, probes=("needle_single",), progress=False)
    result = run_demo(tmp_path / "gpt2", tmp_path / "out", settings, log=lines.append)
    assert (tmp_path / "out" / "mask.json").is_file() and result.accuracies == {}
    assert any("skipping the hybrid" in line and "gpt2" in line for line in lines)


def test_corpus_batches_are_seeded_demo_corpus_rows(demo_tokenizer):
    a = corpus_batches(demo_tokenizer, 2, 3, 96, seed=0)
    assert a.shape == (2, 3, 96) and a.dtype == torch.int64
    assert torch.equal(a, corpus_batches(demo_tokenizer, 2, 3, 96, seed=0))
    assert not torch.equal(a, corpus_batches(demo_tokenizer, 2, 3, 96, seed=1))
    assert int(a.max()) < len(demo_tokenizer) and demo_tokenizer.unk_token_id not in a.unique().tolist()
    assert (a == demo_tokenizer.eos_token_id).any()  # documents are separated


def test_corpus_rows_for_a_subword_tokenizer_are_written_as_its_probes_are():
    """A real model's tokenizer (subword: the probes' NATURAL surface) gets the probe tasks and the essay in natural
    wording, one task per document, the answer after a space (the continuation token the probes score), and none of
    the PLAIN-only documents (multi-query recall, hop chains); the word-level demo tokenizer keeps its own mix."""
    import random

    from fixtures import make_bpe_tokenizer
    from headscope.probes import haystack
    from headscope.probes.surface import NATURAL
    from headscope.probes.tasks import TASK_NAMES, sample_task_text

    rng = random.Random(0)
    natural = [" ".join(NATURAL.sentence(s)) for s in haystack.haystack_sentences("essay")[:1000]]
    natural += [" ".join(sample_task_text(name, rng, 5, NATURAL)) for name in TASK_NAMES for _ in range(100)]
    tokenizer = make_bpe_tokenizer(natural, vocab_size=1300)
    rows = corpus_batches(tokenizer, 2, 4, 160, seed=0)
    text = "\n".join(tokenizer.decode(row) for row in rows.view(-1, 160))
    assert "It seems that" in text and ". " in text  # natural essay sentences (PLAIN writes "it seems that ... ." lowercase)
    answers = re.findall(r"(?:special magic (?:number|word) for \w+\?|What is \w+\?) The special magic (?:number|word) for \w+ is( ?)\S", text)
    assert answers and all(space == " " for space in answers)  # "... is 20", not "... is20"
    assert " ; " not in text and "mqar" not in text  # no PLAIN multi-query documents


def test_demo_falls_back_to_an_untrained_model(tmp_path, monkeypatch, capsys):
    def missing():
        raise HeadscopeError("the demo model is missing")

    monkeypatch.setattr(headscope.zoo, "demo_model_path", missing)
    args = ["--length", "32", "--pairs", "1", "--probes", "needle_single", "--no-progress", "--no-hybrid"]
    assert main(["demo", "--out", str(tmp_path), *args]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "mask 7:1" in out
    assert (tmp_path / "untrained-model" / "config.json").is_file()
    load_mask(tmp_path / "mask.json", expect=load_model(tmp_path / "untrained-model").fingerprint)


def test_demo_keeps_rope_dependent_heads_off_full_attention(tiny_dir, tmp_path, monkeypatch):
    """A head the rope scorer marks as RoPE-dependent is not put on the (NoPE) FA branch; rope files are reused."""
    import headscope.patching.rope as rope
    from dataclasses import replace

    settings = DemoSettings(length=64, n_pairs=2, probes=PROBES, progress=False, build_hybrid=False)
    plain = run_demo(tiny_dir, tmp_path / "plain", replace(settings, rope_aware=False), log=lambda *a: None)
    top = plain.mask.heads()[0]
    real, calls = rope.rope_dependence_scores, []

    def marked(lm, probe, progress=True):  # the real scorer's file, with only ``top`` marked as needing RoPE
        calls.append(probe.name)
        scores = real(lm, probe, progress=False)
        scores.values.zero_()
        scores.values[top.layer, top.head] = 0.6
        scores.meta.update(ld_clean=5.0, ld_corrupt=0.0)
        return scores

    monkeypatch.setattr(rope, "rope_dependence_scores", marked)
    monkeypatch.setattr(rope, "MIN_GAP", -math.inf)  # the random model solves nothing: score every probe
    lines: list[str] = []
    aware = run_demo(tiny_dir, tmp_path / "aware", settings, log=lines.append)
    assert aware.excluded == [top] and top not in aware.mask.heads() and aware.mask.n_full == plain.mask.n_full
    assert aware.mask.provenance["selection"]["excluded"] == [str(top)]
    assert sorted(calls) == sorted(PROBES) and all((tmp_path / "aware" / "scores" / f"{p}.rope.json").is_file() for p in PROBES)
    assert "RoPE-dependent heads kept off full attention (rope >= 0.25 on the 3 probes" in "\n".join(lines)
    again = run_demo(tiny_dir, tmp_path / "aware", settings, log=lines.append)
    assert len(calls) == len(PROBES) and again.mask.heads() == aware.mask.heads() and "reused 3 rope score files" in lines
    monkeypatch.setattr(rope, "MIN_GAP", 2.0)  # with the real gap rule nothing is scored on a random model
    none = run_demo(tiny_dir, tmp_path / "none", settings, log=lines.append)
    assert none.rope_scores == [] and none.excluded == [] and none.mask.heads() == plain.mask.heads()


def test_rope_dependent_heads_ignore_unsolved_probes_and_refuse_other_methods():
    from headscope.heads import Head, HeadScores, ModelFingerprint
    from headscope.patching.rope import rope_dependent_heads

    fp = ModelFingerprint("llama", 2, 3, 3, 8, "t")
    def scores(cells, gap, method="rope"):
        values = torch.zeros(2, 3)
        for (layer, head), value in cells.items():
            values[layer, head] = value
        return HeadScores(values=values, probe="p", method=method, fingerprint=fp, capability="retrieval",
                          meta={"ld_clean": gap, "ld_corrupt": 0.0})
    solved, unsolved = scores({(1, 2): 0.3, (0, 1): 0.24, (0, 0): 0.25}, 3.0), scores({(1, 0): 0.9}, 0.5)
    assert rope_dependent_heads([solved, unsolved]) == [Head(0, 0), Head(1, 2)]
    assert rope_dependent_heads([solved, unsolved], threshold=0.2, min_gap=0.0) == [Head(0, 0), Head(0, 1), Head(1, 0), Head(1, 2)]
    with pytest.raises(HeadscopeError, match="expected rope scores"):
        rope_dependent_heads([scores({}, 3.0, method="direct")])


def test_the_mask_is_fused_from_solved_probes_only():
    """An unsolved probe's normalised scores are noise divided by a near-zero gap (on SmolLM2 comparison's reached
    |3.55| against 0.15-0.66 for solved probes): the demo fuses the others and says which it left out."""
    from headscope.demo import solved_scores
    from headscope.heads import HeadScores, ModelFingerprint

    fp = ModelFingerprint("qwen3", 2, 2, 1, 8)
    make = lambda probe, gap: HeadScores(torch.ones(2, 2), probe, "direct", fp, "retrieval", {"ld_clean": gap, "ld_corrupt": 0.0})  # noqa: E731
    lines = []
    kept = solved_scores([make("needle", 5.0), make("comparison", 0.17)], lines.append)
    assert [s.probe for s in kept] == ["needle"] and "not fused" in lines[0] and "comparison (+0.17)" in lines[0]
    lines.clear()
    assert len(solved_scores([make("a", 0.1), make("b", -0.2)], lines.append)) == 2 and "solves none" in lines[0]
