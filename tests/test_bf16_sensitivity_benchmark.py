"""benchmarks/bf16_sensitivity.py on a tiny local Llama: both models and every section written; each layer's
local error is exactly 0 when the "low" precision is float32 itself; a fault planted in the GDN branch's bf16
path shows in that branch's local error and not in a clean run; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("bf16_sensitivity")


@pytest.fixture(scope="module")
def models(benchmark, llama_dir):
    from headscope.hybrid import build_hybrid
    from headscope.mask import random_mask
    from headscope.models import load_model

    lm = load_model(llama_dir, dtype=torch.float32)
    ids = torch.arange(2, 42)[None]
    return lm.model, build_hybrid(lm, random_mask(lm.fingerprint, n_full=2, seed=0, kv_aware=True)).eval(), ids


def test_the_run_writes_both_models_and_every_section(benchmark, llama_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert benchmark.main(["--model", llama_dir, "--random-mask", "0", "--tokens", "24"]) == 0
    results = json.loads((tmp_path / "bf16_sensitivity.json").read_text())["results"]
    assert set(results) == {"original", "hybrid", "hybrid, gamma calibrated"}
    for name in results:
        assert set(results[name]) == {"float32", "local", "residual", *benchmark.VARIANTS}
        stream = results[name]["residual"]
        assert len(stream["drift"]) == 2 and all(0 < err < 0.05 for err in stream["drift"])
        assert all(first > 0 and others > 0 for first, others in zip(stream["first_token_max"], stream["other_tokens_max"]))
        assert len(results[name]["local"]) == 2 and all(0 < row["out"] < 0.05 for row in results[name]["local"])
        assert all(result["kl"] >= 0 and 0 <= result["top1_agree"] <= 1 for key, result in results[name].items() if key in benchmark.VARIANTS)
    assert any("_gated_delta" in row for row in results["hybrid"]["local"])
    assert "| hybrid |" in (tmp_path / "bf16_sensitivity.md").read_text()


def test_local_error_is_zero_at_float32_and_finds_a_planted_gdn_fault(benchmark, models, monkeypatch, one_thread):
    from headscope.hybrid.layer import HeadwiseHybridAttention

    original, hybrid, ids = models
    for model in (original, hybrid):
        assert all(value == 0 for row in benchmark.local(model, ids, torch.float32) for key, value in row.items() if key not in ("layer", "n_fa", "n_gdn"))
    clean = benchmark.local(hybrid, ids)
    gated = HeadwiseHybridAttention._gated_delta

    def faulty(self, x, *args, **kwargs):  # a 5% error only on the bf16 path
        out = gated(self, x, *args, **kwargs)
        return out * 1.05 if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(HeadwiseHybridAttention, "_gated_delta", faulty)
    planted = benchmark.local(hybrid, ids)
    gdn_rows = [i for i, row in enumerate(clean) if "_gated_delta" in row]
    assert gdn_rows and all(clean[i]["_gated_delta"] < 0.02 < 0.04 < planted[i]["_gated_delta"] for i in gdn_rows)
    assert all(planted[i].get("_full_attention", 0) == clean[i].get("_full_attention", 0) for i in range(len(clean)))


def test_bad_input_is_one_line_and_exit_2(benchmark, llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    bad_mask = tmp_path / "other_model_mask.json"
    bad_mask.write_text("{}")
    for argv in (["--model", str(tmp_path / "missing"), "--random-mask", "0"], ["--model", llama_dir, "--random-mask", "0", "--tokens", "1"],
                 ["--model", llama_dir, "--mask", str(tmp_path / "missing.json")], ["--model", llama_dir, "--mask", str(bad_mask)]):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("bf16_sensitivity: ")
    assert sorted(tmp_path.iterdir()) == [bad_mask]


def test_a_trained_hybrid_is_compared_with_its_original(benchmark, models, llama_dir, tmp_path, monkeypatch, one_thread):
    _, hybrid, _ = models
    hybrid.save_pretrained(tmp_path / "run" / "final")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert benchmark.main(["--model", llama_dir, "--hybrid", str(tmp_path / "run" / "final"), "--tokens", "24"]) == 0
    saved = json.loads((tmp_path / "out" / "bf16_sensitivity.json").read_text())
    assert set(saved["results"]) == {"original", "hybrid, trained"} and saved["meta"]["mask"].startswith("trained hybrid ")
    assert any("_gated_delta" in row for row in saved["results"]["hybrid, trained"]["local"])
    assert "## Trained hybrid, per layer" in (tmp_path / "out" / "bf16_sensitivity.md").read_text()
    with pytest.raises(SystemExit) as exit_:  # the original is no hybrid
        benchmark.main(["--model", llama_dir, "--hybrid", llama_dir, "--tokens", "24"])
    assert exit_.value.code == 2


def test_the_mixed_precision_runs_leave_the_model_as_it_was(benchmark, models, one_thread):
    _, hybrid, ids = models
    before = {name: t.clone() for name, t in [*hybrid.state_dict().items(), *hybrid.named_buffers()]}
    ref = benchmark.log_probs(hybrid, ids)
    benchmark.mixed(hybrid, ids)
    after = dict([*hybrid.state_dict().items(), *hybrid.named_buffers()])
    assert before.keys() == after.keys() and all(t.dtype == after[n].dtype and torch.equal(t, after[n]) for n, t in before.items())
    assert torch.equal(benchmark.log_probs(hybrid, ids), ref)
    with benchmark.at_precision(hybrid, torch.bfloat16, torch.bfloat16) as low:  # the rotary table stays float32
        assert all(b.dtype == torch.float32 for n, b in low.named_buffers() if n.endswith("inv_freq"))
        assert low.lm_head.weight.dtype == torch.bfloat16
