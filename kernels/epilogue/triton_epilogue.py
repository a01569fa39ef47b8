"""Triton kernels for the head-wise hybrid layer's fused epilogue (forward and exact backward).

Computes, per token and head h, ``y_h = gamma_h * n_h * s_h`` with ``n_h = o_h * r_h``,
``r_h = 1 / sqrt(mean_D(o_h^2) + eps)`` and ``s_h = sigmoid(gate_h)`` for h < Hg (1 otherwise):
one pass over o (and the gate) instead of the five or six elementwise kernels of the unfused torch
version. One program handles one token row and a block of heads (the whole (BLOCK_H, D) tile sits in
registers; all arithmetic in float32). The forward reads o from one tensor or from two, heads ``[0, H1)``
from the first and ``[H1, H)`` from the second, each with its own strides: the hybrid layer passes its FA
output (a transposed SDPA result) and its GDN output as they are, never concatenated. Without autograd
(no input requiring a gradient, or grad mode off) :func:`triton_head_epilogue` launches it directly; with
autograd it concatenates and goes through :class:`TritonHeadEpilogue`, whose forward saves r (B*T, H) in
float32 for the backward. The backward kernel recomputes n and s and applies the analytic gradients::

    dgate_h  = dy_h * gamma_h * n_h * s_h * (1 - s_h)                    (h < Hg)
    dgamma_h = sum_{rows, D} dy_h * n_h * s_h                            (per-row partials, summed in torch)
    do_h     = r_h * (u_h - n_h * mean_D(u_h * n_h)),  u_h = dy_h * gamma_h * s_h

The slow exact twin is :func:`headscope.kernels.epilogue.naive.head_epilogue_reference`. Runs on CUDA,
and on CPU under ``TRITON_INTERPRET=1`` (how the tests exercise it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, last_dim_contiguous, launch, next_power_of_2, on_device

MAX_TILE_ELEMENTS = 2048  # BLOCK_H * BLOCK_D per program


@triton.jit
def _epilogue_fwd_kernel(
    o_ptr, o2_ptr, gamma_ptr, gate_ptr, y_ptr, rstd_ptr, T, H, H1, HG, D, eps,
    so_b, so_t, so_h, so2_b, so2_t, so2_h, sg_b, sg_t, sg_h,
    TWO_PARTS: tl.constexpr, HAS_GATE: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // T, row % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    head_ok = heads < H
    mask = head_ok[:, None] & (dims < D)[None, :]  # (BLOCK_H, BLOCK_D)
    first = (heads < H1)[:, None]
    x = tl.load(o_ptr + b * so_b + t * so_t + heads[:, None] * so_h + dims[None, :], mask=mask & first, other=0.0).to(tl.float32)
    if TWO_PARTS:  # heads [H1, H) from the second tensor
        x += tl.load(o2_ptr + b * so2_b + t * so2_t + (heads[:, None] - H1) * so2_h + dims[None, :], mask=mask & ~first, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_H,)
    gamma = tl.load(gamma_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    y = x * (rstd * gamma)[:, None]
    if HAS_GATE:
        gated = mask & (heads < HG)[:, None]
        logits = tl.load(gate_ptr + b * sg_b + t * sg_t + heads[:, None] * sg_h + dims[None, :], mask=gated, other=0.0)
        y = tl.where(gated, y * tl.sigmoid(logits.to(tl.float32)), y)
    tl.store(y_ptr + row * H * D + heads[:, None] * D + dims[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + row * H + heads, rstd, mask=head_ok)


@triton.jit
def _epilogue_bwd_kernel(
    dy_ptr, o_ptr, gamma_ptr, gate_ptr, rstd_ptr, do_ptr, dgate_ptr, dgamma_rows_ptr, H, HG, D,
    HAS_GATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_ok = heads < H
    mask = head_ok[:, None] & (dims < D)[None, :]
    offsets = row * H * D + heads[:, None] * D + dims[None, :]
    x = tl.load(o_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row * H + heads, mask=head_ok, other=0.0)  # (BLOCK_H,)
    gamma = tl.load(gamma_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    normed = x * rstd[:, None]
    if HAS_GATE:
        gated = mask & (heads < HG)[:, None]
        gate_offsets = row * HG * D + heads[:, None] * D + dims[None, :]
        logits = tl.load(gate_ptr + gate_offsets, mask=gated, other=0.0).to(tl.float32)
        sig = tl.where(gated, tl.sigmoid(logits), 1.0)
        dlogits = dy * gamma[:, None] * normed * sig * (1.0 - sig)
        tl.store(dgate_ptr + gate_offsets, dlogits.to(dgate_ptr.dtype.element_ty), mask=gated)
        dy = dy * sig
    tl.store(dgamma_rows_ptr + row * H + heads, tl.sum(dy * normed, axis=1), mask=head_ok)
    dnormed = dy * gamma[:, None]
    dx = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / D)[:, None])
    tl.store(do_ptr + offsets, dx.to(do_ptr.dtype.element_ty), mask=mask)


def _tiling(n_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(n_heads), max(1, MAX_TILE_ELEMENTS // block_d))
    return block_h, block_d


def _forward(
    parts: tuple[torch.Tensor, ...], gamma: torch.Tensor, gate: torch.Tensor | None, eps: float, rstd: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the forward kernel on one or two parts of o (heads in order); store r into ``rstd`` if given.

    Returns y ``(B, T, H, D)`` contiguous, in the first part's dtype.
    """
    parts, gamma = tuple(last_dim_contiguous(part) for part in parts), last_dim_contiguous(gamma)
    gate = last_dim_contiguous(gate) if gate is not None else None
    first, second = parts[0], parts[-1]
    batch, length, n_first, head_dim = first.shape
    n_heads = n_first + (second.shape[2] if len(parts) == 2 else 0)
    n_gated = gate.shape[2] if gate is not None else 0
    block_h, block_d = _tiling(n_heads, head_dim)
    y = torch.empty(batch, length, n_heads, head_dim, dtype=first.dtype, device=first.device)
    if batch * length:
        launch(
            _epilogue_fwd_kernel, (batch * length, cdiv(n_heads, block_h)),
            first, second, gamma, gate if gate is not None else first, y, rstd if rstd is not None else y,
            length, n_heads, n_first, n_gated, head_dim, eps,
            *first.stride()[:3], *second.stride()[:3], *(gate.stride()[:3] if gate is not None else (0, 0, 0)),
            TWO_PARTS=len(parts) == 2, HAS_GATE=gate is not None, STORE_RSTD=rstd is not None, BLOCK_H=block_h, BLOCK_D=block_d,
        )
    return y


