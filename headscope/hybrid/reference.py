"""Slow exact twin of ``HeadwiseHybridAttention``: one head at a time, in the *pretrained* head order.

``reference_hybrid_attention`` recomputes a built hybrid layer from the pretrained attention module's
q/k/v/o weights (original head indices, original KV groups) plus the new per-head parameters read from
the hybrid layer at each head's permuted position. Full attention is an explicit masked softmax,
Gated DeltaNet a token-by-token float32 recurrence, the conv a plain dot product over the last K inputs.
Nothing here is permuted, fused or batched over heads, so agreement with the fast layer checks the
builder's row/column permutation, the FA KV grouping and segments, the GDN plumbing and the fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headscope.hybrid.functional import apply_rope, log_position_scale


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule, one token at a time in float32.

    ``S_t = exp(g_t)·S_{t-1}``; ``S_t += k_t (β_t (v_t − S_tᵀ k_t))ᵀ``; ``o_t = S_tᵀ (scale·q_t)``.

    Args:
        q, k: ``(B, T, H, Dk)`` (already L2-normalised); v: ``(B, T, H, Dv)``; g, beta: ``(B, T, H)``.
        initial_state: ``(B, H, Dk, Dv)`` or None (zeros).
    Returns:
        o ``(B, T, H, Dv)`` float32 and the final state ``(B, H, Dk, Dv)`` float32.
    """
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    batch, seq, heads, dk = k.shape
    state = initial_state.float().clone() if initial_state is not None else q.new_zeros(batch, heads, dk, v.shape[-1])
    out = []
    for t in range(seq):
        state = state * g[:, t].exp()[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t]))
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t] * scale))
    return torch.stack(out, dim=1), state


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def _rows(linear: nn.Linear, x: torch.Tensor, index: int, width: int) -> torch.Tensor:
    """``x @ W[index·width : (index+1)·width]ᵀ (+ b)``: one head's slice of a projection."""
    rows = slice(index * width, (index + 1) * width)
    bias = linear.bias[rows] if linear.bias is not None else None
    return F.linear(x, linear.weight[rows], bias)


@torch.no_grad()
def reference_hybrid_attention(
    layer,
    pretrained_attention: nn.Module,
    head_order: list[int],
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor,
    epilogue_eps: float = 1e-6,
) -> torch.Tensor:
    """The hybrid layer's output, computed head by head from unpermuted weights.

    Args:
        layer: a built ``HeadwiseHybridAttention`` (new parameters are read from it).
        pretrained_attention: the pretrained HF attention module (q_proj/k_proj/v_proj/o_proj in the
            original head order; GDN heads use their pretrained KV group's rows, as the builder
            initialises them).
        head_order: ``head_order[p]`` = pretrained head at the layer's position ``p``.
        hidden_states: ``(B, T, hidden)``; position_embeddings: ``(cos, sin)`` ``(B, T, D)``;
        position_ids: ``(B, T)``.
    Returns:
        ``(B, T, hidden)`` float32.
    """
    spec, d = layer.spec, layer.spec.head_dim
    x = hidden_states.float()
    cos, sin = (t.float() for t in position_embeddings)
    n_heads = spec.n_heads
    group = n_heads // (pretrained_attention.k_proj.weight.shape[0] // d)
    position_of = {head: p for p, head in enumerate(head_order)}
    out = x.new_zeros(*x.shape[:2], pretrained_attention.o_proj.weight.shape[0])
    if pretrained_attention.o_proj.bias is not None:
        out = out + pretrained_attention.o_proj.bias.float()
    seq = x.shape[1]
    for head in range(n_heads):
        p = position_of[head]
        q = _rows(pretrained_attention.q_proj, x, head, d)  # (B, T, D)
        k = _rows(pretrained_attention.k_proj, x, head // group, d)
        v = _rows(pretrained_attention.v_proj, x, head // group, d)
        if spec.qk_norm:
            q, k = layer.q_norm(q[:, :, None])[:, :, 0].float(), layer.k_norm(k[:, :, None])[:, :, 0].float()
        gate = None
        if p < spec.n_fa_heads:
            if spec.fa_rope:
                q, k = apply_rope(q[:, :, None], cos, sin)[:, :, 0], apply_rope(k[:, :, None], cos, sin)[:, :, 0]
            if spec.log_scaling:
                q = q * log_position_scale(position_ids, spec.attn_scale, spec.floor_scale)[..., None]
            logits = torch.einsum("bqd,bkd->bqk", q, k) * d**-0.5
            pos = torch.arange(seq, device=x.device)
            visible = pos[None, :] <= pos[:, None]
            if spec.sliding_window is not None:
                visible &= pos[:, None] - pos[None, :] < spec.sliding_window
            o = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ v
            if spec.gated:
                gate = torch.sigmoid(_rows(layer.gate_proj, x, p, d))
        else:
            j = p - spec.n_fa_heads
            taps = layer.conv1d.weight.squeeze(1).float()  # (3·n_gdn·D, K)
            convolved = []
            for part, t in enumerate((q, k, v)):
                w = taps[(part * spec.n_gdn_heads + j) * d : (part * spec.n_gdn_heads + j + 1) * d]  # (D, K)
                padded = F.pad(t, (0, 0, w.shape[1] - 1, 0))  # (B, K-1+T, D)
                convolved.append(F.silu(torch.stack([(padded[:, s : s + w.shape[1]] * w.T).sum(1) for s in range(seq)], 1)))
            q, k, v = convolved
            q = _unit(apply_rope(q[:, :, None], cos, sin))
            k = _unit(apply_rope(k[:, :, None], cos, sin))
            beta = torch.sigmoid(_rows(layer.b_proj, x, j, 1))  # (B, T, 1)
            a = _rows(layer.a_proj, x, j, 1)
            g = -layer.A_log[j].float().exp() * F.softplus(a + layer.dt_bias[j].float())
            o, _ = naive_gated_delta_rule(q, k, v[:, :, None], g, beta, scale=d**-0.5)
            o = o[:, :, 0]
        if spec.fusion_norm:
            o = layer.gamma[p].float() * _rms(o, epilogue_eps)
        if gate is not None:
            o = o * gate
        out = out + F.linear(o, pretrained_attention.o_proj.weight[:, head * d : (head + 1) * d].float())
    return out
