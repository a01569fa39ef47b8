"""torchrun's process group, as every multi-process path of headscope joins it (scoring and the transfer).

``torchrun --nproc-per-node N -m headscope ...`` starts N copies of the same command; ``init_distributed``
reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from torchrun's environment and joins the process group
(NCCL on CUDA, each process on the GPU of its ``LOCAL_RANK``; gloo on CPU). Without torchrun
(``WORLD_SIZE`` unset or 1) nothing here touches ``torch.distributed``: every helper below is then the
identity, so the single-process code paths need no branch of their own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from headscope.heads import HeadscopeError

_created_group = False  # init_distributed created a process group in this process (exit_process)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: rank, world size, device, and whether it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group when there is one, and pick this process's device.

    An existing process group (a caller that created it) is reused and left to its owner.

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda".
    Returns:
        The ``DistEnv``.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise HeadscopeError(f"device {device!r} asked for, but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise HeadscopeError(f"process {local_rank} of this host has no GPU of its own ({torch.cuda.device_count()} visible); "
                             "start at most one process per GPU (torchrun --nproc-per-node)")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(target)
        backend = "nccl" if use_cuda else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            # torchrun (torch 2.13) keeps its store across --max-restarts: without a key prefix of its own, a
            # restarted process can read the previous attempt's addresses and fail to connect or hang.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"headscope/restart{restart}", store),
                                    rank=int(os.environ["RANK"]), world_size=world_size)
        else:
            dist.init_process_group(backend)
        global _created_group
        _created_group = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, target, owns)


def shutdown(env: DistEnv) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; after a run in which ``init_distributed`` created a process group (torchrun), without the
    interpreter's finalisation. gloo's worker threads are torn down there, after the group was left, and now and then
    abort the process (SIGABRT, 'terminate called without an active exception': 1 of ~10 full test-suite runs, in a
    2-process gloo run whose outputs were all written), and torchrun then reports the whole run failed. Every output
    of headscope is written and closed by then; the standard streams are flushed here."""
    if _created_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over processes (identity on one process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of a tensor over processes (identity on one process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """Every process's ``value`` in rank order, on every process."""
    if not env.distributed:
        return [value]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's ``value`` on every process."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
