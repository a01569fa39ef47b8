"""The multi-process transfer path: 2 CPU processes (gloo) under torchrun, DDP and FSDP2 against one process,
and a rank killed mid-run, restarted by torchrun with ``--resume``, against the uninterrupted run.

One torchrun launch (``transfer_dist_worker.py``) makes every run; the tests below read what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import VOCAB, save_model, tiny_qwen3
from headscope.transfer import run_transfer

WORKER = Path(__file__).with_name("transfer_dist_worker.py")
KILL_TAG = "s01-distill-00000002"  # rank 0 dies writing this checkpoint; the last complete one is distill step 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The worker's runs (``root/dist/{ddp,fsdp,killed}``, its output) and the single-process run of the same config."""
    root = tmp_path_factory.mktemp("transfer_dist")
    model_dir = save_model(tiny_qwen3(), root / "model")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as stream:
        for _ in range(60):
            stream.write(json.dumps({"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randrange(10, 60))]}) + "\n")
    config = {
        "model": model_dir, "hybrid": {"baseline": "random", "ratio": "3:1"},
        "data": {"paths": [str(root / "docs.jsonl")], "heldout_fraction": 0.1, "eval_sequences": 2},
        "stages": [{"kind": "align", "steps": 2, "lr": 3e-3, "batch_size": 4, "seq_len": 24},
                   {"kind": "distill", "steps": 3, "lr": 1e-3, "batch_size": 4, "micro_batch": 1, "seq_len": 24, "ce_weight": 0.5}],
        "log_every": 1, "checkpoint_every": 1, "progress": False,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(dict(config, distributed="ddp")))
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                               str(WORKER), str(root / "run.yaml"), str(root / "dist"), KILL_TAG],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the single-process reference runs while the two workers start up
        single = run_transfer(config, root / "single")
    finally:
        torch.set_num_threads(before)
    try:
        output, _ = launch.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and its two workers (their own session, see Popen)
        raise
    assert launch.returncode == 0, output[-3000:]  # torchrun returns 0 only when both ranks of the last attempt exit 0
    return {"dist": root / "dist", "single": single, "output": output}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    import headscope.hybrid  # noqa: F401  (registers the hybrid with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def log_records(run_dir: Path) -> list[dict]:
    """The run's log without its wall-clock times."""
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in open(run_dir / "log.jsonl")]


def test_two_processes_match_one(runs):
    report = json.loads((runs["dist"] / "report.json").read_text())
    assert report["ddp_exit"] == 0
    digests = report["fsdp"]["digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "FSDP: the ranks gathered different parameters"
    assert math.isfinite(report["fsdp"]["final_loss"])
    ddp_log = [json.loads(line) for line in open(runs["dist"] / "ddp" / "log.jsonl")]
    assert ddp_log[-1]["event"] == "eval" and all(math.isfinite(r.get("loss", 0.0)) for r in ddp_log)
    expected = runs["single"].model.state_dict()
    for strategy in ("ddp", "fsdp"):
        final = final_state(runs["dist"] / strategy)
        # Same global batches; only the reduction order differs, which Adam amplifies to ~1e-5 where grads are tiny.
        for name, value in expected.items():
            error = float((final[name] - value).norm() / value.norm().clamp_min(1e-12))
            assert error < 1e-3, f"{strategy} {name}: relative error {error:.2e} against one process"


def test_killed_rank_resumes_without_losing_a_step(runs):
    """Rank 0 died (SIGKILL) writing the checkpoint of distill step 2; torchrun restarted both ranks with ``--resume``:
    the run continued from the last complete checkpoint, left no half-written one behind, and ended with the
    weights and the log of the uninterrupted run (``ddp``), bit for bit."""
    killed, reference = runs["dist"] / "killed", runs["dist"] / "ddp"
    assert "exitcode: -9" in runs["output"], runs["output"][-3000:]  # torchrun saw the kill and restarted the ranks
    assert json.loads((killed / "result.json").read_text())["resumed_from"].endswith("s01-distill-00000001")
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["latest.json", "s01-distill-00000002", "s01-distill-00000003"]
    records = log_records(killed)
    assert [(r["stage"], r["step"]) for r in records if r["event"] == "train"] == [
        ("align", 1), ("align", 2), ("distill", 1), ("distill", 2), ("distill", 3)]  # every step once
    assert records == log_records(reference)
    expected, final = final_state(reference), final_state(killed)
    assert all(torch.equal(final[name], value) for name, value in expected.items())
