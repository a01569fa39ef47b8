"""Dispatcher for the fused RoPE + L2 norm of the Gated DeltaNet queries and keys.

``rope_l2norm(x, cos, sin, eps=1e-6)`` = ``l2_normalize(apply_rope(x, cos, sin), eps)`` of
:mod:`headscope.hybrid.functional`: Hugging Face rotate-half RoPE with ``cos``/``sin`` of shape
``(B or 1, T, D)`` shared by the heads, then ``u / sqrt(sum_D(u^2) + eps)`` in float32.

* CUDA (unless ``triton_off()``), D even, dtype float32/bfloat16/float16, ``cos``/``sin`` not
  requiring a gradient: the Triton kernels of :mod:`.triton_rope_norm`, one read of ``x`` and one write
  (forward and, when ``x`` requires grad, an exact Triton backward). Float32 math throughout with one
  rounding at the end, so for bf16 inputs it is closer to the float32 reference than the composition,
  which also rounds the rotated tensor to bf16 before normalising (relative RMS error vs float32 ~0.0017
  for one bf16 rounding, ~0.003 for the composition): on CUDA the layer's bf16 numbers change slightly.
* Everything else (CPU, odd D, float64, ``cos``/``sin`` with grad): the torch composition of
  :mod:`.naive`, bit-identical to the layer's former ``l2_normalize(apply_rope(...))``.

triton is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.rope_norm.naive import rope_l2norm_reference
from headscope.kernels.switch import triton_off

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise HeadscopeError(f"rope_l2norm: x must be (B, T, H, D); got shape {tuple(x.shape)}")
    batch, length, _, head_dim = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1:] != (length, head_dim):
            raise HeadscopeError(
                f"rope_l2norm: {name} must be (B or 1, T, D) = ({batch} or 1, {length}, {head_dim}); "
                f"got {tuple(table.shape)}"
            )
    if len({x.device, cos.device, sin.device}) != 1:
        raise HeadscopeError(f"rope_l2norm: inputs are on different devices: {sorted({str(t.device) for t in (x, cos, sin)})}")


def use_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`rope_l2norm` takes the Triton path for these inputs (see the module docstring)."""
    if not x.is_cuda or triton_off():
        return False
    if x.shape[-1] % 2 or any(t.dtype not in TRITON_DTYPES for t in (x, cos, sin)):
        return False
    return not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))


def rope_l2norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotary embedding (HF rotate-half) then unit L2 norm over D, fused on CUDA.

    Args:
        x: GDN queries or keys ``(B, T, H, D)``; any strides (e.g. a view of the short-conv output).
        cos, sin: ``(B, T, D)`` or ``(1, T, D)`` from the base model's rotary module, shared by the heads.
        eps: added to the sum of squares before the square root (fla's ``l2norm``: 1e-6).

    Returns:
        ``(B, T, H, D)`` unit-norm rows in the promoted dtype of ``x``, ``cos``, ``sin`` (``x``'s dtype in
        the layer); contiguous on the Triton path.
    """
    _check_inputs(x, cos, sin)
    if use_triton(x, cos, sin):
        from headscope.kernels.rope_norm.triton_rope_norm import triton_rope_l2norm

        return triton_rope_l2norm(x, cos, sin, eps)
    return rope_l2norm_reference(x, cos, sin, eps)
