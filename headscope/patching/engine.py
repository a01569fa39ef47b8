"""The patching engine: cached runs, replay from any layer and any shared position, many patched heads
per forward.

Exact patching normally costs one full forward per head. Three observations make it cheap without
changing a single number:

1. *Layer prefix.* Patching a head in layer ``l`` leaves layers ``0..l-1`` untouched, so the patched
   run can start from the cached residual stream at the input of layer ``l`` (the "resid_pre" of the
   base run). We record every decoder layer's call (its positional and keyword arguments: rotary
   embeddings, attention mask, position ids ...) once, from a real forward of the model, and replay
   layers ``l..L-1`` by calling the model's own decoder-layer modules with those arguments. So the
   attention implementation (sdpa or eager) and every architecture detail stay the model's own.
2. *Position prefix.* Positions before a pair's first differing token are the same in every run, so a
   patched run computes only the positions after them, attending to the base run's cached keys and
   values of the prefix (``headscope.patching.prefix``: how, and how pairs with different prefixes
   share a batch).
3. *Batching heads.* Different heads of the same layer (and different prompt pairs) become different
   rows of one batch. A forward pre-hook on the output projection overwrites, row by row, the slice of
   the per-head attention output that belongs to that row's head.

Only the last position's logit difference is needed, so the unembedding is a dot product with
``W_U[answer] - W_U[wrong]`` instead of a full vocabulary projection, and the recording forwards ask
the model for the last position's logits only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from headscope.models import LoadedModel
from headscope.patching.batching import AdaptiveBatcher, default_batch_size, overhead_tokens, row_cost
from headscope.patching.prefix import CACHE_SLOT, LayerCall, PrefixKV, cache_kwarg, causal_variant, item_order

PatchFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def hooked(registrations: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register hooks for the duration of a ``with`` block and always remove them.

    Args:
        registrations: ``(module, kind, fn)`` with kind ``"pre"`` (forward pre-hook), ``"pre_kwargs"``
            (forward pre-hook with kwargs) or ``"post"`` (forward hook).
    """
    handles = []
    try:
        for module, kind, fn in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kwargs":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif kind == "post":
                handles.append(module.register_forward_hook(fn))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patched_head_outputs(lm: LoadedModel, patches: dict[int, PatchFn]) -> Iterator[None]:
    """Rewrite the per-head attention output (the output projection's input) of some layers.

    Args:
        patches: layer -> fn taking the ``(B, T, n_heads * head_dim)`` input and returning the new one.
    """

    def make_hook(fn: PatchFn):
        def hook(module, args):
            return (fn(args[0]),) + tuple(args[1:])

        return hook

    with hooked([(lm.out_proj(layer), "pre", make_hook(fn)) for layer, fn in patches.items()]):
        yield


@dataclass
class RunCache:
    """Everything a patched run needs from one unpatched run over all prompt pairs.

    Attributes:
        resid_pre: per layer, the residual stream entering the layer, ``(N, T, d_model)``.
        z: per layer, the per-head attention output (output projection input), ``(N, T, H * D)``.
        metric: ``(N,)`` float32 logit difference at the last position.
    """

    resid_pre: list[torch.Tensor]
    z: list[torch.Tensor]
    metric: torch.Tensor


