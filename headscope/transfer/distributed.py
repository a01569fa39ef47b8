"""Running the transfer on several processes with PyTorch's own distributed engine.

``torchrun --nproc-per-node N -m headscope.transfer --config run.yaml --out RUN_DIR`` starts N copies of
the same entry point; ``headscope.distributed.init_distributed`` joins torchrun's process group (NCCL on
CUDA, gloo on CPU). Without torchrun (``WORLD_SIZE`` unset or 1) nothing here touches
``torch.distributed`` and the single-process path is unchanged.

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

from typing import Any

import torch
from torch import nn

from headscope.distributed import DistEnv
from headscope.heads import HeadscopeError


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
