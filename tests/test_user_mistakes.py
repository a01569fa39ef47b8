"""What a new user hit (issue 16), through the real ``headscope`` process where it is about the CLI:
one line and exit 2 for every mistake, exit 130 on Ctrl-C, no write into a model directory, every pair
of a probe file scored, a built hybrid that loads with ``AutoModelForCausalLM``, umask-respecting files."""

from __future__ import annotations

import argparse
import hashlib
import re
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import random_probe
from headscope import HeadScores, load_model
from headscope.cli import main
from headscope.heads import HeadscopeError, write_json_atomic, write_text_atomic
from headscope.patching import activation_scores
from headscope.probes import save_probe_jsonl

REPO = Path(__file__).resolve().parents[1]


def clis(*argvs: list[str], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``python -m headscope.cli ARGV`` (what the ``headscope`` script runs) for each argv, all at once, in
    fresh processes under umask 022."""
    return run_pythons(*(["-m", "headscope.cli", *argv] for argv in argvs), env=env)


def cli(*args: str) -> subprocess.CompletedProcess:
    return clis(list(args))[0]


def run_pythons(*argvs: list[str], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    running = [(argv, subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                       env=environment, preexec_fn=lambda: os.umask(0o022))) for argv in argvs]
    done = [(argv, proc, proc.communicate(timeout=600)) for argv, proc in running]
    return [subprocess.CompletedProcess(argv, proc.returncode, out, err) for argv, proc, (out, err) in done]


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and one ``headscope: error:`` line; transformers' weight-loading bar may come before it."""
    lines = [line for line in proc.stderr.strip().splitlines() if "it/s]" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("headscope: error:") and message in lines[0], proc.stderr


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def model_copy(qwen3_dir, tmp_path) -> Path:
    """A private copy of the tiny Qwen3 model, so a test that writes into it by mistake harms nobody else."""
    return Path(shutil.copytree(qwen3_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def hybrid_dir(qwen3_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "hybrid"
    assert main(["build", "--model", qwen3_dir, "--random", "3:1", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: then sysfs)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
        return folder
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("running as root with a writable /sys: no unwritable directory to test with")


# --- defect 1: an --out over the model directory -------------------------------------------------------
def test_build_never_writes_into_the_model_directory(model_copy, tmp_path, capsys):
    before = digest(model_copy)
    build = ["build", "--model", str(model_copy), "--random", "3:1", "--out"]
    over, inside = clis(build + [str(model_copy)], build + [str(model_copy / "hybrid")])
    assert_one_line_error(over, "is the model directory")
    assert_one_line_error(inside, "is inside the model directory")
    assert digest(model_copy) == before and not (model_copy / "hybrid").exists()

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    build = ["build", "--model", str(model_copy), "--random", "3:1", "--out", str(foreign), "--device", "cpu"]
    assert main(build) == 2
    assert "is not empty and holds no unchanged hybrid built by `headscope build`" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    assert main(build + ["--force"]) == 0  # writes beside the user's file
    assert (foreign / "todo.txt").read_text() == "mine" and (foreign / "config.json").is_file()
    assert main(build) == 0  # a previous build is overwritten without --force
    assert not [p for p in foreign.iterdir() if p.name.startswith(".")], "the staging folder was left behind"


def test_a_rebuild_replaces_the_previous_build_and_nothing_else(model_copy, tmp_path, monkeypatch):
    """A previous build is what ``headscope_build.json`` lists, unchanged: a rebuild removes the files of it that it
    does not write again (here a sharded layout, whose stale index transformers would otherwise read), keeps a
    file the user added, and a hybrid saved over the build (trained since) is no previous build at all."""
    from transformers import AutoModelForCausalLM, PreTrainedModel  # (the hybrid is registered: headscope is imported)

    out = tmp_path / "hybrid"
    build = ["build", "--model", str(model_copy), "--random", "3:1", "--out", str(out), "--device", "cpu"]
    save = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **kw: save(self, folder, **{**kw, "max_shard_size": "40KB"}))
    assert main(build + ["--init-seed", "1"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    assert main(build) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "notes.txt" in names and not [n for n in names if "-of-" in n or n.endswith(".index.json")]
    assert AutoModelForCausalLM.from_pretrained(out).config.init_seed == 0
    trained = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        trained.lm_head.weight.add_(1.0)
    trained.save_pretrained(out)  # as `headscope transfer` writes its final/
    before = digest(out)
    assert main(build) == 2 and digest(out) == before
    assert main(build + ["--force"]) == 0


def test_built_files_get_the_usual_mode(hybrid_dir):
    """safetensors writes owner-only files; every file of a build gets what ``open()`` would give (0o644 under umask 022)."""
    from headscope.heads import file_mode

    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in hybrid_dir.iterdir()} == {p.name: file_mode() for p in hybrid_dir.iterdir()}


def test_every_directory_writer_refuses_the_model_directory(model_copy, tmp_path, capsys):
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(model_copy), "hybrid": {"baseline": "random", "ratio": "3:1"}, "data": {"paths": ["corpus"]},
        "stages": [{"kind": "align", "steps": 1, "lr": 1e-3, "batch_size": 1, "seq_len": 16}]}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    model = str(model_copy)
    cases = [
        (["demo", "--model", model, "--out", model], "is the model directory"),
        (["demo", "--model", model, "--out", str(foreign)], "holds no output of `headscope demo`"),
        (["score", "--model", model, "--probe", "induction", "--probe", "ioi", "--out", model + "/scores"], "inside the model directory"),
        (["score", "--model", model, "--probe", "induction", "--probe", "ioi", "--out", str(foreign)], "holds no headscope scores"),
        (["score", "--model", model, "--probe", "induction", "--out", model + "/config.json"], "inside the model directory"),
        (["transfer", "--config", str(tmp_path / "run.yaml"), "--out", model + "/run"], "inside the model directory"),
        (["mask", "random", "--model", model, "--out", model + "/config.json"], "inside the model directory"),
    ]
    before = digest(model_copy)
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert digest(model_copy) == before and sorted(p.name for p in model_copy.iterdir()) == sorted(before)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


# --- defect 2: a probe file cut to 16 pairs ---------------------------------------------------------------
def test_a_probe_file_is_scored_on_every_pair(qwen3_dir, tmp_path, capsys):
    probe = random_probe(n_pairs=64, length=10, seed=5)
    probe_file = tmp_path / "mine.jsonl"
    save_probe_jsonl(probe, probe_file)
    out = tmp_path / "mine.json"
    proc = cli("score", "--model", qwen3_dir, "--probe", str(probe_file), "--out", str(out), "--device", "cpu", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "64 pairs x 10 tokens" in proc.stdout
    scores = HeadScores.load(out)
    assert scores.meta["n_pairs"] == 64
    torch.testing.assert_close(scores.values, activation_scores(load_model(qwen3_dir), probe, progress=False).values, atol=1e-5, rtol=0)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # defect 5, through the CLI: umask 022

    assert main(["score", "--model", qwen3_dir, "--probe", str(probe_file), "--pairs", "100", "--out", str(tmp_path / "all.json")]) == 0
    printed = capsys.readouterr().out
    assert "holds 64 pairs; --pairs 100 scores all of them" in printed and "64 pairs x 10 tokens" in printed
    assert main(["score", "--model", qwen3_dir, "--probe", str(probe_file), "--pairs", "8", "--out", str(tmp_path / "cap.json")]) == 0
    assert "8 pairs x 10 tokens" in capsys.readouterr().out and HeadScores.load(tmp_path / "cap.json").meta["n_pairs"] == 8


# --- defect 3: tracebacks where one line was promised --------------------------------------------------
def test_bad_inputs_print_one_line(model_copy, hybrid_dir, unwritable, tmp_path):
    bad_model = Path(shutil.copytree(model_copy, tmp_path / "bad-model"))
    (bad_model / "config.json").write_text('{"model_type": "qwen3", ')
    probe_file = tmp_path / "latin1.jsonl"
    save_probe_jsonl(random_probe(n_pairs=2, length=6), probe_file)
    probe_file.write_bytes(probe_file.read_bytes() + '{"clean": "caf\u00e9"}\n'.encode("latin-1"))
    good_probe = tmp_path / "good.jsonl"
    save_probe_jsonl(random_probe(n_pairs=2, length=6), good_probe)
    model = str(model_copy)
    cases = [
        (["--model", str(bad_model), "--probe", "induction"], "config.json is not valid JSON"),
        (["--model", model, "--probe", str(probe_file)], f"{probe_file}, line 3: not UTF-8 text (byte 0xe9)"),
        (["--model", str(hybrid_dir), "--probe", "induction"], "is a head-wise hybrid built by headscope"),
    ]
    cases.append((["--model", model, "--probe", str(good_probe)], f"cannot write {unwritable / 's.json'}"))
    outs = [str(tmp_path / "s.json")] * 3 + [str(unwritable / "s.json")]
    for (extra, message), out, proc in zip(cases, outs, clis(*(["score", "--out", out, *extra] for (extra, _), out in zip(cases, outs)))):
        assert_one_line_error(proc, message)
        assert proc.stdout == ""  # refused before any scoring: no summary line


def test_ctrl_c_prints_one_line_and_exits_130(qwen3_dir, tmp_path, capsys):
    """A real SIGINT during the second probe: one line, exit 130, the first probe's scores kept for --resume."""
    files = []
    for seed in (1, 2):
        files.append(tmp_path / f"p{seed}.jsonl")
        save_probe_jsonl(random_probe(n_pairs=2, length=8, seed=seed), files[-1])
    out = tmp_path / "scores"
    argv = ["score", "--model", qwen3_dir, "--probe", str(files[0]), "--probe", str(files[1]), "--out", str(out), "--device", "cpu"]
    script = f"""
import os, signal, sys, time
import headscope.patching as patching
from headscope.cli import main
real, calls = patching.score, []
def score(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
    return real(*args, **kwargs)
patching.score = score
sys.exit(main({argv!r}))
"""
    (proc,) = run_pythons(["-c", script])
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "headscope: interrupted; rerun with --resume to keep finished probes"
    assert sorted(p.name for p in out.iterdir()) == ["p1.activation.json"]
    assert main(argv + ["--resume"]) == 0
    assert "p1 [activation] already scored" in capsys.readouterr().out


# --- defect 4: a built hybrid that does not load ------------------------------------------------------------
def test_a_built_hybrid_loads_with_auto_classes(hybrid_dir, tmp_path):
    from headscope.hybrid import HybridForCausalLM

    config = json.loads((hybrid_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "headscope_hybrid.HybridForCausalLM"
    ids = torch.randint(2, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = HybridForCausalLM.from_pretrained(hybrid_dir)(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    load = """
import sys, torch
{head}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}{extra})
with torch.no_grad():
    torch.save(model(torch.load({ids!r})).logits, {out!r})
"""
    after_import = "import headscope\nassert 'transformers' not in sys.modules and 'triton' not in sys.modules  # import headscope stays light"
    ways = {"import": (after_import, ""), "remote": ("", ", trust_remote_code=True")}
    scripts = [["-c", load.format(head=head, path=str(hybrid_dir), extra=extra, ids=str(tmp_path / "ids.pt"), out=str(tmp_path / f"{name}.pt"))]
               for name, (head, extra) in ways.items()]
    for name, proc in zip(ways, run_pythons(*scripts, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})):
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected, atol=0, rtol=0)


# --- defect 5: owner-only files ----------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        paths = [write_text_atomic(tmp_path / "report.html", "<html/>"), write_json_atomic(tmp_path / "mask.json", {"a": 1})]
    finally:
        os.umask(before)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode, mode]


def test_atomic_write_into_a_file_path_is_one_error(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(HeadscopeError, match="cannot write"):
        write_json_atomic(tmp_path / "plain" / "mask.json", {})
    assert (tmp_path / "plain").read_text() == "x"


# --- smaller things ------------------------------------------------------------------------------------------
def test_help_texts_speak_to_users():
    proc = cli("--help")
    assert proc.returncode == 0 and "headscope.commands" not in proc.stdout and "``" not in proc.stdout
    assert "Find the attention heads" in proc.stdout

    from headscope.cli import build_parser
    from headscope.patching import SCORERS

    def parsers(parser):
        yield parser
        for action in parser._actions:
            for child in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    yield from parsers(action.choices[child])

    everything = list(parsers(build_parser()))
    assert len(everything) > 10
    for parser in everything:
        text = parser.format_help()
        assert "``" not in text, parser.prog
        undocumented = [a.dest for a in parser._actions if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        assert not undocumented, (parser.prog, undocumented)
    top_help = build_parser().format_help()
    assert all(method in top_help for method in SCORERS)  # the score summary names every method
    build_help = next(p for p in everything if p.prog.endswith(" build")).format_help()
    assert "written by `headscope mask`" not in build_help and "headscope fuse" in build_help


def test_make_install_says_what_it_does():
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", "install"], capture_output=True, text=True, cwd=REPO, check=True)
    commands = proc.stdout.splitlines()
    installs = [i for i, c in enumerate(commands) if "pip install" in c and not c.startswith("echo")]
    assert len(installs) == 3 and not [commands[i] for i in installs if " -q" in commands[i]], commands  # pip shows its progress
    assert all(commands[i - 1].startswith("echo") for i in installs[1:]), commands  # a line saying what comes (the first follows one too)
    assert commands[0].startswith("echo") and "venv" in commands[0]


def scores_files(tmp_path) -> list[str]:
    """Two direct + path score files of one probe on a 6 x 8 (48-head) model."""
    from headscope import HeadScores, ModelFingerprint

    fp = ModelFingerprint("qwen3", 6, 8, 4, 16, "six-by-eight")
    values = torch.linspace(-1, 1, 48).view(6, 8)
    return [str(HeadScores(values * (i + 1), "kv_recall", method, fp, "retrieval").save(tmp_path / f"kv_recall.{method}.json"))
            for i, method in enumerate(("direct", "path"))]


def test_a_ratio_the_heads_cannot_meet_is_reported_and_recorded(tmp_path, capsys):
    from headscope.mask import load_mask

    files = scores_files(tmp_path)
    assert main(["fuse", *files, "--ratio", "1000:1", "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "note: ratio 1000:1 cannot be met exactly with 48 heads; the mask keeps 1 at full attention, 47:1" in printed
    mask = load_mask(tmp_path / "m.json")
    assert mask.n_full == 1 and mask.provenance["ratio"] == "47:1" and mask.provenance["selection"]["requested_ratio"] == "1000:1"
    assert main(["fuse", *files, "--ratio", "7:1", "--out", str(tmp_path / "m7.json")]) == 0
    assert "note:" not in capsys.readouterr().out
    exact = load_mask(tmp_path / "m7.json")
    assert exact.provenance["ratio"] == "7:1" and "requested_ratio" not in exact.provenance["selection"]


def test_exclude_accepts_and_names_both_head_spellings(tmp_path, capsys):
    from headscope.mask import load_mask

    files = scores_files(tmp_path)
    assert main(["fuse", *files, "--n-full", "6", "--exclude", "L5H7,5.6", "--out", str(tmp_path / "m.json")]) == 0
    assert load_mask(tmp_path / "m.json").provenance["selection"]["excluded"] == ["L5H6", "L5H7"]
    assert main(["fuse", *files, "--exclude", "foo", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "expected LxHy or LAYER.HEAD, e.g. L3H5 or 3.5" in err and err.count("\n") == 1


def test_report_takes_the_mask_as_a_positional_file(tmp_path, capsys):
    files = scores_files(tmp_path)
    assert main(["fuse", *files, "--out", str(tmp_path / "mask.json")]) == 0
    assert main(["report", *files, str(tmp_path / "mask.json"), "--out", str(tmp_path / "r.html")]) == 0
    assert f"report of 2 score files and the mask {tmp_path / 'mask.json'}" in capsys.readouterr().out
    assert "<h2>Head mask</h2>" in (tmp_path / "r.html").read_text()
    assert main(["report", *files, str(tmp_path / "mask.json"), "--mask", str(tmp_path / "mask.json"), "--out", str(tmp_path / "r.html")]) == 2
    assert "are both masks" in capsys.readouterr().err


def test_report_lists_each_probe_once_and_shows_every_legend_entry(tmp_path):
    from headscope import HeadScores
    from headscope.fusion import fuse
    from headscope.mask import select_mask
    from headscope.reports import LEGEND_COLUMNS, build_report_html, layer_distributions

    scores = [HeadScores.load(path) for path in scores_files(tmp_path)]  # direct and path of one probe
    mask = select_mask(fuse(scores), ratio="7:1")
    assert mask.provenance["probes"] == ["kv_recall"]
    page = build_report_html(scores, mask)
    assert "<th>probes</th><td>kv_recall</td>" in page

    many = [HeadScores(s.values, f"probe{i}", s.method, s.fingerprint, "retrieval") for i in range(20) for s in scores[:1]]
    layout = layer_distributions(many).layout
    assert layout.legend.orientation == "h" and layout.legend.yanchor == "top" and layout.legend.y < 0  # below the plot
    rows = -(-len(many) // LEGEND_COLUMNS)
    assert layout.height >= layer_distributions(many[:1]).layout.height + 20 * (rows - 1)  # grows with the legend rows


def test_progress_bars_count_whole_heads(qwen3_dir, capsys):
    from headscope.patching import direct_scores
    from headscope.patching.path import path_scores

    lm = load_model(qwen3_dir)
    probe = random_probe(n_pairs=3, length=8, seed=3)
    activation_scores(lm, probe, batch_size=2)  # 2 of the 3 pairs per batch: a head finishes mid-batch
    direct_scores(lm, probe, batch_size=2)
    path_scores(lm, probe, n_receivers=2, batch_size=2)
    bars = capsys.readouterr().err
    assert "12/12" in bars and "8/8" in bars
    assert not re.search(r"\d+\.\d+/\d+", bars), bars


def test_duo_export_never_replaces_a_model_config(model_copy, tmp_path, capsys):
    from headscope import ModelFingerprint
    from headscope.mask import random_mask, save_mask

    save_mask(random_mask(ModelFingerprint("qwen3", 3, 4, 2, 24), n_full=2), tmp_path / "m.json")
    before = digest(model_copy)
    export = ["mask", "export", str(tmp_path / "m.json"), "--format", "tsv", "--sink-size", "4", "--recent-size", "64", "--out"]
    assert main(export + [str(model_copy / "full_attention_heads.tsv")]) == 2
    assert "is not DuoAttention's" in capsys.readouterr().err and digest(model_copy) == before
    assert main(export + [str(tmp_path / "duo" / "full_attention_heads.tsv")]) == 0
    assert main(export + [str(tmp_path / "duo" / "full_attention_heads.tsv")]) == 0  # its own config.json is replaced
    assert json.loads((tmp_path / "duo" / "config.json").read_text()) == {"sink_size": 4, "recent_size": 64}