class TritonHeadEpilogue(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (exact analytic gradients)."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, gamma: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
        o = o.contiguous()  # (B, T, H, D)
        gamma = gamma.contiguous()  # (H,)
        gate = gate.contiguous() if gate is not None else None  # (B, T, Hg, D)
        batch, length, n_heads, _ = o.shape
        store_rstd = any(ctx.needs_input_grad[:3])
        rstd = torch.empty(batch * length, n_heads, dtype=torch.float32, device=o.device) if store_rstd else None
        y = _forward((o,), gamma, gate, eps, rstd)
        ctx.save_for_backward(o, gamma, gate, rstd)
        ctx.has_gate = gate is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        o, gamma, gate, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        batch, length, n_heads, head_dim = o.shape
        n_rows, n_gated = batch * length, (gate.shape[2] if ctx.has_gate else 0)
        block_h, block_d = _tiling(n_heads, head_dim)
        do = torch.empty_like(o)
        dgate = torch.empty_like(gate) if ctx.has_gate else None
        dgamma_rows = torch.empty(n_rows, n_heads, dtype=torch.float32, device=o.device)
        grid = (n_rows, cdiv(n_heads, block_h))
        if n_rows:
            _epilogue_bwd_kernel[grid](
                dy, o, gamma, gate if ctx.has_gate else o, rstd, do, dgate if ctx.has_gate else o, dgamma_rows,
                n_heads, n_gated, head_dim, HAS_GATE=ctx.has_gate, BLOCK_H=block_h, BLOCK_D=block_d,
            )
        dgamma = dgamma_rows.sum(dim=0).to(gamma.dtype)
        return do, dgamma, dgate, None


def triton_head_epilogue(
    o: torch.Tensor | tuple[torch.Tensor, torch.Tensor], gamma: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Fused per-head RMSNorm * gamma * sigmoid(gate) with the Triton kernels (no input checks).

    Args:
        o: per-head attention outputs (B, T, H, D), or a pair (B, T, H1, D), (B, T, H - H1, D) of its first and
            last heads (any strides with the last one 1: read in place, never concatenated without autograd).
        gamma: per-head scale (H,).
        gate: pre-sigmoid gate logits (B, T, Hg, D) for the first Hg heads, or None.
        eps: added to the mean square before the square root.

    Returns:
        y: (B, T, H, D) contiguous, in o's dtype.
    """
    parts = o if isinstance(o, tuple) else (o,)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*parts, gamma, gate))
    with on_device(parts[0]):
        if not needs_grad:
            return _forward(parts, gamma, gate, eps)
        return TritonHeadEpilogue.apply(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0], gamma, gate, eps)
