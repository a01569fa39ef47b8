"""Torch reference of the fused RoPE + L2 norm: the exact composition the hybrid layer used before.

Per token t, head h (``x`` of shape ``(B, T, H, D)``, ``cos``/``sin`` of shape ``(B or 1, T, D)`` shared by
the heads, D even)::

    u = x * cos + rotate_half(x) * sin          rotate_half([x1, x2]) = [-x2, x1]   (Hugging Face RoPE)
    y = u / sqrt(sum_D(u^2) + eps)              in float32, returned in u's dtype   (fla's l2norm)

The op sequence is the same as ``headscope.hybrid.functional.l2_normalize(apply_rope(x, cos, sin), eps)``
(so the CPU path of :func:`headscope.kernels.rope_norm.ops.rope_l2norm` is bit-identical to it; a test
checks this). Note the rotation runs in the inputs' dtype: for bf16 inputs ``u`` is rounded to bf16 before
the float32 norm. Called on float32 inputs it is the float32 reference of the Triton kernel in
:mod:`.triton_rope_norm`, and its autograd is that kernel's gradient reference. It is defined here rather
than imported from ``headscope.hybrid`` so that ``headscope.kernels`` does not depend on the layer package.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension.

    Args:
        x: ``(..., D)``.

    Returns:
        ``(..., D)`` in ``x``'s dtype.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_l2norm_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotary embedding (HF rotate-half convention) followed by a unit L2 norm over the head dimension.

    Args:
        x: queries or keys ``(B, T, H, D)`` (any strides).
        cos, sin: ``(B, T, D)`` or ``(1, T, D)`` (broadcast over the batch), shared by all heads.
        eps: added to the sum of squares before the square root.

    Returns:
        ``(B, T, H, D)`` unit-norm rows, in the promoted dtype of ``x``, ``cos`` and ``sin`` (``x``'s dtype
        when all three agree, as in the layer).
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D)
    u = x * cos + rotate_half(x) * sin
    uf = u.float()
    return (uf * torch.rsqrt(uf.pow(2).sum(-1, keepdim=True) + eps)).to(u.dtype)
