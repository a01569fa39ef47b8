"""Torch reference of the GDN input preparation: the composition the hybrid layer has always run.

Inputs are the GDN heads' q, k, v ``(B, T, H, D)``. Their channels, laid side by side as
``mixed = cat(q, k, v)`` ``(B, T, C)`` with ``C = 3·H·D`` (q channels, then k, then v; head-major, then
D), go through a causal depthwise convolution of width ``K`` with taps ``w`` ``(C, K)`` and a SiLU::

    y[t, c] = SiLU( sum_{j<K} w[c, j] · x[t - K + 1 + j, c] )         x[s] = history for s < 0

where the history is the conv state ``(B, C, K)``: the ``K`` inputs before this chunk (zeros when there
is none; only its last ``K - 1`` reach an output). A padding mask ``(B, T)`` multiplies the inputs
before the convolution (a padded token contributes nothing, not even to the state). Then q and k get
Hugging Face rotate-half RoPE and a unit L2 norm over D in float32
(:func:`headscope.kernels.rope_norm.naive.rope_l2norm_reference`); v is just ``y``. The new conv
state is the last ``K`` (masked) inputs of ``[history, x]``.

:func:`short_conv_rope_l2norm_reference` runs exactly the layer's former op sequence (cat, mask,
conv, unbind, RoPE + norm), so the CPU path of :func:`headscope.kernels.gdn_prep.ops.short_conv_rope_l2norm`
is bit-identical to it; called on float32 inputs it is the float32 reference of the Triton kernel in
:mod:`.triton_gdn_prep`. :func:`next_conv_state` forms the new conv state alone, exactly (the reference of the
state the kernel stores). Note that in the inputs' dtype every stage rounds (masked input, conv output,
SiLU, rotated q/k) before the float32 norm.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from headscope.kernels.rope_norm.naive import rope_l2norm_reference

ConvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
RopeNormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def short_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution followed by SiLU, carrying the last ``K`` inputs.

    Args:
        x: ``(B, T, C)`` inputs.
        weight: ``(C, K)`` taps; tap ``K - 1`` multiplies the current token.
        state: ``(B, C, K)`` the ``K`` inputs before ``x`` (zeros = no history), or None.
    Returns:
        ``y`` ``(B, T, C)`` = SiLU(conv(x)), and the new state ``(B, C, K)`` (last ``K`` inputs).
    """
    batch, _, channels = x.shape
    width = weight.shape[-1]
    history = state.to(x.dtype) if state is not None else x.new_zeros(batch, channels, width)
    full = torch.cat((history, x.transpose(1, 2)), dim=-1)  # (B, C, K + T)
    y = F.conv1d(full, weight.to(x.dtype).unsqueeze(1), groups=channels)  # (B, C, T + 1)
    return F.silu(y[..., 1:]).transpose(1, 2), full[..., -width:].contiguous()


def short_conv_rope_l2norm_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    conv_state: torch.Tensor | None = None, input_mask: torch.Tensor | None = None, eps: float = 1e-6,
    *, conv: ConvFn = short_conv_reference, rope_norm: RopeNormFn = rope_l2norm_reference,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SiLU(causal_conv(cat(q, k, v)))``, then RoPE + L2 norm of q and k: the layer's composition.

    Args:
        q, k, v: ``(B, T, H, D)`` GDN queries, keys, values (any strides).
        weight: ``(3·H·D, K)`` conv taps in ``cat(q, k, v)`` channel order.
        cos, sin: ``(B or 1, T, D)`` rotary tables shared by the heads.
        conv_state: ``(B, 3·H·D, K)`` the ``K`` conv inputs before this chunk, or None (no history).
        input_mask: ``(B, T)`` multiplies the conv inputs (1 = real token, 0 = padding), or None.
        eps: added to the sum of squares before the square root.
        conv, rope_norm: the two stages (the torch references by default; the dispatcher passes its
            CUDA-aware versions, which take the same arguments).
    Returns:
        q, k ``(B, T, H, D)`` unit-norm rows, v ``(B, T, H, D)`` (a view of the conv output) and the new
        conv state ``(B, 3·H·D, K)``.
    """
    batch, length, heads, dim = q.shape
    mixed = torch.cat((q, k, v), dim=2).reshape(batch, length, 3 * heads * dim)  # (B, T, C)
    if input_mask is not None:
        mixed = mixed * input_mask[:, :, None].to(mixed.dtype)
    mixed, new_state = conv(mixed, weight, conv_state)
    q, k, v = mixed.view(batch, length, 3, heads, dim).unbind(dim=2)
    return rope_norm(q, cos, sin, eps), rope_norm(k, cos, sin, eps), v, new_state


def next_conv_state(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int,
    conv_state: torch.Tensor | None = None, input_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last ``width`` conv inputs after this chunk, as the composition's ``short_conv`` returns them: the
    reference of the state the Triton pass stores (``triton_short_conv_rope_l2norm(..., state_out=)``).

    Args:
        q, k, v: ``(B, T, H, D)`` this chunk's conv inputs (any strides).
        width: conv kernel size K.
        conv_state: ``(B, 3·H·D, K)`` the inputs before the chunk, or None (zeros).
        input_mask: ``(B, T)`` padding mask multiplying the inputs, or None.
    Returns:
        ``(B, 3·H·D, K)`` contiguous, in q's dtype: ``[conv_state, masked inputs]`` cut to the last K.
    """
    batch, length, heads, dim = q.shape
    recent = min(length, width)
    tail = torch.cat([x[:, length - recent :] for x in (q, k, v)], dim=2).reshape(batch, recent, 3 * heads * dim)
    if input_mask is not None:
        tail = tail * input_mask[:, length - recent :, None].to(tail.dtype)
    tail = tail.transpose(1, 2)  # (B, C, recent)
    if recent < width:
        history = conv_state.to(tail.dtype) if conv_state is not None else tail.new_zeros(batch, tail.shape[1], width)
        tail = torch.cat((history[..., recent:], tail), dim=-1)  # (B, C, K)
    return tail.contiguous()
