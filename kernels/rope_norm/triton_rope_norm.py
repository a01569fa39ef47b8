"""Triton kernels for the fused RoPE + L2 norm of the GDN queries and keys (forward and exact backward).

Per token row (b, t) and head h, with ``x = [x1, x2]`` split in halves of ``D/2`` and ``cos``/``sin``
split the same way::

    u1 = x1 * c1 - x2 * s1,   u2 = x2 * c2 + x1 * s2          (= x * cos + rotate_half(x) * sin)
    r  = 1 / sqrt(sum_D(u^2) + eps),   y = u * r

One read of ``x``, ``cos`` and ``sin`` and one write of ``y`` instead of the ~10 elementwise passes of the
torch composition (mul, chunk/neg/cat, mul, add, upcast, square, sum, rsqrt, mul, downcast). All arithmetic
is float32; unlike the composition, ``u`` is never rounded to the input dtype. One program handles one
token row and a block of heads; ``cos``/``sin`` are loaded once per row and shared by its heads. ``x``
may have any strides (the layer passes a view of the conv output), ``cos``/``sin`` too (a batch stride
of 0 broadcasts batch 1); ``y`` is contiguous ``(B, T, H, D)``.

The backward recomputes ``u`` from ``x`` and the saved ``r`` (float32, ``(B*T, H)``) and applies::

    du = r * (dy - y * sum_D(dy * y))
    dx1 = du1 * c1 + du2 * s2,   dx2 = du2 * c2 - du1 * s1

(no gradient for ``cos``/``sin``: the dispatcher takes the torch path when they require one). The float32
reference is :func:`headscope.kernels.rope_norm.naive.rope_l2norm_reference`. Runs on CUDA, and on CPU
under ``TRITON_INTERPRET=1`` (how the tests exercise it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE_ELEMENTS = 2048  # BLOCK_H * 2 * BLOCK_HALF per program (H=14, D=128: one program per row)


@triton.jit
def _rotated_tile(
    x_ptr, cos_ptr, sin_ptr, row, heads, dims, mask, T, HALF,
    sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
):
    """Load one token row's tile of ``x`` (heads x half dims, both halves) and its cos/sin halves, in
    float32; return ``u = x * cos + rotate_half(x) * sin`` as halves ``(BLOCK_H, BLOCK_HALF)`` and the
    table halves ``(1, BLOCK_HALF)`` the backward needs."""
    b, t = row // T, row % T
    dim_ok = dims < HALF
    x_lo = x_ptr + b * sx_b + t * sx_t + heads[:, None] * sx_h + dims[None, :] * sx_d
    x1 = tl.load(x_lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_lo + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    c_lo = cos_ptr + b * sc_b + t * sc_t + dims * sc_d
    s_lo = sin_ptr + b * ss_b + t * ss_t + dims * ss_d
    c1 = tl.load(c_lo, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_lo + HALF * sc_d, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_lo, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_lo + HALF * ss_d, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, c1, c2, s1, s2


@triton.jit
def _rope_l2norm_fwd_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, rstd_ptr, T, H, HALF, eps,
    sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    STORE_RSTD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    dims = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    head_ok = heads < H
    mask = head_ok[:, None] & (dims < HALF)[None, :]  # (BLOCK_H, BLOCK_HALF)
    u1, u2, c1, c2, s1, s2 = _rotated_tile(
        x_ptr, cos_ptr, sin_ptr, row, heads, dims, mask, T, HALF,
        sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    )
    rstd = 1.0 / tl.sqrt(tl.sum(u1 * u1 + u2 * u2, axis=1) + eps)  # (BLOCK_H,)
    y_lo = y_ptr + row * H * 2 * HALF + heads[:, None] * 2 * HALF + dims[None, :]
    tl.store(y_lo, (u1 * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_lo + HALF, (u2 * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + row * H + heads, rstd, mask=head_ok)


@triton.jit
def _rope_l2norm_bwd_kernel(
    dy_ptr, x_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, T, H, HALF,
    sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    head_ok = heads < H
    mask = head_ok[:, None] & (dims < HALF)[None, :]
    u1, u2, c1, c2, s1, s2 = _rotated_tile(
        x_ptr, cos_ptr, sin_ptr, row, heads, dims, mask, T, HALF,
        sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    )
    rstd = tl.load(rstd_ptr + row * H + heads, mask=head_ok, other=0.0)[:, None]  # (BLOCK_H, 1)
    y1 = u1 * rstd
    y2 = u2 * rstd
    d_lo = row * H * 2 * HALF + heads[:, None] * 2 * HALF + dims[None, :]  # dy and dx are contiguous
    dy1 = tl.load(dy_ptr + d_lo, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(dy_ptr + d_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(dy1 * y1 + dy2 * y2, axis=1)[:, None]
    du1 = rstd * (dy1 - y1 * dot)
    du2 = rstd * (dy2 - y2 * dot)
    tl.store(dx_ptr + d_lo, (du1 * c1 + du2 * s2).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + d_lo + HALF, (du2 * c2 - du1 * s1).to(dx_ptr.dtype.element_ty), mask=mask)


def _tiling(n_heads: int, half: int) -> tuple[int, int]:
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, MAX_TILE_ELEMENTS // (2 * block_half)))
    return block_h, block_half


def _strides(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, ...]:
    """x's (b, t, h, d) strides, then cos's and sin's (b, t, d) with batch stride 0 when broadcast."""
    def table(c: torch.Tensor) -> tuple[int, int, int]:
        return (c.stride(0) if c.shape[0] > 1 else 0, c.stride(1), c.stride(2))

    return (*x.stride(), *table(cos), *table(sin))


