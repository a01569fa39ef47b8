"""Float32 torch reference of the head-wise hybrid layer's fused epilogue.

Per token and head h (FA heads first, GDN heads after)::

    y_h = gamma_h * o_h / sqrt(mean_D(o_h^2) + eps) * (sigmoid(gate_h) if h < Hg else 1)

RMSNorm over the head dimension D without an elementwise weight, a learned scalar gamma_h per head, and
the output gate (Qwen3-Next gated attention) on the first Hg heads only. Computed in float32 and
returned in o's dtype. This is the slow exact twin of :mod:`.triton_epilogue`; its autograd is the
gradient reference, and it is the CPU path of :func:`headscope.kernels.epilogue.ops.head_epilogue`.
"""

from __future__ import annotations

import torch


def head_epilogue_reference(
    o: torch.Tensor, gamma: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Per-head RMSNorm, per-head scale and output gate, in float32.

    Args:
        o: per-head attention outputs (B, T, H, D).
        gamma: per-head scale (H,).
        gate: pre-sigmoid gate logits (B, T, Hg, D) for the first Hg heads, or None.
        eps: added to the mean square before the square root.

    Returns:
        y: (B, T, H, D) in o's dtype.
    """
    x = o.float()  # (B, T, H, D)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gamma.float()[:, None]
    if gate is not None:
        n_gated = gate.shape[2]
        y = torch.cat([y[:, :, :n_gated] * torch.sigmoid(gate.float()), y[:, :, n_gated:]], dim=2)
    return y.to(o.dtype)
