"""Triton kernel of the per-head RMSNorm of queries and keys (math in :mod:`.naive`), both in one launch.

One program normalises ``BLOCK_R`` rows (a row = one token's one head, D values) of q or of k: programs
``[0, q blocks)`` take q, the rest k. Per row: float32 sum of squares, ``rstd = 1 / sqrt(mean + eps)``,
the normalised row rounded to the input dtype (as the reference's ``.to(dtype)``), times the weight,
rounded again at the store. One read of each input, one write of each output (contiguous ``(B, T, H, D)``),
in place of the reference's 16 launches for the two tensors (float32 copy, square, mean, add, rsqrt,
product, cast, weight product, each). Inference only. Runs on CUDA, and on CPU under
``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, last_dim_contiguous, launch, next_power_of_2, on_device

MAX_TILE = 2048  # elements per program: 16 rows of D = 128


@triton.jit
def _norm_rows(x_ptr, w_ptr, out_ptr, block, n_rows, heads, T, sx_b, sx_t, sx_h, eps, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalise rows ``[block·BLOCK_R, (block + 1)·BLOCK_R)`` of ``x`` (flat ``(b, t, h)`` order) into ``out``."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    h = rows % heads
    bt = (rows // heads).to(tl.int64)
    base = (bt // T) * sx_b + (bt % T) * sx_t + h * sx_h
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + base[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_D)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_rms_norm_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, qo_ptr, ko_ptr,
    n_q_rows, n_k_rows, q_heads, k_heads, T, eps, n_q_blocks,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_q_blocks:
        _norm_rows(q_ptr, wq_ptr, qo_ptr, pid, n_q_rows, q_heads, T, sq_b, sq_t, sq_h, eps, D, BLOCK_R, BLOCK_D)
    else:
        _norm_rows(k_ptr, wk_ptr, ko_ptr, pid - n_q_blocks, n_k_rows, k_heads, T, sk_b, sk_t, sk_h, eps, D, BLOCK_R, BLOCK_D)


def triton_qk_rms_norm(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both RMSNorms in one Triton launch (no input checks, no autograd).

    Args:
        q ``(B, T, Hq, D)``, k ``(B, T, Hk, D)``: one dtype, any strides (a last stride other than 1 is copied).
        q_weight, k_weight: ``(D,)`` in that dtype.
        eps: added to the mean square.
    Returns:
        q, k normalised, contiguous, in the inputs' dtype.
    """
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    batch, length, q_heads, dim = q.shape
    k_heads = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_d = next_power_of_2(dim)
    block_r = max(1, MAX_TILE // block_d)
    n_q_rows, n_k_rows = batch * length * q_heads, batch * length * k_heads
    n_q_blocks = cdiv(n_q_rows, block_r)
    grid = (n_q_blocks + cdiv(n_k_rows, block_r),)
    if grid[0] == 0:
        return q_out, k_out
    with on_device(q):
        launch(
            _qk_rms_norm_kernel, grid,
            q, k, q_weight, k_weight, q_out, k_out,
            n_q_rows, n_k_rows, q_heads, k_heads, length, eps, n_q_blocks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            D=dim, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )
    return q_out, k_out
