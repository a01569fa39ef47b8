"""Started by tests/test_transfer_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Runs one transfer config twice in the same process group (created here, so both runs share it):

* ``distributed: ddp`` through the command-line entry point (``headscope.transfer.__main__.main``,
  what ``torchrun -m headscope.transfer`` runs); the trainer itself checks at every stage end that the
  DDP replicas hold identical weights and fails the run otherwise;
* ``distributed: fsdp`` through ``run_transfer``; every rank's full parameters are gathered and hashed.

Rank 0 writes ``{"ddp_exit": code, "fsdp": {"digests": [...], "final_loss": ...}}`` to
``OUT_ROOT/report.json``.

    torchrun --standalone --nproc-per-node 2 tests/transfer_dist_worker.py CONFIG.yaml OUT_ROOT
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from headscope.transfer import run_transfer


def digest(state: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(state):
        sha.update(name.encode())
        sha.update(state[name].detach().float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main(config_path: str, out_root: str) -> None:
    import yaml

    from headscope.transfer.__main__ import main as cli_main
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
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
    dist.barrier()  # leave together: tearing gloo down while a peer still receives the last gather can abort
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter finalisation: gloo's threads torn down there can abort (headscope.distributed.exit_process)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
