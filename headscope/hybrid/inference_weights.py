"""The hybrid layer's weights in the layouts its inference kernels read: built once, kept until a parameter changes.

Why: at batch 1 and a few thousand tokens the layer's attention core is bound by the host, not the GPU (H200,
``benchmarks/results/gdn_prefill_speed.md``: 0.57 ms to enqueue the core at 4K against 0.42 ms of GPU work),
and two of its launches only rearranged weights or split one product in two:

* ``gdn_logit_weight``: ``cat(a_proj.weight, b_proj.weight)`` ``(2·n_gdn, hidden)``, so the decay and beta logits
  come out of one product instead of two skinny GEMMs (``(B·T, hidden) x (hidden, n_gdn)``, each of which cuBLAS
  runs as a split-K GEMM plus a reduction). The stacked rows are padded with zero rows to a multiple of
  ``LOGIT_ROWS_MULTIPLE`` (28 -> 32 for 14 GDN heads): with 28 output columns (56-byte rows in bf16) cuBLAS took a
  2-byte-aligned kernel plus a split-K reduction on the H200 (2 launches, ~80 us of host time). The layer hands it
  to the GDN prep kernel, which computes the logits in the same launch
  (``kernels.gdn_prep.ops.short_conv_rope_l2norm_and_logits``; ``F.linear`` off that path); a and b are strided
  views of the padded output (:func:`split_gdn_logits`; the GDN kernels take strides);
* ``conv_taps``: the depthwise conv weight ``(C, 1, K)`` as a ``(C, K)`` view of a channel-contiguous ``(K, C)``
  tensor, the layout the GDN prep kernel reads (``kernels/gdn_prep``), which otherwise copies the taps at
  every call (one launch and one allocation).

* ``fused_linears``: one ``(sum of out_features, in)`` weight whose row blocks *are* several projections' weights
  (q, k, v and the FA gate of a hybrid layer; gate and up of its MLP), so their products are one GEMM: at 4K-token
  prefill on the H200 box each ``F.linear`` call cost ~38 us of host time under cProfile, and a captured decode
  step launches one kernel per projection per layer. It costs no memory: :func:`fuse_for_inference` (which
  ``generate()`` and ``HybridStaticCache`` call) copies the weights into one buffer and points each
  ``Linear.weight`` at its block (``weight.data = block``: the same ``Parameter`` objects, so optimizers,
  ``load_state_dict`` (in place) and ``save_pretrained`` (which clones such disjoint views) keep working, and an
  in-place update of a weight is an update of the buffer). A forward uses the buffer while every weight still
  sits at its block's address and falls back to the module calls once one was replaced (``.to()``, ``.data =
  ...``) until the next ``fuse_for_inference``. Forwards never fuse by themselves: a training loop's no-grad
  evaluation must not move parameters under a wrapper that manages their storage (FSDP2 re-allocates and frees its
  unsharded parameters' storage around every forward; re-pointed, they trained differently, caught by
  ``tests/test_transfer_distributed.py``). Only for plain ``nn.Linear`` modules nothing hooks or wraps
  (``untouched``: a hook or a LoRA wrapper sees the module call), weights of one dtype and device, each owning its
  storage (or in the previous buffer: never a view of someone else's), not inference tensors, not under
  ``torch.compile`` tracing, not while a CUDA graph is being captured, and never in a model holding FSDP modules.

An entry is rebuilt when one of its parameters changes: it keeps the storage of the parameters it was made from
(so no other tensor can take their addresses) and their version counters, so a parameter replaced (``.to()``,
loading into new tensors, ``p.data = ...``) or written in place (an optimizer step, ``copy_`` under ``no_grad``,
``load_state_dict``) is seen at the next call. Writes through ``p.data`` bypass the version counter and are not:
call :meth:`InferenceWeights.clear` after them. The layer uses these only with grad mode off (the results carry
no gradient); under ``torch.compile`` tracing (which cannot follow data pointers) and for parameters that are
inference tensors (made under ``torch.inference_mode``: no version counter) they are derived at every call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


LOGIT_ROWS_MULTIPLE = 16  # rows of the stacked GDN logit weight: 32-byte output rows in bf16 (module docstring)


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of ``LOGIT_ROWS_MULTIPLE``."""
    return -(-n // LOGIT_ROWS_MULTIPLE) * LOGIT_ROWS_MULTIPLE


def stacked_logit_weight(a_weight: torch.Tensor, b_weight: torch.Tensor) -> torch.Tensor:
    """``[a_weight; b_weight]`` ``(n_a + n_b, hidden)`` with zero rows after them up to ``padded_rows``."""
    rows = a_weight.shape[0] + b_weight.shape[0]
    return torch.cat((a_weight, b_weight, a_weight.new_zeros(padded_rows(rows) - rows, a_weight.shape[1])))


def untouched(*modules: nn.Module) -> bool:
    """Nothing watches or wraps these modules: no forward hooks, no ``forward`` set on the instance (as
    accelerate's offloading and tracing tools do), so a fused kernel may stand in for their calls."""
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules)


