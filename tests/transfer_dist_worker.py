"""Started by tests/test_transfer_distributed.py under ``torchrun --nproc-per-node 2 --max-restarts 1`` (gloo, CPU).

First attempt (``TORCHELASTIC_RESTART_COUNT`` 0), three runs of one config in one process group:

* ``distributed: ddp`` through the command-line entry point (``headscope.transfer.__main__.main``, what
  ``torchrun -m headscope.transfer`` runs) into ``OUT_ROOT/ddp``; the trainer itself checks at every stage
  end that the DDP replicas hold identical weights and fails the run otherwise;
* ``distributed: fsdp`` through ``run_transfer`` into ``OUT_ROOT/fsdp``; every rank's full parameters are
  gathered and hashed; rank 0 writes ``{"ddp_exit": code, "fsdp": {"digests": [...], "final_loss": ...}}``
  to ``OUT_ROOT/report.json``;
* ``ddp`` again into ``OUT_ROOT/killed``, where rank 0, the process that writes checkpoints, is killed
  (SIGKILL) while it writes checkpoint KILL_TAG: after ``state.pt`` is on disk, before the checkpoint is
  renamed into place. torchrun stops rank 1 and starts both again.

Second attempt: ``OUT_ROOT/killed`` continues through the command line with ``--resume`` (what
``torchrun --max-restarts N -m headscope.transfer ... --resume`` does after a crash).

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/transfer_dist_worker.py CONFIG.yaml OUT_ROOT KILL_TAG
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
import yaml

import headscope.transfer.checkpoint as checkpoint
from headscope.transfer import run_transfer
from headscope.transfer.__main__ import main as cli_main


def digest(state: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(state):
        sha.update(name.encode())
        sha.update(state[name].detach().float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def kill_inside_checkpoint(tag: str) -> None:
    """SIGKILL this process when ``save_checkpoint`` writes ``meta.json`` of checkpoint ``tag`` (``state.pt`` is written)."""
    write = checkpoint.write_json_atomic

    def write_or_die(path, payload):
        if path.parent.name.startswith(f".tmp-{tag}-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, payload)

    checkpoint.write_json_atomic = write_or_die


def main(config_path: str, out_root: str, kill_tag: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) > 0:
        sys.exit(cli_main(["--config", config_path, "--out", f"{out_root}/killed", "--resume"]))
    dist.init_process_group("gloo")
    report = {"ddp_exit": cli_main(["--config", config_path, "--out", f"{out_root}/ddp"])}
    config = yaml.safe_load(open(config_path).read())
    result = run_transfer(dict(config, distributed="fsdp"), f"{out_root}/fsdp")
    state = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True))  # full on every rank
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(state))
    report["fsdp"] = {"digests": digests, "final_loss": result.stages[-1].final_loss if result.stages else None}
    if dist.get_rank() == 0:
        with open(f"{out_root}/report.json", "w") as stream:
            json.dump(report, stream)
        kill_inside_checkpoint(kill_tag)
    run_transfer(config, f"{out_root}/killed")
    raise AssertionError(f"rank 0 was to be killed inside checkpoint {kill_tag}")


if __name__ == "__main__":
    main(*sys.argv[1:])
