"""The patching engine: cached runs, replay from any layer, many patched heads per forward.

Exact patching normally costs one full forward per head. Two observations make it cheap without
changing a single number:

1. *Prefix caching.* Patching a head in layer ``l`` leaves layers ``0..l-1`` untouched, so the patched
   run can start from the cached residual stream at the input of layer ``l`` (the "resid_pre" of the
   base run). We record every decoder layer's call (its positional and keyword arguments: rotary
   embeddings, attention mask, position ids ...) once, from a real forward of the model, and replay
   layers ``l..L-1`` by calling the model's own decoder-layer modules with those arguments. So the
   attention implementation (sdpa or eager) and every architecture detail stay the model's own.
2. *Batching heads.* Different heads of the same layer (and different prompt pairs) become different
   rows of one batch. A forward pre-hook on the output projection overwrites, row by row, the slice of
   the per-head attention output that belongs to that row's head.

Only the last position's logit difference is needed, so the unembedding is a dot product with
``W_U[answer] - W_U[wrong]`` instead of a full vocabulary projection.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from headscope.models import LoadedModel

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
class LayerCall:
    """The arguments one decoder layer was called with (hidden states excluded)."""

    args: tuple
    kwargs: dict


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
    """Cached clean/corrupt runs of one probe and replay from any layer.

    Args:
        lm: the model.
        directions: ``(N, d_model)`` unembedding differences ``W_U[answer] - W_U[wrong]``.
        offsets: ``(N,)`` bias differences of the unembedding.
    """

    def __init__(self, lm: LoadedModel, directions: torch.Tensor, offsets: torch.Tensor) -> None:
        self.lm = lm
        self.directions = directions.float()
        self.offsets = offsets.float()
        self.calls: list[LayerCall] | None = None

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
    def record(self, ids: torch.Tensor) -> RunCache:
        """Run the unpatched model on ``ids`` ``(N, T)`` and cache residuals, head outputs and metric.

        The first call also records every layer's call arguments (from a batch-1 forward, so that
        they broadcast over any batch of equal-length prompts).
        """
        n_layers = len(self.lm.layers)
        resid: list[torch.Tensor | None] = [None] * n_layers
        z: list[torch.Tensor | None] = [None] * n_layers
        final: list[torch.Tensor] = []

        def grab_resid(layer):
            def hook(module, args, kwargs):
                resid[layer] = _hidden_from_call(args, kwargs).detach()

            return hook

        def grab_z(layer):
            def hook(module, args):
                z[layer] = args[0].detach()

            return hook

        def grab_final(module, args, output):
            final.append(_first_tensor(output)[:, -1].detach())

        registrations = [(self.lm.layers[l], "pre_kwargs", grab_resid(l)) for l in range(n_layers)]
        registrations += [(self.lm.out_proj(l), "pre", grab_z(l)) for l in range(n_layers)]
        registrations.append((self.lm.layers[n_layers - 1], "post", grab_final))
        with hooked(registrations):
            self.lm.model(ids, use_cache=False)
        if self.calls is None:
            self.calls = self._record_calls(ids[:1])
        pair_index = torch.arange(ids.shape[0], device=ids.device)
        metric = self.metric_from_resid(final[0], pair_index)
        return RunCache(resid_pre=list(resid), z=list(z), metric=metric)

    def _record_calls(self, ids: torch.Tensor) -> list[LayerCall]:
        calls: list[LayerCall] = []

        def hook(module, args, kwargs):
            calls.append(LayerCall(args=tuple(args[1:]) if args else (), kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"}))

        with hooked([(layer, "pre_kwargs", hook) for layer in self.lm.layers]):
            self.lm.model(ids, use_cache=False)
        return calls

    # --- replay ----------------------------------------------------------------------------------
    def run_layers(self, start: int, stop: int, resid: torch.Tensor, patches: dict[int, PatchFn]) -> torch.Tensor:
        """Replay layers ``start..stop-1`` from ``resid`` with head-output patches (grad mode is the caller's).

        Args:
            start, stop: the layer range to run.
            resid: ``(B, T, d_model)`` residual stream entering layer ``start``.
            patches: layer -> function rewriting that layer's ``(B, T, H * D)`` head outputs.
        Returns:
            ``(B, T, d_model)`` the residual stream leaving layer ``stop - 1``.
        """
        assert self.calls is not None, "record() must run before replaying layers"
        with patched_head_outputs(self.lm, patches):
            for layer in range(start, stop):
                call = self.calls[layer]
                resid = _first_tensor(self.lm.layers[layer](resid, *call.args, **call.kwargs))
        return resid

    @torch.no_grad()
    def run_from(self, start: int, resid: torch.Tensor, pair_index: torch.Tensor, patches: dict[int, PatchFn]) -> torch.Tensor:
        """Replay layers ``start..L-1`` from ``resid`` with head-output patches, return the metric.

        Args:
            start: first layer to run.
            resid: ``(B, T, d_model)`` residual stream entering layer ``start``.
            pair_index: ``(B,)`` prompt pair of each row (selects the answer direction).
            patches: layer -> function rewriting that layer's ``(B, T, H * D)`` head outputs.
        Returns:
            ``(B,)`` float32 logit difference at the last position.
        """
        resid = self.run_layers(start, len(self.lm.layers), resid, patches)
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
        values: ``(B, T, len(heads), D)`` new outputs of those heads, row ``b`` for batch row ``b``.
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
