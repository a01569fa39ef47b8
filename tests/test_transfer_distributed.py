"""The multi-process transfer path: 2 CPU processes (gloo) under torchrun, DDP and FSDP2, against one process."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from conftest import VOCAB, beside_torchrun, save_model, tiny_qwen3
from headscope.transfer import run_transfer

WORKER = Path(__file__).with_name("transfer_dist_worker.py")


def test_two_processes_match_one(tmp_path):
    model_dir = save_model(tiny_qwen3(), tmp_path / "model")
    rng = random.Random(0)
    with open(tmp_path / "docs.jsonl", "w") as stream:
        for _ in range(60):
            stream.write(json.dumps({"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randrange(10, 60))]}) + "\n")
    config = {
        "model": model_dir, "hybrid": {"baseline": "random", "ratio": "3:1"},
        "data": {"paths": [str(tmp_path / "docs.jsonl")], "heldout_fraction": 0.1, "eval_sequences": 2},
        "stages": [{"kind": "align", "steps": 2, "lr": 3e-3, "batch_size": 4, "seq_len": 24},
                   {"kind": "distill", "steps": 2, "lr": 1e-3, "batch_size": 4, "micro_batch": 1, "seq_len": 24, "ce_weight": 0.5}],
        "log_every": 1, "progress": False,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(config, distributed="ddp")))
    single, _ = beside_torchrun(WORKER, [str(tmp_path / "run.yaml"), str(tmp_path / "dist")], lambda: run_transfer(config, tmp_path / "single"))
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["ddp_exit"] == 0
    digests = report["fsdp"]["digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "FSDP: the ranks gathered different parameters"
    assert math.isfinite(report["fsdp"]["final_loss"])
    ddp_log = [json.loads(line) for line in open(tmp_path / "dist" / "ddp" / "log.jsonl")]
    assert ddp_log[-1]["event"] == "eval" and all(math.isfinite(r.get("loss", 0.0)) for r in ddp_log)

    from transformers import AutoModelForCausalLM

    import headscope.hybrid  # noqa: F401  (registers the hybrid with the Auto classes)

    expected = single.model.state_dict()
    for strategy in ("ddp", "fsdp"):
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "dist" / strategy / "final").state_dict()
        # Same global batches; only the reduction order differs, which Adam amplifies to ~1e-5 where grads are tiny.
        for name, value in expected.items():
            error = float((final[name] - value).norm() / value.norm().clamp_min(1e-12))
            assert error < 1e-3, f"{strategy} {name}: relative error {error:.2e} against one process"