class TritonRopeL2Norm(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward for ``x`` (``cos``/``sin`` get no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
        batch, length, n_heads, head_dim = x.shape
        n_rows, half = batch * length, head_dim // 2
        block_h, block_half = _tiling(n_heads, half)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        store_rstd = ctx.needs_input_grad[0]
        y = torch.empty(batch, length, n_heads, head_dim, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows if store_rstd else 1, n_heads, dtype=torch.float32, device=x.device)
        if n_rows and n_heads:
            grid = (n_rows, triton.cdiv(n_heads, block_h))
            _rope_l2norm_fwd_kernel[grid](
                x, cos, sin, y, rstd, length, n_heads, half, eps, *_strides(x, cos, sin),
                STORE_RSTD=store_rstd, BLOCK_H=block_h, BLOCK_HALF=block_half,
            )
        if store_rstd:
            ctx.save_for_backward(x, cos, sin, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, cos, sin, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        batch, length, n_heads, head_dim = x.shape
        n_rows, half = batch * length, head_dim // 2
        block_h, block_half = _tiling(n_heads, half)
        dx = torch.empty(batch, length, n_heads, head_dim, dtype=x.dtype, device=x.device)
        if n_rows and n_heads:
            grid = (n_rows, triton.cdiv(n_heads, block_h))
            _rope_l2norm_bwd_kernel[grid](
                dy, x, cos, sin, rstd, dx, length, n_heads, half, *_strides(x, cos, sin),
                BLOCK_H=block_h, BLOCK_HALF=block_half,
            )
        return dx, None, None, None


def triton_rope_l2norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused ``l2_normalize(apply_rope(x, cos, sin), eps)`` with the Triton kernels (no input checks).

    Args:
        x: queries or keys ``(B, T, H, D)``, D even, any strides.
        cos, sin: ``(B, T, D)`` or ``(1, T, D)``, any strides; they receive no gradient.
        eps: added to the sum of squares before the square root.

    Returns:
        ``(B, T, H, D)`` contiguous, in the promoted dtype of ``x``, ``cos`` and ``sin``.
    """
    if x.is_cuda:
        with torch.cuda.device(x.device):
            return TritonRopeL2Norm.apply(x, cos, sin, eps)
    return TritonRopeL2Norm.apply(x, cos, sin, eps)
