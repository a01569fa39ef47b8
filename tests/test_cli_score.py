"""`headscope score` end to end on a local model directory, and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import random_probe
from headscope import HeadScores, load_model
from headscope.cli import main
from headscope.patching import activation_scores
from headscope.probes import save_probe_jsonl


def test_score_writes_loadable_scores(qwen3_dir, tmp_path, capsys):
    probe = random_probe(n_pairs=3, length=10, seed=11)
    probe_file = tmp_path / "mine.jsonl"
    save_probe_jsonl(probe, probe_file)
    out = tmp_path / "scores.json"
    assert main(["score", "--model", qwen3_dir, "--probe", str(probe_file), "--pairs", "3", "--out", str(out), "--device", "cpu"]) == 0
    scores = HeadScores.load(out)
    assert scores.values.shape == (3, 4) and scores.method == "activation"
    expected = activation_scores(load_model(qwen3_dir), probe, progress=False).values
    torch.testing.assert_close(scores.values, expected, atol=1e-5, rtol=0)
    assert "top heads" in capsys.readouterr().out

    # --resume skips the finished probe, and only it: another direction, dtype or edited pairs are scored again
    base = ["score", "--model", qwen3_dir, "--probe", str(probe_file), "--pairs", "3", "--out", str(out), "--resume"]
    assert main(base) == 0
    assert "skipped" in capsys.readouterr().out
    for extra in (["--noising"], ["--dtype", "bfloat16"]):
        assert main(base + extra) == 0
        assert "skipped" not in capsys.readouterr().out, extra
    assert main(base) == 0 and "skipped" not in capsys.readouterr().out  # the file held the bf16 run: float32 again
    assert main(base) == 0 and "skipped" in capsys.readouterr().out
    save_probe_jsonl(random_probe(n_pairs=3, length=10, seed=12), probe_file)  # same count and length, other tokens
    assert main(base) == 0 and "skipped" not in capsys.readouterr().out
    import shutil

    other = tmp_path / "finetuned"  # the same shape and name, other weights (a fine-tune): scored again, not reused
    shutil.copytree(qwen3_dir, other)
    model = load_model(qwen3_dir).model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)
    model.save_pretrained(other)
    again = ["score", "--model", str(other)] + base[3:]
    assert main(again) == 0 and "skipped" not in capsys.readouterr().out
    assert main(again) == 0 and "skipped" in capsys.readouterr().out


def test_user_mistakes_exit_2_with_one_line(qwen3_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing"), "--probe", "induction"], "not a Hugging Face model directory"),
        (["--model", qwen3_dir, "--probe", "bogus_probe"], "unknown probe 'bogus_probe'"),
        (["--model", qwen3_dir, "--probe", "induction", "--pairs", "0"], "--pairs must be at least 1"),
        (["--model", qwen3_dir, "--probe", str(tmp_path / "absent.jsonl")], "absent.jsonl"),
    ]
    for extra, message in cases:
        args = ["score", "--out", str(tmp_path / "x.json")] + extra
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("headscope: error:") and message in err[-1], err


def test_score_never_overwrites_another_kind_of_file_nor_one_probe_with_another(qwen3_dir, tmp_path, capsys):
    probe_file = tmp_path / "a" / "mine.jsonl"
    probe_file.parent.mkdir()
    save_probe_jsonl(random_probe(n_pairs=2, length=10, seed=11), probe_file)
    twin = tmp_path / "b" / "mine.jsonl"  # the same name in another folder
    twin.parent.mkdir()
    save_probe_jsonl(random_probe(n_pairs=2, length=10, seed=12), twin)
    mask = tmp_path / "mask.json"
    mask.write_text('{"kind": "headscope.mask"}')
    cases = [(["--probe", str(probe_file), "--out", str(mask)], "exists and is not a headscope scores file"),
             (["--probe", str(probe_file), "--probe", str(twin), "--out", str(tmp_path / "scores")], "two probes are named mine"),
             (["--probe", "induction", "--probe", "induction", "--out", str(tmp_path / "scores")], "two probes are named induction")]
    for extra, message in cases:
        assert main(["score", "--model", qwen3_dir, "--device", "cpu"] + extra) == 2
        assert message in capsys.readouterr().err
    assert mask.read_text() == '{"kind": "headscope.mask"}' and not (tmp_path / "scores").exists()
    assert main(["score", "--model", qwen3_dir, "--device", "cpu", "--probe", str(probe_file), "--out", str(mask), "--force"]) == 0
    assert HeadScores.load(mask).probe == "mine"


def test_script_main_maps_mistakes_and_ctrl_c_like_the_cli(capsys):
    from headscope.cli import script_main
    from headscope.heads import HeadscopeError

    def mistake():
        raise HeadscopeError("no such file: x.jsonl")

    def interrupted():
        raise KeyboardInterrupt

    for func, code, line in [(mistake, 2, "bench: error: no such file: x.jsonl"), (interrupted, 130, "bench: interrupted"),
                             (lambda: 3, 3, None), (lambda: None, 0, None)]:
        with pytest.raises(SystemExit) as exit_info:
            script_main(func, prog="bench")
        assert exit_info.value.code == code
        err = capsys.readouterr().err.strip().splitlines()
        assert (err[-1].startswith(line) and len(err) == 1) if line else not err

    def bug():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        script_main(bug)


def test_a_probe_the_model_does_not_solve_gets_a_note(qwen3_dir, tmp_path, capsys):
    from headscope.commands.score import gap_note

    assert gap_note({"ld_clean": 9.0, "ld_corrupt": -1.0, "clean_answer_wins": 1.0, "pairs_gap_positive": 1.0}) is None
    swapped = gap_note({"ld_clean": -9.0, "ld_corrupt": 1.0, "clean_answer_wins": 0.0, "pairs_gap_positive": 0.0})
    assert "gap is -10.000" in swapped and "swapped?" in swapped and "0% of the clean prompts" in swapped
    assert "barely solves" in gap_note({"ld_clean": 0.3, "ld_corrupt": 0.0})  # (files from before the per-pair counts)
    assert "barely solves" in gap_note({"ld_clean": 6.0, "ld_corrupt": 0.0, "clean_answer_wins": 0.25, "pairs_gap_positive": 1.0})
    probe_file = tmp_path / "mine.jsonl"  # a random model on random pairs: no gap to speak of
    save_probe_jsonl(random_probe(n_pairs=4, length=10, seed=11), probe_file)
    assert main(["score", "--model", qwen3_dir, "--device", "cpu", "--probe", str(probe_file), "--out", str(tmp_path / "s.json")]) == 0
    assert HeadScores.load(tmp_path / "s.json").capability == "retrieval"  # a .jsonl probe's default
    meta = HeadScores.load(tmp_path / "s.json").meta
    assert meta["clean_answer_wins"] in (0.0, 0.25, 0.5, 0.75, 1.0) and meta["pairs_gap_positive"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert "note: mine: the clean - corrupt gap" in capsys.readouterr().out


def test_a_jsonl_probe_can_be_a_reasoning_probe(qwen3_dir, tmp_path, capsys):
    probe_file = tmp_path / "chain.jsonl"
    save_probe_jsonl(random_probe(n_pairs=2, length=10, seed=11), probe_file)
    out = tmp_path / "chain.json"
    assert main(["score", "--model", qwen3_dir, "--device", "cpu", "--probe", str(probe_file), "--capability", "reasoning", "--out", str(out)]) == 0
    assert HeadScores.load(out).capability == "reasoning"  # fuse's per-capability weights see it as reasoning
