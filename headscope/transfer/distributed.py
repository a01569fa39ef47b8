"""Running the transfer on several processes with PyTorch's own distributed engine.

``torchrun --nproc-per-node N -m headscope.transfer --config run.yaml --out RUN_DIR`` starts N copies of
the same entry point; ``init_distributed`` reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from torchrun's
environment and joins the process group (NCCL on CUDA, gloo on CPU). Without torchrun (``WORLD_SIZE``
unset or 1) nothing here touches ``torch.distributed`` and the single-process path is unchanged.

Strategies (``distributed`` in the run config):

* ``ddp``: ``DistributedDataParallel`` around the student, re-wrapped at each stage because DDP only
  synchronises parameters that require grad when it is built. The teacher is replicated.
* ``fsdp``: ``fully_shard`` (FSDP2; every torch >= 2.4 has it, so there is no FSDP1 path) on every
  decoder layer and the root, for the student and the teacher, done once: FSDP2 re-reads
  ``requires_grad`` from the sharded parameters at every all-gather, so freezing/unfreezing between
  stages needs no re-wrapping. The models are built in host memory and ``fully_shard`` moves each
  rank's shards to its GPU, so no GPU ever holds a whole model (host RAM must hold teacher + student).

Checkpoints hold *full* (unsharded) state so a run can resume on any number of processes or with the
other strategy: model weights as a plain ``state_dict`` and optimizer state keyed by parameter name
(the layout of ``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from headscope.heads import HeadscopeError


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

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda".
    Returns:
        The ``DistEnv``.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise HeadscopeError("the config asks for device 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, target, owns)


def shutdown(env: DistEnv) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_fsdp(model: nn.Module, layers: nn.ModuleList, env: DistEnv) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer, then to the root (in place)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4 / 2.5 ship FSDP2 under its composable name
        from torch.distributed._composable.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_for_stage(model: nn.Module, env: DistEnv, strategy: str) -> nn.Module:
    """The module a stage trains through: DDP around ``model``, or ``model`` itself (FSDP2 or 1 process)."""
    if not env.distributed or strategy == "fsdp":
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _fsdp_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, in ``named_parameters`` order (the optimizer's order)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, strategy: str) -> tuple[dict, dict]:
    """Full model and optimizer state (collective under FSDP; only rank 0's copy is complete).

    Returns:
        ``(model_state, optimizer_state)``: a CPU ``state_dict`` and optimizer state keyed by parameter name.
    """
    if env.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = _fsdp_options(cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    names = trainable_names(model)
    state = optimizer.state_dict()
    named = {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [dict(group, params=[names[i] for i in group["params"]]) for group in state["param_groups"]],
    }
    model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return model_state, named


def load_model_state(model: nn.Module, model_state: dict, env: DistEnv, strategy: str) -> None:
    """Load a full ``state_dict`` (under FSDP every rank passes it; it is scattered into the shards)."""
    if env.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_state, options=_fsdp_options())
        return
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise HeadscopeError(f"checkpoint does not match the student: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict, env: DistEnv, strategy: str) -> None:
    """Load optimizer state keyed by parameter name (from :func:`full_state`)."""
    if env.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, named, options=_fsdp_options())
        return
    names = trainable_names(model)
    groups = [group["params"] for group in named["param_groups"]]
    if [n for group in groups for n in group] != names:
        raise HeadscopeError("the checkpoint's optimizer trains other parameters than this stage (was the config changed?)")
    index = {name: i for i, name in enumerate(names)}
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [dict(group, params=[index[n] for n in group["params"]]) for group in named["param_groups"]],
    })


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
