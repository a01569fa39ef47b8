"""benchmarks/rope_dependence.py end to end on the bundled demo model (one probe, two pairs): scores
for every head, and the cross-reference with the committed hybrid_quality masks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "rope_dependence.py"


def test_rope_dependence_benchmark_writes_scores_and_mask_cross_reference(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("rope_dependence_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    quality = {"settings": {"lengths": [1024]}, "arms": {
        "headwise_fused_7to1": {"mask": {"full_attention_heads": [[2, 6], [3, 0]]},
                                "accuracy": {p: {"1024": {"argmax": 0.5}} for p in ("needle_single", "needle_multikey", "kv_recall")}},
        "layerwise_3to1": {"mask": {"full_attention_heads": [[2, 6]]},
                           "accuracy": {p: {"1024": {"argmax": 0.25}} for p in ("needle_single", "needle_multikey", "kv_recall")}}}}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert benchmark.main(["--probes", "kv_recall", "--pairs", "2", "--length", "128", "--threshold", "-1",
                           "--quality", str(tmp_path / "q.json")]) == 0
    record = json.loads((tmp_path / "out" / "rope_dependence.json").read_text())
    assert len(record["scores"]["kv_recall"]) == 6 and len(record["scores"]["kv_recall"][0]) == 8
    assert len(record["rope_dependent_heads"]) == 48  # threshold -1: every head counts
    fused, layerwise = record["arms"]
    assert fused["nope_fa_dependent_heads"] == [[2, 6], [3, 0]] and fused["kv_recall_1x"] == 0.5
    assert layerwise["nope_fa_dependent_heads"] == []  # whole FA layers keep RoPE
    assert "| headwise_fused_7to1 | L2H6, L3H0 | 0.50 | 0.50 |" in (tmp_path / "out" / "rope_dependence.md").read_text()
