"""benchmarks/align_only.py on the bundled demo model: every arm is written, KV-matched, and a rerun resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from headscope.zoo import demo_model_path

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("align_only_benchmark", ROOT / "benchmarks" / "align_only.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_are_aligned_evaluated_and_resumed(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "the cat sat on the mat and the dog ran to the park . " * 10}) + "\n" for _ in range(60)))
    mask = ROOT / "benchmarks" / "results" / "rope_aware_mask.json"
    argv = ["--model", str(demo_model_path()), "--data", str(docs), "--mask", f"sel={mask}", "--random-seeds", "0",
            "--steps", "2", "--length", "48", "--eval-length", "128", "--pairs", "2", "--probes", "needle_single",
            "--heldout-rows", "2", "--calibrate-rows", "2", "--out", str(tmp_path / "out")]
    benchmark = load_benchmark()
    assert benchmark.main(argv) == 0
    data = json.loads((tmp_path / "out" / "align_only.json").read_text())
    assert list(data["arms"]) == ["teacher", "sel", "randomkv_s0"]
    sel, rand = data["arms"]["sel"], data["arms"]["randomkv_s0"]
    assert (sel["n_full"], sel["kv_groups"]) == (rand["n_full"], rand["kv_groups"]) and sel["heads"] != rand["heads"]
    assert data["arms"]["teacher"]["accuracy"]["needle_single"]["128"]["argmax"] == 1.0
    assert "| randomkv_s0 |" in (tmp_path / "out" / "align_only.md").read_text()
    capsys.readouterr()
    assert benchmark.main(argv) == 0  # same settings: nothing reruns
    assert "CE" not in capsys.readouterr().out.split("# Align-only")[0]
    for bad in (argv[:4] + ["--mask", "bad"], ["--model", "x", "--data", str(tmp_path / "missing.jsonl"), "--mask", f"sel={mask}"]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(bad)
        assert exit_info.value.code == 2
