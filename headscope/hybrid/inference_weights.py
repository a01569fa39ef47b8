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

An entry is rebuilt when one of its parameters changes: it keeps the storage of the parameters it was made from
(so no other tensor can take their addresses) and their version counters, so a parameter replaced (``.to()``,
loading into new tensors, ``p.data = ...``) or written in place (an optimizer step, ``copy_`` under ``no_grad``,
``load_state_dict``) is seen at the next call. Writes through ``p.data`` bypass the version counter and are not:
call :meth:`InferenceWeights.clear` after them. The layer uses these only with grad mode off (the results carry
no gradient); under ``torch.compile`` tracing (which cannot follow data pointers) and for parameters that are
inference tensors (made under ``torch.inference_mode``: no version counter) they are derived at every call.
"""

from __future__ import annotations

from typing import Callable

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


def split_gdn_logits(logits: torch.Tensor, n_gdn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` ``(B, T, n_gdn)``: views of the logits ``(B, T, R)`` of the stacked rows (the padding dropped)."""
    rows = logits.shape[-1]
    sizes = (n_gdn, n_gdn, rows - 2 * n_gdn) if rows > 2 * n_gdn else (n_gdn, n_gdn)
    return logits.split_with_sizes(sizes, dim=-1)[:2]


class InferenceWeights:
    """Tensors derived from a layer's parameters, cached by the parameters' storage and version."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def clear(self) -> None:
        """Forget every entry (after writing a parameter through ``.data``, which leaves no trace)."""
        self._entries.clear()

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
