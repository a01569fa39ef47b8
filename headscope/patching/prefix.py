"""Shared-prefix reuse: run the positions that clean and corrupt share once, replay only the suffix.

A clean/corrupt pair is identical up to its first differing token ``p``. Attention is causal, so every
position before ``p`` has the same residual stream, head outputs and keys/values in the clean run, the
corrupt run and *every* patched run (a head's clean output equals its corrupt output there, so copying
it changes nothing, and nothing after ``p`` can reach back). A patched run therefore only has to
compute positions ``s..T-1`` for any ``s <= p``, attending to the base run's cached keys and values of
positions ``0..s-1``. Combined with the layer prefix (a patch in layer ``l`` starts from the cached
residual at layer ``l``), a patched row costs ``(L - l) / L * (T - s) / T`` of a full forward, plus the
attention of its suffix over the cached prefix. On the built-in probes ``p / T`` is 0.4-1.0.

How it stays the model's own computation:

* Keys and values: the base run (``PatchEngine.record``) is a real forward with a ``DynamicCache``;
  positions ``< p`` of every layer's cache (after the model's own k-norm and RoPE, in KV-head space for
  GQA) are kept. ``PrefixKV`` stands in for the cache in a replayed layer: the attention module's
  ``cache.update(k, v, layer)`` returns ``[prefix ; k]``, stateless, so the same layer can be called
  again (path patching recomputes receivers). The attention module repeats KV groups itself.
* Positions and masks: the layer-call arguments of a suffix starting at ``s`` (rotary cos/sin of
  positions ``s..T-1``, position ids, the causal mask of ``T - s`` queries over ``T`` keys in the
  attention implementation's own format, sdpa or eager) are recorded from the model's own generation
  path: a batch-1 forward of the first ``s`` tokens into a cache, then of the rest. So RoPE positions
  continue from the prefix exactly as in ``generate``. Under sdpa a recorded lower-right causal mask is
  swapped for ``torch.nn.attention.bias.causal_lower_right`` (the same mask as a causal variant), which
  lets a GPU kernel skip masked blocks instead of reading a dense ``(T - s, T)`` mask.

Pairs with different first-difference positions: items (head, pair) are **sorted by their pair's
``p`` and batched in that order; a batch starts at the smallest ``p`` among its rows**, and its rows
with a larger ``p`` recompute a few positions they could have skipped (exactly: any ``s <= p`` is
valid). A batch does not reach past a group of rows (one ``p`` value) that would recompute more
tokens than a separate batch's fixed cost (``batching.overhead_tokens``: launches on a GPU, Python
calls on a CPU), so distant first differences run apart and close ones (or short suffixes, as in
IOI) share a batch. Batches are sized by memory per row, not rows (``AdaptiveBatcher`` with a
per-item cost), so short suffixes make wide batches. Why not the alternatives:

* exact grouping (one batch per distinct ``p``): built-in probes draw ``p`` per pair, so 32 pairs have
  ~32 distinct values and a group is one pair's heads, ``n_heads`` rows: narrow batches, many launches
  (IOI's few-token suffixes would be all launch cost); the break rule keeps exact groups only where the
  positions a merge would recompute cost more than the batch it saves;
* left padding to per-row suffixes: the pads are computed anyway (no saving over a common start),
  every row needs its own mask, position ids and ragged prefix cache, and sdpa loses its causal
  kernels. The waste of a common start is ``sum(p_row - p_min)``, which sorting keeps to the ``p``
  spread of neighbouring pairs.

Who uses it: ``activation``, ``direct``, by-position patching (positions before ``p`` are no-ops and
are not run), ``path`` (both stages and the receiver recomputation), ``attribution`` (the gradient
pass runs the suffix only: the prefix's keys and values do not depend on suffix head outputs, and the
prefix's own output differences are zero) and so ``screen``'s exact check. Not ``rope``: removing a
head's rotation changes its output at every position after 0, so nothing is shared beyond the layer
prefix. The head-wise hybrid (``headscope_hybrid``) is not scored (it is not in ``models.ARCHITECTURES``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right

CACHE_SLOT = object()  # stands for the KV cache in recorded layer calls; bound per batch


@dataclass
class LayerCall:
    """The arguments one decoder layer was called with (hidden states excluded); the cache, if the
    call had one, is ``CACHE_SLOT``."""

    args: tuple
    kwargs: dict

    def bind(self, cache) -> tuple[tuple, dict]:
        """The call's arguments with ``cache`` in the cache's place."""
        args = tuple(cache if value is CACHE_SLOT else value for value in self.args)
        return args, {key: cache if value is CACHE_SLOT else value for key, value in self.kwargs.items()}


def shared_prefix(clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Per pair, how many leading positions clean and corrupt share, capped at ``T - 1`` (the last
    position is always computed: the metric is read there).

    Args:
        clean, corrupt: ``(N, T)`` token ids.
    Returns:
        ``(N,)`` long on the CPU: the first differing position (``T - 1`` for identical prompts).
    """
    differs = (clean != corrupt).cpu()  # (N, T)
    length = clean.shape[1]
    first = torch.where(differs.any(1), differs.int().argmax(1), length - 1)
    return first.clamp(max=length - 1).long()


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache (``cache`` from transformers 5.2x on,
    ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixKV:
    """Stands in for the KV cache of a replayed layer: prepends the base run's cached keys/values of
    positions ``0..start-1`` of each row's pair.

    Args:
        kv: per layer ``(keys, values)``, each ``(N, n_kv_heads, P, head_dim)`` with ``P >= start``.
        pairs: ``(B,)`` pair of each batch row.
        start: the first position the batch computes.
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], pairs: torch.Tensor, start: int) -> None:
        self.kv, self.pairs, self.start = kv, pairs, start

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, KV, S, D)`` new keys/values -> ``(B, KV, start + S, D)`` with the prefix in front (no state kept)."""
        cached_keys, cached_values = self.kv[layer_idx]
        prefix_keys = cached_keys[self.pairs, :, : self.start].to(keys.dtype)
        prefix_values = cached_values[self.pairs, :, : self.start].to(values.dtype)
        return torch.cat([prefix_keys, keys], dim=2), torch.cat([prefix_values, values], dim=2)


def causal_variant(value, attn_implementation: str):
    """``value`` unless it is sdpa's dense ``(1, 1, S, T)`` lower-right causal mask, which becomes the
    ``causal_lower_right(S, T)`` bias (same mask; lets GPU kernels skip masked blocks)."""
    if attn_implementation != "sdpa" or not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() != 4:
        return value
    queries, keys = value.shape[-2:]
    if value.shape[:2] != (1, 1) or queries >= keys:
        return value
    lower_right = torch.ones(queries, keys, dtype=torch.bool, device=value.device).tril(keys - queries)
    return causal_lower_right(queries, keys) if torch.equal(value[0, 0], lower_right) else value


def item_order(shared: torch.Tensor, pair_of: torch.Tensor) -> torch.Tensor:
    """``(n_items,)`` permutation sorting items by their pair's shared prefix (ascending, stable)."""
    return torch.argsort(shared[pair_of.cpu()], stable=True)
