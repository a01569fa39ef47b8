"""Float32 torch reference of one Gated DeltaNet decode step of the hybrid layer, states updated in place.

For one new token per row, with the GDN heads' q, k, v ``(B, 1, H, D)`` (projection outputs), the layer
input ``x`` ``(B, hidden)``, the conv window ``conv_state`` ``(B, C, K)`` (the last ``K`` conv inputs,
``C = 3·H·D`` channels in ``cat(q, k, v)`` order) and the recurrent state ``S`` ``(B, H, D, D)`` float32::

    u       = cat(q, k, v) · m                                   m = the token's padding mask (1 = real)
    window  = [conv_state[..., 1:], u]                           -> written back to conv_state
    y       = SiLU(sum_j window[..., j] · w[:, j])              w = conv taps (C, K)
    q', k'  = L2norm(RoPE(y_q)), L2norm(RoPE(y_k));  v' = y_v    (kernels/gdn_prep: same conv, same norm)
    beta    = sigmoid(x · W_b) · m;   g = -exp(A_log) · softplus(x · W_a + dt_bias) · m
    S       = exp(g) S;  S += k' (beta (v' - Sᵀ k'))ᵀ;  o = Sᵀ (scale · q')        -> S written back

which is the layer's GDN branch for ``T = 1`` (``short_conv_rope_l2norm`` + ``b_proj``/``a_proj`` +
``gated_delta_rule`` + the cache updates) with both states updated in place, so their addresses never
change (what a CUDA graph needs). This reference composes those same torch references in float32; it is
the CPU path of :func:`headscope.kernels.gdn_decode.ops.gdn_decode_step` and the float32 reference of the
Triton kernel in :mod:`.triton_gdn_decode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headscope.kernels.gdn.chunk import recurrent_step
from headscope.kernels.gdn_prep.naive import short_conv_rope_l2norm_reference


def gdn_decode_reference(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b_weight: torch.Tensor, a_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, step_mask: torch.Tensor | None = None,
    *, scale: float, eps: float = 1e-6,
) -> torch.Tensor:
    """One GDN decode step (module docstring); ``conv_state`` and ``state`` are updated in place.

    Args:
        x: ``(B, hidden)`` the layer input of the new token (for the beta and decay projections).
        q, k, v: ``(B, 1, H, D)`` the GDN heads' projections (any strides).
        conv_weight: ``(C, K)`` depthwise conv taps, ``C = 3·H·D`` in ``cat(q, k, v)`` order.
        conv_state: ``(B, C, K)`` the last ``K`` conv inputs (in place).
        cos, sin: ``(B or 1, 1, D)`` rotary tables of the new token.
        b_weight, a_weight: ``(H, hidden)`` weights of ``b_proj`` and ``a_proj``.
        A_log, dt_bias: ``(H,)`` decay parameters.
        state: ``(B, H, D, D)`` float32 recurrent state (in place).
        step_mask: ``(B,)`` 1 for a real token, 0 for padding, or None.
        scale: query scale (1/sqrt(D)); eps: the L2 norm's epsilon.
    Returns:
        ``(B, 1, H, D)`` in q's dtype.
    """
    mask = step_mask[:, None] if step_mask is not None else None  # (B, 1)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    q_n, k_n, v_c, window = short_conv_rope_l2norm_reference(
        q32, k32, v32, conv_weight.float(), cos.float(), sin.float(), conv_state.float(), mask, eps
    )
    xf = x.float()
    beta = torch.sigmoid(xf @ b_weight.float().T)[:, None]  # (B, 1, H)
    g = (-A_log.float().exp() * F.softplus(xf @ a_weight.float().T + dt_bias.float()))[:, None]
    if mask is not None:
        beta, g = beta * mask[..., None].float(), g * mask[..., None].float()
    o, new_state = recurrent_step(q_n, k_n, v_c, g, beta, state, scale=scale)
    conv_state.copy_(window)
    state.copy_(new_state)
    return o.to(q.dtype)
