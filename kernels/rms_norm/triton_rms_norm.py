"""Triton kernel of the residual add + RMSNorm of a decoder block (math in :mod:`.naive`), one launch.

One program takes ``BLOCK_R`` rows (a row = one token's hidden vector, H values): loads ``x`` and the
residual, adds them rounded to the input dtype (the block's ``+``), stores the sum (the new residual
stream), then float32 sum of squares, ``rstd = 1 / sqrt(mean + eps)``, the normalised row rounded to the
input dtype (the reference's ``.to(dtype)``), times the weight, rounded again at the store. In place of
eager torch's nine launches (the add, then the norm's float32 copy, square, mean, add, rsqrt, product, cast,
weight product), which at decode batch sizes are pure launch overhead: two per block and step, 56 at a
28-layer model. Inference only. Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, launch, next_power_of_2, on_device

MAX_TILE = 8192  # elements per program: 4 rows of a 2048 hidden size, one row up to 8192


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, n_rows, eps,
    H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows < n_rows)[:, None] & (cols < H)[None, :]
    offsets = rows[:, None] * H + cols[None, :]
    h = tl.load(x_ptr + offsets, mask=ok, other=0.0)  # (BLOCK_R, BLOCK_H) input dtype
    if HAS_RESIDUAL:
        h = (tl.load(r_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + h.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / H + eps)
    y = (hf * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=ok)


def triton_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.naive.add_rms_norm_reference` in one Triton launch (no input checks, no autograd).

    Args:
        x, residual: ``(..., H)`` of one dtype (non-contiguous ones are copied); residual may be None.
        weight: ``(H,)`` in that dtype.
        eps: added to the mean square.
    Returns:
        the normalised rows and the sum (``x`` itself without a residual), contiguous, in x's dtype.
    """
    x = x.contiguous()
    hidden = x.shape[-1]
    out = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    residual = x if residual is None else residual.contiguous()  # unread without a residual
    n_rows = x.numel() // hidden if hidden else 0
    if n_rows == 0:
        return out, h
    block_h = next_power_of_2(hidden)
    block_r = max(1, MAX_TILE // block_h)
    with on_device(x):
        launch(
            _add_rms_norm_kernel, (cdiv(n_rows, block_r),),
            x, residual, weight, out, h, n_rows, eps,
            H=hidden, HAS_RESIDUAL=h is not x, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=8 if block_h >= 4096 else 4,
        )
    return out, h
