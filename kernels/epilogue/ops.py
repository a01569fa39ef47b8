"""Dispatcher for the fused epilogue of the head-wise hybrid layer.

``head_epilogue(o, gamma, gate=None, eps=1e-6)`` computes, per token and head h,
``y_h = gamma_h * RMSNorm(o_h) * (sigmoid(gate_h) if h < Hg else 1)`` (RMSNorm over D without an
elementwise weight, float32 accumulation). FA heads come first in o, so the gate covers heads
[0, Hg). ``o`` may also be a pair of tensors, its first and last heads (the layer's FA and GDN outputs):
the Triton path reads both in place, so the layer never concatenates them. On CUDA it runs the Triton
kernels of :mod:`.triton_epilogue` (forward and backward; without autograd one launch and no autograd
node); on CPU, or when ``triton_off()``, the float32 torch reference of :mod:`.naive` (on the pair
concatenated). triton is imported only when a CUDA tensor arrives, so ``import headscope.kernels`` works
without it.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.switch import triton_off


def _check_inputs(parts: tuple[torch.Tensor, ...], gamma: torch.Tensor, gate: torch.Tensor | None) -> None:
    if not 1 <= len(parts) <= 2 or any(x.dim() != 4 for x in parts):
        raise HeadscopeError(f"head_epilogue: o must be (B, T, H, D) or a pair of them; got shapes {[tuple(x.shape) for x in parts]}")
    o = parts[0]
    if len(parts) == 2 and (parts[1].shape[:2] != o.shape[:2] or parts[1].shape[3] != o.shape[3]):
        raise HeadscopeError(f"head_epilogue: the two parts of o must share B, T and D; got {tuple(o.shape)} and {tuple(parts[1].shape)}")
    batch, length, _, head_dim = o.shape
    n_heads = sum(x.shape[2] for x in parts)
    if gamma.shape != (n_heads,):
        raise HeadscopeError(f"head_epilogue: gamma must be (H,) = ({n_heads},); got {tuple(gamma.shape)}")
    if gate is not None:
        if gate.dim() != 4 or gate.shape[:2] != o.shape[:2] or gate.shape[3] != head_dim or gate.shape[2] > n_heads:
            raise HeadscopeError(
                f"head_epilogue: gate must be (B, T, Hg, D) = ({batch}, {length}, Hg <= {n_heads}, {head_dim}); "
                f"got {tuple(gate.shape)}"
            )
    tensors = (*parts, gamma) + ((gate,) if gate is not None else ())
    if len({x.device for x in tensors}) != 1:
        raise HeadscopeError(f"head_epilogue: inputs are on different devices: {sorted({str(x.device) for x in tensors})}")


def use_triton(o: torch.Tensor) -> bool:
    """Whether :func:`head_epilogue` takes the Triton path (CUDA, unless ``triton_off()``)."""
    return o.is_cuda and not triton_off()


def head_epilogue(
    o: torch.Tensor | tuple[torch.Tensor, torch.Tensor], gamma: torch.Tensor, gate: torch.Tensor | None = None,
    eps: float = 1e-6, *, check: bool = True,
) -> torch.Tensor:
    """Per-head RMSNorm, per-head scale and output gate on the first Hg heads.

    Args:
        o: per-head attention outputs (B, T, H, D), FA heads first, GDN heads after; or a pair
            (B, T, H1, D), (B, T, H - H1, D) of its first and last heads, any strides (not concatenated on CUDA).
        gamma: learned per-head scale (H,).
        gate: pre-sigmoid gate logits (B, T, Hg, D) for heads [0, Hg), or None for no gate.
        eps: added to the mean square before the square root.
        check: validate the shapes and devices (False where the caller guarantees them, as the hybrid layer does).

    Returns:
        y: (B, T, H, D) in o's dtype (reshape to (B, T, H * D) for o_proj).
    """
    parts = o if isinstance(o, tuple) else (o,)
    if check:
        _check_inputs(parts, gamma, gate)
    if use_triton(parts[0]):
        from headscope.kernels.epilogue.triton_epilogue import triton_head_epilogue

        return triton_head_epilogue(o, gamma, gate, eps)
    return head_epilogue_reference(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0], gamma, gate, eps)
