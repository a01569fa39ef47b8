"""Dispatcher for the fused epilogue of the head-wise hybrid layer.

``head_epilogue(o, gamma, gate=None, eps=1e-6)`` computes, per token and head h,
``y_h = gamma_h * RMSNorm(o_h) * (sigmoid(gate_h) if h < Hg else 1)`` (RMSNorm over D without an
elementwise weight, float32 accumulation). FA heads come first in o, so the gate covers heads
[0, Hg). On CUDA it runs the Triton kernels of :mod:`.triton_epilogue` (forward and backward); on CPU,
or when ``HEADSCOPE_NO_TRITON=1``, the float32 torch reference of :mod:`.naive`. triton is imported
only when a CUDA tensor arrives, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import os

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.epilogue.naive import head_epilogue_reference


def _check_inputs(o: torch.Tensor, gamma: torch.Tensor, gate: torch.Tensor | None) -> None:
    if o.dim() != 4:
        raise HeadscopeError(f"head_epilogue: o must be (B, T, H, D); got shape {tuple(o.shape)}")
    batch, length, n_heads, head_dim = o.shape
    if gamma.shape != (n_heads,):
        raise HeadscopeError(f"head_epilogue: gamma must be (H,) = ({n_heads},); got {tuple(gamma.shape)}")
    if gate is not None:
        if gate.dim() != 4 or gate.shape[:2] != o.shape[:2] or gate.shape[3] != head_dim or gate.shape[2] > n_heads:
            raise HeadscopeError(
                f"head_epilogue: gate must be (B, T, Hg, D) = ({batch}, {length}, Hg <= {n_heads}, {head_dim}); "
                f"got {tuple(gate.shape)}"
            )
    tensors = (o, gamma) + ((gate,) if gate is not None else ())
    if len({x.device for x in tensors}) != 1:
        raise HeadscopeError(f"head_epilogue: inputs are on different devices: {sorted({str(x.device) for x in tensors})}")


def head_epilogue(
    o: torch.Tensor, gamma: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Per-head RMSNorm, per-head scale and output gate on the first Hg heads.

    Args:
        o: per-head attention outputs (B, T, H, D), FA heads first, GDN heads after.
        gamma: learned per-head scale (H,).
        gate: pre-sigmoid gate logits (B, T, Hg, D) for heads [0, Hg), or None for no gate.
        eps: added to the mean square before the square root.

    Returns:
        y: (B, T, H, D) in o's dtype (reshape to (B, T, H * D) for o_proj).
    """
    _check_inputs(o, gamma, gate)
    if o.is_cuda and os.environ.get("HEADSCOPE_NO_TRITON", "0") != "1":
        from headscope.kernels.epilogue.triton_epilogue import triton_head_epilogue

        return triton_head_epilogue(o, gamma, gate, eps)
    return head_epilogue_reference(o, gamma, gate, eps)
