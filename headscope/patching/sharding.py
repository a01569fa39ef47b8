"""Scoring on several processes: the patched runs of a scorer split over torchrun's ranks, by head.

Every exact scorer does its per-head work through one call, ``map_heads(heads, effects, cost)``, where
``effects(subset)`` runs the patched forwards of the heads in ``subset`` and returns one value (or one
row) per head. On one process that is ``effects(heads)``. Inside ``with sharded(env):`` (under torchrun,
``WORLD_SIZE > 1``):

1. rank 0's list of heads is broadcast (``agreed``), so every rank splits the same list;
2. ``split_heads`` deals the heads to the ranks by their replay cost, longest first, each to the rank
   with the least work so far (LPT: within 4/3 of the best split). A patched run of a head in layer ``l``
   replays layers ``l..L-1`` from the cached residual, so its cost is ``L - l`` (``replay_cost``); path
   patching passes its own (two partial replays);
3. each rank runs ``effects`` on its share, and an all-gather puts every value back in the order of
   ``heads``, on every rank.

So everything a scorer does around its per-head work (recording the clean and corrupt runs, the
normalisation, choosing path receivers from gathered direct scores) runs on every rank as it would on one
process, every rank ends with the same ``HeadScores``, and rank 0 writes it. What a rank computes alone
and then depends on, where two GPUs may round differently in the last bit (the screen's gradient
estimates, which pick the heads it checks), is taken from rank 0 (``agreed``). What differs from one
process is only which rows share a forward; the rows of a batch are independent, so the scores agree up
to the round-off of differently shaped matrix products (a test holds them to 1e-5 in float32).

Each rank holds a full copy of the model on the GPU of its ``LOCAL_RANK``: the cached clean and corrupt
runs and the replays need it on one device. Attribution (one gradient pass for every head at once) is
not split; under torchrun every rank computes it and rank 0 writes it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

import torch

from headscope.distributed import DistEnv, broadcast_object, gather_objects
from headscope.heads import Head, ModelFingerprint

Cost = Callable[[Head], float]
Effects = Callable[[list[Head]], torch.Tensor]
T = TypeVar("T")

_ACTIVE: ContextVar[DistEnv | None] = ContextVar("headscope_sharded_scoring", default=None)


def all_heads(fp: ModelFingerprint, n_layers: int | None = None) -> list[Head]:
    """Every head of the first ``n_layers`` layers (default all), in (layer, head) order."""
    return [Head(layer, head) for layer in range(fp.n_layers if n_layers is None else n_layers) for head in range(fp.n_heads)]


def replay_cost(n_layers: int) -> Cost:
    """The cost of one patched run of a head: the ``n_layers - layer`` decoder layers it replays."""
    return lambda head: float(n_layers - head.layer)


def split_heads(heads: list[Head], cost: Cost, n_shards: int) -> list[list[int]]:
    """Deal ``heads`` to ``n_shards`` ranks, most expensive first, each to the least loaded rank (ties: lowest).

    Returns:
        Per rank, the indices into ``heads`` it runs, ascending.
    """
    loads = [0.0] * n_shards
    shares: list[list[int]] = [[] for _ in range(n_shards)]
    for index in sorted(range(len(heads)), key=lambda i: (-cost(heads[i]), i)):
        rank = min(range(n_shards), key=lambda r: (loads[r], r))
        loads[rank] += cost(heads[index])
        shares[rank].append(index)
    return [sorted(share) for share in shares]


@contextmanager
def sharded(env: DistEnv) -> Iterator[None]:
    """Split the per-head work of every scorer called inside the block over ``env``'s processes.

    Every process must call the same scorers in the same order inside the block (they meet in collectives).
    """
    token = _ACTIVE.set(env if env.distributed else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def agreed(value: T) -> T:
    """Rank 0's ``value`` on every process of the enclosing ``sharded`` block (``value`` itself outside one)."""
    env = _ACTIVE.get()
    return value if env is None else broadcast_object(value, env)


def map_heads(heads: list[Head], effects: Effects, cost: Cost) -> torch.Tensor:
    """``effects(heads)``, with the heads split over the processes of the enclosing ``sharded`` block.

    Args:
        heads: the heads to run, any order.
        effects: maps a list of heads to a ``(len(list), ...)`` tensor (one row per head, in its order).
        cost: the relative cost of one head's runs (``replay_cost``).
    Returns:
        ``(len(heads), ...)`` on the CPU, rows in the order of ``heads``, the same on every process.
    """
    env = _ACTIVE.get()
    if env is None or not heads:
        return effects(list(heads)).cpu()
    heads = agreed(list(heads))
    mine = split_heads(heads, cost, env.world_size)[env.rank]
    local = effects([heads[i] for i in mine]).cpu() if mine else None
    parts = [(index, values) for index, values in gather_objects((mine, local), env) if index]
    template = parts[0][1]
    out = template.new_empty((len(heads), *template.shape[1:]))
    for index, values in parts:
        out[index] = values
    return out


def per_layer(heads: list[Head], layer_effects: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``layer_effects(layer, head_index)`` once for each layer ``heads`` touch, rows back in ``heads``' order.

    Args:
        heads: the heads to run.
        layer_effects: ``(layer, (K,) long head indices of that layer) -> (K, ...)`` tensor.
    Returns:
        ``(len(heads), ...)`` on the CPU.
    """
    out: torch.Tensor | None = None
    for layer in sorted({h.layer for h in heads}):
        slots = [i for i, h in enumerate(heads) if h.layer == layer]
        values = layer_effects(layer, torch.tensor([heads[i].head for i in slots], dtype=torch.long)).cpu()
        if out is None:
            out = values.new_zeros((len(heads), *values.shape[1:]))
        out[slots] = values
    return out if out is not None else torch.zeros(0)
