"""Torch reference of the per-head RMSNorm of queries and keys (Qwen3's ``q_norm``/``k_norm``).

Per token t and head h of ``x`` ``(B, T, H, D)`` with a weight ``w`` ``(D,)`` (Hugging Face's
``Qwen3RMSNorm``, op for op)::

    xf = float32(x);   y = xf / sqrt(mean_D(xf^2) + eps);   out = w * y.to(x.dtype)

The last product runs in the common dtype of ``w`` and ``x`` (bf16 in a bf16 model: the normalised row is
rounded to bf16, then the product is rounded again). The layer's ``HeadRMSNorm`` modules compute exactly
this (their forward calls it), so the CPU path of :func:`headscope.kernels.qk_norm.ops.qk_rms_norm` is
bit-identical to the layer's former two module calls; on float32 inputs it is the float32 reference of
the Triton kernel in :mod:`.triton_qk_norm`, and its autograd the gradient used in training.
"""

from __future__ import annotations

import torch


def head_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with a weight, in float32 (module docstring).

    Args:
        x: ``(..., D)``.
        weight: ``(D,)``.
        eps: added to the mean square.
    Returns:
        ``(..., D)`` in the promoted dtype of ``weight`` and ``x``.
    """
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)
