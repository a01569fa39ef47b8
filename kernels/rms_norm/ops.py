"""Dispatcher of the decoder block's residual add + RMSNorm: ``add_rms_norm(x, residual, weight, eps)``.

``= add_rms_norm_reference(x, residual, weight, eps)`` of :mod:`.naive`: ``(w * rmsnorm(residual + x),
residual + x)``.

* CUDA (unless ``triton_off()`` or ``FUSED`` is off), no gradient needed, x / residual / weight of
  one dtype (float32, bfloat16 or float16): the one-launch Triton kernel of :mod:`.triton_rms_norm` (eager
  torch: nine launches). Same roundings as the reference; the sum over H runs in another order, so a bf16
  output can differ from it by one unit in the last place.
* Everything else (training, CPU): the reference, bit-identical to the block's former ``+`` and
  ``RMSNorm`` module call.

``FUSED`` (default on) is read at each call; ``HEADSCOPE_FUSED_RMS_NORM=0`` turns it off at import. triton
is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import os

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.rms_norm.naive import add_rms_norm_reference
from headscope.kernels.switch import triton_off

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED = os.environ.get("HEADSCOPE_FUSED_RMS_NORM", "1") != "0"


def use_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether :func:`add_rms_norm` takes the Triton path for these inputs (module docstring)."""
    if not (FUSED and x.is_cuda) or triton_off():
        return False
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if x.dtype not in TRITON_DTYPES or len({t.dtype for t in tensors}) != 1:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``residual + x`` over the last dimension with a weight, and that sum.

    Args:
        x: ``(..., H)`` (a sub-block's output, or the block's input when ``residual`` is None).
        residual: ``(..., H)`` the residual stream, or None.
        weight: ``(H,)``.
        eps: added to the mean square.
    Returns:
        ``(normalised, residual + x)`` (``x`` itself without a residual).
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0] or (residual is not None and residual.shape != x.shape):
        raise HeadscopeError(f"add_rms_norm: x and residual must be (..., H) of one shape with a weight (H,); got "
                             f"{tuple(x.shape)}, {None if residual is None else tuple(residual.shape)}, {tuple(weight.shape)}")
    if use_triton(x, residual, weight):
        from headscope.kernels.rms_norm.triton_rms_norm import triton_add_rms_norm

        return triton_add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)
