"""Started by tests/test_sharded_scoring.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Joins the process group itself, then runs ``headscope score`` (``headscope.cli.main``, what ``torchrun -m
headscope score`` runs) once per method in that one group, each writing ``OUT/<method>.json`` from rank 0,
and the activation command a second time with ``--resume`` (every rank must skip it).

    torchrun --standalone --nproc-per-node 2 tests/score_dist_worker.py MODEL_DIR PROBE.jsonl OUT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from headscope.cli import main as cli_main

RUNS = {
    "activation": [],
    "direct": ["--noising"],
    "path": [],  # default receivers: the top-4 |direct| heads, from a sharded direct scan
    "rope": [],
    "screen": ["--top-k", "5"],
}


def main(model_dir: str, probe: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for method, extra in RUNS.items():
        code = cli_main(["score", "--model", model_dir, "--probe", probe, "--pairs", "3", "--device", "cpu", "--method", method,
                         "--out", f"{out}/{method}.json", *extra])
        assert code == 0, f"{method}: exit {code}"
    assert cli_main(["score", "--model", model_dir, "--probe", probe, "--pairs", "3", "--device", "cpu",
                     "--out", f"{out}/activation.json", "--resume"]) == 0
    dist.barrier()  # leave together: tearing gloo down while a peer still receives the last broadcast can abort
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter finalisation: gloo's threads torn down there can abort (headscope.distributed.exit_process)


if __name__ == "__main__":
    main(*sys.argv[1:])