def _hidden_from_call(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class PatchEngine:
    """Cached clean/corrupt runs of one probe and replay from any layer and any shared-prefix position.

    Args:
        lm: the model.
        directions: ``(N, d_model)`` unembedding differences ``W_U[answer] - W_U[wrong]``.
        offsets: ``(N,)`` bias differences of the unembedding.

    Attributes:
        shared: ``(N,)`` long (CPU), per pair the positions that every run shares (``prefix``); zeros
            until ``record`` is given them, which turns prefix reuse off.
        prefix_kv: per layer the base run's ``(keys, values)`` of those positions,
            ``(N, n_kv_heads, max(shared), head_dim)`` each.
    """

    def __init__(self, lm: LoadedModel, directions: torch.Tensor, offsets: torch.Tensor) -> None:
        self.lm = lm
        self.directions = directions.float()
        self.offsets = offsets.float()
        self.shared = torch.zeros(len(directions), dtype=torch.long)
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls: dict[int, list[LayerCall]] = {}  # first computed position -> every layer's call
        self._prompt: torch.Tensor | None = None  # (1, T) ids the layer calls are recorded with

    # --- metric ----------------------------------------------------------------------------------
    def metric_from_resid(self, resid_last: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        """Logit difference from the final residual at the last position.

        Args:
            resid_last: ``(B, d_model)`` residual stream after the last layer, last position.
            pair_index: ``(B,)`` which prompt pair each row belongs to.
        Returns:
            ``(B,)`` float32 logit(answer) - logit(wrong).
        """
        normed = self.lm.final_norm(resid_last.unsqueeze(1)).squeeze(1).float()  # (B, d_model)
        return (normed * self.directions[pair_index]).sum(-1) + self.offsets[pair_index]

    # --- recording -------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, ids: torch.Tensor, shared: torch.Tensor | None = None) -> RunCache:
        """Run the unpatched model on ``ids`` ``(N, T)`` (in batches that fit) and cache residuals, head
        outputs and metric.

        Args:
            ids: the prompts.
            shared: ``(N,)`` per pair the leading positions every run shares (``prefix.shared_prefix``);
                given, this run's keys/values of those positions become ``prefix_kv`` and patched runs
                compute only the positions after them.
        """
        from transformers import DynamicCache

        n_pairs, length = ids.shape
        n_layers = len(self.lm.layers)
        keep = int(shared.max()) if shared is not None else 0
        resid: list[torch.Tensor | None] = [None] * n_layers
        z: list[torch.Tensor | None] = [None] * n_layers
        keys: list[torch.Tensor | None] = [None] * n_layers
        values: list[torch.Tensor | None] = [None] * n_layers
        batch: dict[str, object] = {}

        def store(buffers: list, layer: int, value: torch.Tensor) -> None:  # into (N, ...) buffers
            if buffers[layer] is None:
                buffers[layer] = value.new_empty((n_pairs,) + tuple(value.shape[1:]))
            buffers[layer][batch["rows"]] = value.detach()

        def grab_resid(layer):
            return lambda module, args, kwargs: store(resid, layer, _hidden_from_call(args, kwargs))

        def grab_z(layer):
            return lambda module, args: store(z, layer, args[0])

        def grab_final(module, args, output):
            batch["last"] = _first_tensor(output)[:, -1].detach()

        def run_rows(rows: slice) -> torch.Tensor:
            batch["rows"] = rows
            if keep:
                cache = DynamicCache()
                self.lm.model(ids[rows], **{cache_kwarg(self.lm.model): cache}, use_cache=True, logits_to_keep=1)
                for layer, cached in enumerate(cache.layers):  # (B, n_kv_heads, T, head_dim) each
                    store(keys, layer, cached.keys[:, :, :keep])
                    store(values, layer, cached.values[:, :, :keep])
            else:
                self.lm.model(ids[rows], use_cache=False, logits_to_keep=1)
            return self.metric_from_resid(batch["last"], torch.arange(n_pairs, device=ids.device)[rows])

        registrations = [(self.lm.layers[l], "pre_kwargs", grab_resid(l)) for l in range(n_layers)]
        registrations += [(self.lm.out_proj(l), "pre", grab_z(l)) for l in range(n_layers)]
        registrations.append((self.lm.layers[n_layers - 1], "post", grab_final))
        with hooked(registrations):
            metric = AdaptiveBatcher(default_batch_size(self.lm, length)).run(n_pairs, run_rows)
        if self._prompt is None:
            self._prompt = ids[:1]
        if keep:
            self.shared = shared.cpu().long()
            self.prefix_kv = list(zip(keys, values))
            self.calls = {}
        return RunCache(resid_pre=list(resid), z=list(z), metric=metric)

    def layer_calls(self, start: int) -> list[LayerCall]:
        """Every layer's call arguments for computing positions ``start..T-1`` (recorded once per ``start``).

        ``start == 0``: a plain batch-1 forward. Otherwise the model's generation path: the first
        ``start`` tokens into a ``DynamicCache``, then the rest, recorded (the cache replaced by
        ``CACHE_SLOT``, sdpa's causal mask by its lower-right causal variant). The calls broadcast over
        any batch of rows of that length.
        """
        if start not in self.calls:
            self.calls[start] = self._record_calls(start)
        return self.calls[start]

    @torch.no_grad()
    def _record_calls(self, start: int) -> list[LayerCall]:
        from transformers import DynamicCache

        assert self._prompt is not None, "record() must run before replaying layers"
        model, impl = self.lm.model, self.lm.attn_implementation
        cache = DynamicCache() if start else None
        if start:
            model(self._prompt[:, :start], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
        calls: list[LayerCall] = []

        def slot(value):
            return CACHE_SLOT if cache is not None and value is cache else causal_variant(value, impl)

        def hook(module, args, kwargs):
            rest = tuple(slot(value) for value in args[1:]) if args else ()
            calls.append(LayerCall(args=rest, kwargs={k: slot(v) for k, v in kwargs.items() if k != "hidden_states"}))

        with hooked([(layer, "pre_kwargs", hook) for layer in self.lm.layers]):
            if start:
                model(self._prompt[:, start:], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
            else:
                model(self._prompt, use_cache=False, logits_to_keep=1)
        return calls

    # --- replay ----------------------------------------------------------------------------------
    def start_of(self, pairs: torch.Tensor) -> int:
        """The first position a batch of rows of ``pairs`` must compute: the smallest shared prefix."""
        return int(self.shared[pairs.cpu()].min())

    def run_items(self, batcher: AdaptiveBatcher, pair_of: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor],
                  on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run ``fn`` over items sorted by their pair's shared prefix, in batches that start at the batch's
        smallest one and are packed by ``row_cost``; results come back in item order.

        A batch ends before a group of items (one shared-prefix value) whose rows would recompute more
        tokens than a separate batch's fixed cost (``overhead_tokens``), so pairs with distant first
        differences run apart and pairs with close ones (or short suffixes) share a batch.

        Args:
            batcher: sets the batch budget and shrinks it on CUDA out-of-memory.
            pair_of: ``(n_items,)`` the prompt pair of each item.
            fn: ``fn(items, start)``: ``items`` ``(B,)`` item indices (on ``pair_of``'s device), ``start``
                the first position to compute; returns ``(B, ...)``.
        Returns:
            ``(n_items, ...)``.
        """
        order = item_order(self.shared, pair_of)
        starts = self.shared[pair_of.cpu()][order]  # ascending
        length = self._prompt.shape[1]
        values, counts = torch.unique_consecutive(starts, return_counts=True)
        cost = torch.repeat_interleave(torch.tensor([row_cost(self.lm, length, int(v)) for v in values]), counts)
        breaks, segment_start, begin = [], int(values[0]), 0
        for value, count in zip(values.tolist(), counts.tolist()):
            if count * (value - segment_start) > overhead_tokens(self.lm):
                breaks.append(begin)
                segment_start = value
            begin += count
        on_device = order.to(pair_of.device)
        out = batcher.run(len(order), lambda rows: fn(on_device[rows], int(starts[rows.start])), on_progress, cost, breaks)
        result = torch.empty_like(out)
        result[on_device] = out
        return result

    def run_layers(self, start: int, stop: int, resid: torch.Tensor, patches: dict[int, PatchFn],
                   pairs: torch.Tensor | None = None, first_position: int = 0) -> torch.Tensor:
        """Replay layers ``start..stop-1`` from ``resid`` with head-output patches (grad mode is the caller's).

        Args:
            start, stop: the layer range to run.
            resid: ``(B, T', d_model)`` residual stream entering layer ``start`` at positions
                ``first_position..T-1`` (``T' = T - first_position``).
            patches: layer -> function rewriting that layer's ``(B, T', H * D)`` head outputs.
            pairs: ``(B,)`` prompt pair of each row (whose cached prefix keys/values the rows attend
                to); needed when ``first_position > 0``.
            first_position: positions before it are the shared prefix, not recomputed; at most
                ``start_of(pairs)``.
        Returns:
            ``(B, T', d_model)`` the residual stream leaving layer ``stop - 1``.
        """
        calls = self.layer_calls(first_position)
        cache = PrefixKV(self.prefix_kv, pairs, first_position) if first_position else None
        with patched_head_outputs(self.lm, patches):
            for layer in range(start, stop):
                args, kwargs = calls[layer].bind(cache)
                resid = _first_tensor(self.lm.layers[layer](resid, *args, **kwargs))
        return resid

    @torch.no_grad()
    def run_from(self, start: int, resid: torch.Tensor, pair_index: torch.Tensor, patches: dict[int, PatchFn],
                 first_position: int = 0) -> torch.Tensor:
        """Replay layers ``start..L-1`` from ``resid`` with head-output patches, return the metric.

        Args:
            start: first layer to run.
            resid: ``(B, T', d_model)`` residual stream entering layer ``start`` at positions
                ``first_position..T-1``.
            pair_index: ``(B,)`` prompt pair of each row (selects the answer direction and prefix).
            patches: layer -> function rewriting that layer's ``(B, T', H * D)`` head outputs.
            first_position: as ``run_layers``.
        Returns:
            ``(B,)`` float32 logit difference at the last position.
        """
        resid = self.run_layers(start, len(self.lm.layers), resid, patches, pair_index, first_position)
        return self.metric_from_resid(resid[:, -1], pair_index)


def head_view(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(B, T, H * D)`` -> ``(B, T, H, D)`` view."""
    return z.view(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)


def overwrite_heads(source: torch.Tensor, pair_index: torch.Tensor, heads: torch.Tensor, positions: torch.Tensor | None, n_heads: int) -> PatchFn:
    """A patch that copies, for row ``b``, head ``heads[b]`` of ``source[pair_index[b]]`` into the batch.

    Args:
        source: ``(N, T, H * D)`` head outputs to copy from (e.g. the clean run's).
        pair_index: ``(B,)`` source pair per row.
        heads: ``(B,)`` head per row.
        positions: ``(B,)`` single position per row, or None for all positions.
    """
    src = head_view(source, n_heads)  # (N, T, H, D)

    def patch(z: torch.Tensor) -> torch.Tensor:
        out = head_view(z.clone(), n_heads)  # (B, T, H, D)
        rows = torch.arange(out.shape[0], device=out.device)
        if positions is None:
            out[rows, :, heads] = src[pair_index, :, heads]
        else:
            out[rows, positions, heads] = src[pair_index, positions, heads]
        return out.view(z.shape)

    return patch


def replace_all_heads(source: torch.Tensor, pair_index: torch.Tensor) -> PatchFn:
    """A patch that replaces every head's output by ``source[pair_index]`` (freezing a layer)."""

    def patch(z: torch.Tensor) -> torch.Tensor:
        return source[pair_index].to(z.dtype)

    return patch


def write_heads(values: torch.Tensor, heads: list[int], n_heads: int) -> PatchFn:
    """A patch that sets, in every row, the outputs of ``heads`` to ``values`` (row-aligned with the batch).

    Args:
        values: ``(B, T, len(heads), D)`` new outputs of those heads, row ``b`` for batch row ``b`` (or any shape
            that broadcasts to it, e.g. ``(len(heads), D)`` for one value at every row and position).
        heads: head indices, in the order of ``values``' third axis.
    """
    index = torch.tensor(heads, dtype=torch.long, device=values.device)

    def patch(z: torch.Tensor) -> torch.Tensor:
        out = head_view(z.clone(), n_heads)  # (B, T, H, D)
        out[:, :, index] = values.to(out.dtype)
        return out.view(z.shape)

    return patch


def then(first: PatchFn, second: PatchFn) -> PatchFn:
    """Compose two patches: ``second(first(z))``."""
    return lambda z: second(first(z))