def split_gdn_logits(logits: torch.Tensor, n_gdn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` ``(B, T, n_gdn)``: views of the logits ``(B, T, R)`` of the stacked rows (the padding dropped)."""
    rows = logits.shape[-1]
    sizes = (n_gdn, n_gdn, rows - 2 * n_gdn) if rows > 2 * n_gdn else (n_gdn, n_gdn)
    return logits.split_with_sizes(sizes, dim=-1)[:2]


class InferenceWeights:
    """Tensors derived from a layer's parameters, cached by the parameters' storage and version."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._fused: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}  # name -> (buffer, each weight's address in it)

    def clear(self) -> None:
        """Forget every entry (after writing a parameter through ``.data``, which leaves no trace)."""
        self._entries.clear()
        self._fused.clear()

    def derived(self, name: str, make: Callable[..., torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """``make(*sources)``, computed again only when one of ``sources`` was replaced or written since."""
        if torch.compiler.is_compiling() or any(s.is_inference() for s in sources):
            return make(*sources)
        key = tuple((s.data_ptr(), s._version) for s in sources)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = self._entries[name] = (key, tuple(s.detach() for s in sources), make(*sources))
        return entry[2]

    def gdn_logit_weight(self, a_proj: nn.Linear, b_proj: nn.Linear) -> torch.Tensor:
        """The cached rows ``[a_proj; b_proj; zeros]`` ``(padded_rows(n_a + n_b), hidden)`` (bias-free projections)."""
        return self.derived("gdn_logits", stacked_logit_weight, a_proj.weight, b_proj.weight)

    def conv_taps(self, conv_weight: torch.Tensor) -> torch.Tensor:
        """``(C, K)`` taps of a ``(C, 1, K)`` depthwise conv weight, stored channel-contiguous (strides ``(1, C)``)."""
        return self.derived("conv_taps", lambda w: w.squeeze(1).t().contiguous().t(), conv_weight)

    def fused_linears(self, name: str, linears: Sequence[nn.Linear], create: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, bias)`` of the linears' outputs concatenated, the weight's row blocks being their weights
        (module docstring), the bias stacked (zeros for one without; None when none has one); None where the
        module calls must run. ``create``: fuse them now if they are not (``fuse_for_inference``; a forward passes
        False)."""
        if not untouched(*linears) or any(type(linear) is not nn.Linear for linear in linears):  # (checked at every call)
            return None
        weights = [linear.weight for linear in linears]
        entry = self._fused.get(name)
        if entry is None or any(w.data_ptr() != address for w, address in zip(weights, entry[1])) or entry[0].dtype != weights[0].dtype:
            entry = self._fuse(name, linears) if create else None
            if entry is None:
                return None
        biases = [linear.bias for linear in linears]
        if all(b is None for b in biases):
            return entry[0], None
        present = [b for b in biases if b is not None]
        sizes = tuple(w.shape[0] for w in weights)
        return entry[0], self.derived(name + ".bias", lambda *values: _stacked_bias(biases, values, sizes), *present)

    def _fuse(self, name: str, linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """Copy the weights into one new buffer and point each at its block; None where they cannot share one."""
        weights = [linear.weight for linear in linears]
        first = weights[0]
        old = self._fused.pop(name, (None,))[0]
        if torch.compiler.is_compiling() or (first.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        for w in weights:
            if w.dtype != first.dtype or w.device != first.device or w.is_meta or w.shape[1] != first.shape[1] or w.is_inference() or not w.is_contiguous():
                return None
            own = w.storage_offset() == 0 and w.untyped_storage().nbytes() == w.numel() * w.element_size()
            if not own and (old is None or w.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()):
                return None
        with torch.inference_mode(False), torch.no_grad():
            buffer = torch.cat([w.detach() for w in weights])  # (sum of rows, in)
            start = 0
            for w in weights:
                w.data = buffer[start : start + w.shape[0]]
                start += w.shape[0]
        entry = self._fused[name] = (buffer, tuple(w.data_ptr() for w in weights))
        return entry


def fuse_for_inference(model: nn.Module) -> None:
    """Fuse the projections of every module of ``model`` that offers it (``fuse_inference_weights``: the hybrid's
    attention and decoder layers), so that weight addresses are final before anything records them
    (``generate()``'s cache key, a captured decode step); nothing in a model holding FSDP modules."""
    modules = list(model.modules())
    if any(type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")) for m in modules):
        return
    with torch.no_grad():
        for module in modules:
            fuse = getattr(module, "fuse_inference_weights", None)
            if callable(fuse):
                fuse()


def _stacked_bias(biases: Sequence[torch.Tensor | None], present: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """``cat`` of the biases, ``present`` standing for the non-None ones in order, zeros of ``sizes[i]`` for a None."""
    values, parts = iter(present), []
    for bias, size in zip(biases, sizes):
        parts.append(next(values) if bias is not None else present[0].new_zeros(size))
    return torch.cat(parts)
