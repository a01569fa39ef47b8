"""Triton kernel of the GDN input preparation: conv + SiLU of q/k/v, RoPE + L2 norm of q/k, in one pass.

Per token t, GDN head h and channel c of q, k or v (``c`` in the ``cat(q, k, v)`` order of the conv
taps ``w`` ``(C, K)``, ``C = 3·H·D``), with ``x = [x1, x2]`` split in halves of ``D/2``::

    y[t]  = SiLU( sum_{j<K} w[c, j] · m[s] · x[s] ),   s = t - K + 1 + j     (x[s] = state[c, K + s] for s < 0)
    q, k:  u1 = y1 · c1 - y2 · s1,   u2 = y2 · c2 + y1 · s2,   out = u / sqrt(sum_D(u^2) + eps)
    v:     out = y

(``m`` the optional padding mask, applied to the chunk's inputs only: the state already holds masked
inputs.) This replaces the torch composition's ``cat(q, k, v)`` copy, the conv pass and the two RoPE +
norm passes by one read of q, k, v and one write of the three outputs. One program handles a block of
``BLOCK_T`` tokens of one sequence and ``BLOCK_H`` heads, for q, k and v in turn: each tap re-loads the
inputs ``K - 1 - j`` tokens back straight from the strided q/k/v (the windows of neighbouring tokens
overlap, so the re-reads hit L1/L2), ``cos``/``sin`` are loaded once and shared by q and k and by the
block's heads. Program ids run heads fastest, so the programs of one token block are adjacent and the
tables are read from DRAM about once. The taps and the conv state are copied channel-contiguous first
(small tensors) so that every load is a vector load along D; offsets are 64-bit per program, 32-bit
within its tile. All arithmetic is float32 with one rounding at the store (the
composition rounds after every stage in the inputs' dtype).

Inference only (no backward): :mod:`.ops` takes the torch composition when a gradient is needed. q, k,
v, the tables, the state and the mask may have any strides; the outputs are contiguous
``(B, T, H, D)``. With ``state_out`` the programs holding the last K tokens also store the new conv state
(the last K inputs, masked; with fewer than K tokens the first block shifts the old state's inputs in):
one launch instead of the cat, transpose copy and cache copy of forming it in torch (``naive.next_conv_state``,
the reference it is tested against). With ``logits`` the first head-block program of each token block also stores
its tokens' GDN gate logits ``x · Wᵀ`` (the ``R`` stacked rows ``[a_proj; b_proj; zeros]``, a ``tl.dot`` over the hidden
size in float32): the hybrid layer's prefill then launches no GEMM of its own for them. Runs on CUDA, and on CPU under
``TRITON_INTERPRET=1`` (how the tests exercise it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, launch, next_power_of_2, on_device

# BLOCK_T * BLOCK_H * BLOCK_HALF per program and tensor half. A program issues all its q/k/v tap loads up
# front (ptxas for sm_90, D=128, 4 warps: 16 tokens x 1 head = 126 registers and ~42 instructions per
# output element, 8 tokens = 68 registers and ~52); benchmarks/gpu_kernel_check.py times the alternatives.
MAX_HALF_TILE = 1024
MAX_BLOCK_T = 16
LOGIT_BLOCK_K = 64  # hidden columns per step of the gate logits' dot (``logits=``)


@dataclass(frozen=True)
class Tiling:
    """Tokens and heads per program, and warps per program."""

    block_t: int
    block_h: int
    num_warps: int = 4


@functools.lru_cache(maxsize=1024)
def default_tiling(length: int, n_heads: int, head_dim: int) -> Tiling:
    """Up to ``MAX_BLOCK_T`` tokens per program, then as many heads as fit ``MAX_HALF_TILE`` (D=128: 16
    tokens x 1 head in prefill, 1 token x 16 heads in decode)."""
    block_half = next_power_of_2(head_dim // 2)
    block_t = min(MAX_BLOCK_T, next_power_of_2(length))
    block_h = min(next_power_of_2(n_heads), max(1, MAX_HALF_TILE // (block_t * block_half)))
    return Tiling(block_t, block_h)


@triton.jit
def _conv_silu(
    x_base, state_base, taps_ptr, mask_base, first_token, rows, heads, dims, row_ok, lane_ok, first_channel,
    sx_t, sx_h, sx_d, ss_c, ss_k, sm_t, C,
    HALF: tl.constexpr, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """SiLU(causal conv) of one tensor's tile, as float32 halves ``(BLOCK_T, BLOCK_H, BLOCK_HALF)``.

    ``x_base``/``mask_base`` point at this sequence's first token of the block, ``state_base`` at its
    state; ``rows`` ``(BLOCK_T, 1, 1)`` token offsets in the block, ``heads`` ``(1, BLOCK_H, 1)``, ``dims``
    ``(1, 1, BLOCK_HALF)``; ``row_ok`` and ``lane_ok`` ``(1, BLOCK_H, BLOCK_HALF)`` mark the real ones."""
    channels = first_channel + heads * 2 * HALF + dims  # (1, BLOCK_H, BLOCK_HALF), first half
    x_lane = x_base + heads * sx_h + dims * sx_d
    acc1 = tl.zeros((rows.shape[0], heads.shape[1], dims.shape[2]), dtype=tl.float32)
    acc2 = tl.zeros((rows.shape[0], heads.shape[1], dims.shape[2]), dtype=tl.float32)
    for tap in tl.static_range(K):
        back = rows - (K - 1 - tap)  # (BLOCK_T, 1, 1): the input this tap multiplies, relative to first_token
        from_x = row_ok & (first_token + back >= 0)
        x1 = tl.load(x_lane + back * sx_t, mask=from_x & lane_ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_lane + back * sx_t + HALF * sx_d, mask=from_x & lane_ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_base + back * sm_t, mask=from_x, other=0.0).to(tl.float32)
            x1 *= keep
            x2 *= keep
        if HAS_STATE:
            if first_token < K - 1 - tap:  # only the first token block reaches back into the state
                from_state = row_ok & (first_token + back < 0) & lane_ok
                s_lane = state_base + channels * ss_c + (first_token + back + K) * ss_k
                x1 += tl.load(s_lane, mask=from_state, other=0.0).to(tl.float32)
                x2 += tl.load(s_lane + HALF * ss_c, mask=from_state, other=0.0).to(tl.float32)
        w1 = tl.load(taps_ptr + tap * C + channels, mask=lane_ok, other=0.0).to(tl.float32)
        w2 = tl.load(taps_ptr + tap * C + channels + HALF, mask=lane_ok, other=0.0).to(tl.float32)
        acc1 += w1 * x1
        acc2 += w2 * x2
    return acc1 * tl.sigmoid(acc1), acc2 * tl.sigmoid(acc2)


@triton.jit
def _store_rope_l2norm(out_lane, y1, y2, c1, c2, s1, s2, mask, HALF: tl.constexpr, eps):
    """Rotate the halves, divide by the row norm over D, store both halves at ``out_lane``."""
    u1 = y1 * c1 - y2 * s1
    u2 = y2 * c2 + y1 * s2
    rstd = 1.0 / tl.sqrt(tl.sum(u1 * u1 + u2 * u2, axis=2) + eps)[:, :, None]  # (BLOCK_T, BLOCK_H, 1)
    tl.store(out_lane, (u1 * rstd).to(out_lane.dtype.element_ty), mask=mask)
    tl.store(out_lane + HALF, (u2 * rstd).to(out_lane.dtype.element_ty), mask=mask)


@triton.jit
def _store_conv_inputs(
    x_base, state_base, out_base, mask_base, first_token, rows, heads, dims, row_ok, lane_ok, first_channel, T,
    sx_t, sx_h, sx_d, ss_c, ss_k, sm_t, so_c, so_k,
    HALF: tl.constexpr, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """This tile's part of the new conv state (the last K conv inputs, masked): the block's tokens among the last K
    go to slot ``t - (T - K)``; when T < K the first token block also moves the old state's last ``K - T`` inputs
    (zeros without a state) to slots ``0 .. K - T - 1``."""
    channels = first_channel + heads * 2 * HALF + dims  # (1, BLOCK_H, BLOCK_HALF), first half
    slot = first_token + rows - (T - K)  # (BLOCK_T, 1, 1)
    recent = row_ok & (slot >= 0)
    keep = recent & lane_ok
    x_lane = x_base + rows * sx_t + heads * sx_h + dims * sx_d
    x1 = tl.load(x_lane, mask=keep, other=0.0).to(tl.float32)  # (exact: the inputs' dtype back at the store)
    x2 = tl.load(x_lane + HALF * sx_d, mask=keep, other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(mask_base + rows * sm_t, mask=recent, other=0.0).to(tl.float32)
        x1 *= m
        x2 *= m
    out_lane = out_base + channels * so_c + slot * so_k
    tl.store(out_lane, x1.to(out_base.dtype.element_ty), mask=keep)
    tl.store(out_lane + HALF * so_c, x2.to(out_base.dtype.element_ty), mask=keep)
    if first_token == 0:
        for j in tl.static_range(K):
            if j < K - T:  # (T < K) slot j keeps the input from T tokens earlier: old state slot j + T
                s1 = tl.zeros((1, heads.shape[1], dims.shape[2]), dtype=tl.float32)
                s2 = tl.zeros((1, heads.shape[1], dims.shape[2]), dtype=tl.float32)
                if HAS_STATE:
                    s_lane = state_base + channels * ss_c + (j + T) * ss_k
                    s1 += tl.load(s_lane, mask=lane_ok, other=0.0).to(tl.float32)
                    s2 += tl.load(s_lane + HALF * ss_c, mask=lane_ok, other=0.0).to(tl.float32)
                o_lane = out_base + channels * so_c + j * so_k
                tl.store(o_lane, s1.to(out_base.dtype.element_ty), mask=lane_ok)
                tl.store(o_lane + HALF * so_c, s2.to(out_base.dtype.element_ty), mask=lane_ok)


@triton.jit
def _store_logits(x_base, w_ptr, out_base, first_token, T, HIDDEN, R, sx_t, so_t,
                  BLOCK_T: tl.constexpr, LOGIT_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """``out[t, r] = sum_k x[t, k] · w[r, k]`` for the block's tokens (rows ``LOGIT_T >= BLOCK_T``, 16 at least for
    ``tl.dot``; the extra ones masked), ``w`` contiguous ``(R, HIDDEN)``, ``x`` rows contiguous; float32 accumulation
    (float32 inputs exactly, not in TF32). UPCAST (the interpreter, which cannot multiply bf16 tiles): the operands
    in float32, the same products the tensor cores form."""
    rows = tl.arange(0, LOGIT_T)
    row_ok = (rows < BLOCK_T) & (first_token + rows < T)  # (LOGIT_T,)
    cols = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((LOGIT_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k_ok = k0 + ks < HIDDEN
        xt = tl.load(x_base + rows[:, None] * sx_t + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (LOGIT_T, BLOCK_K)
        wt = tl.load(w_ptr + cols[:, None] * HIDDEN + (k0 + ks)[None, :], mask=(cols < R)[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_K)
        if UPCAST:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
    tl.store(out_base + rows[:, None] * so_t + cols[None, :], acc.to(out_base.dtype.element_ty), mask=row_ok[:, None] & (cols < R)[None, :])


@triton.jit
def _short_conv_rope_l2norm_kernel(
    q_ptr, k_ptr, v_ptr, taps_ptr, state_ptr, mask_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr, state_out_ptr,
    x_ptr, lw_ptr, logits_ptr,
    T, H, eps, n_head_blocks, n_token_blocks, HIDDEN, R,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
    ss_b, ss_c, ss_k, sm_b, sm_t, sc_b, sc_t, sc_d, sn_b, sn_t, sn_d, so_b, so_c, so_k, sx_b, sx_t, sl_b, sl_t,
    HALF: tl.constexpr, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    LOGITS: tl.constexpr, LOGIT_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    head_block = pid % n_head_blocks
    token_block = (pid // n_head_blocks) % n_token_blocks
    b = (pid // (n_head_blocks * n_token_blocks)).to(tl.int64)
    first_token = token_block * BLOCK_T
    first = first_token.to(tl.int64)  # 64-bit base offsets per program, 32-bit offsets within the tile
    rows = tl.arange(0, BLOCK_T)[:, None, None]  # (BLOCK_T, 1, 1)
    heads = (head_block * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]  # (1, BLOCK_H, 1)
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]  # (1, 1, BLOCK_HALF)
    row_ok = first_token + rows < T
    lane_ok = (heads < H) & (dims < HALF)
    mask = row_ok & lane_ok  # (BLOCK_T, BLOCK_H, BLOCK_HALF)
    HD = H * 2 * HALF  # channels per tensor; the taps have 3 * HD

    table_ok = row_ok & (dims < HALF)  # (BLOCK_T, 1, BLOCK_HALF)
    c_lane = cos_ptr + b * sc_b + first * sc_t + rows * sc_t + dims * sc_d
    s_lane = sin_ptr + b * sn_b + first * sn_t + rows * sn_t + dims * sn_d
    c1 = tl.load(c_lane, mask=table_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_lane + HALF * sc_d, mask=table_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_lane, mask=table_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_lane + HALF * sn_d, mask=table_ok, other=0.0).to(tl.float32)

    state_base = state_ptr + b * ss_b
    mask_base = mask_ptr + b * sm_b + first * sm_t
    out_offset = (b * T + first) * HD  # outputs are contiguous (B, T, H, D)
    out_lane = rows * HD + heads * 2 * HALF + dims
    q_base = q_ptr + b * sq_b + first * sq_t  # this sequence's first token of the block, per input
    k_base = k_ptr + b * sk_b + first * sk_t
    v_base = v_ptr + b * sv_b + first * sv_t
    y1, y2 = _conv_silu(
        q_base, state_base, taps_ptr, mask_base, first_token, rows, heads, dims, row_ok,
        lane_ok, 0, sq_t, sq_h, sq_d, ss_c, ss_k, sm_t, 3 * HD, HALF, K, HAS_STATE, HAS_MASK,
    )
    _store_rope_l2norm(q_out_ptr + out_offset + out_lane, y1, y2, c1, c2, s1, s2, mask, HALF, eps)
    y1, y2 = _conv_silu(
        k_base, state_base, taps_ptr, mask_base, first_token, rows, heads, dims, row_ok,
        lane_ok, HD, sk_t, sk_h, sk_d, ss_c, ss_k, sm_t, 3 * HD, HALF, K, HAS_STATE, HAS_MASK,
    )
    _store_rope_l2norm(k_out_ptr + out_offset + out_lane, y1, y2, c1, c2, s1, s2, mask, HALF, eps)
    y1, y2 = _conv_silu(
        v_base, state_base, taps_ptr, mask_base, first_token, rows, heads, dims, row_ok,
        lane_ok, 2 * HD, sv_t, sv_h, sv_d, ss_c, ss_k, sm_t, 3 * HD, HALF, K, HAS_STATE, HAS_MASK,
    )
    v_lane = v_out_ptr + out_offset + out_lane
    tl.store(v_lane, y1.to(v_out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_lane + HALF, y2.to(v_out_ptr.dtype.element_ty), mask=mask)
    if LOGITS:
        if head_block == 0:  # one program per token block: its tokens' gate logits x · Wᵀ, W the R stacked rows
            _store_logits(x_ptr + b * sx_b + first * sx_t, lw_ptr, logits_ptr + b * sl_b + first * sl_t, first_token, T, HIDDEN, R,
                          sx_t, sl_t, BLOCK_T, LOGIT_T, BLOCK_R, BLOCK_K, UPCAST)
    if STORE_STATE:  # the new conv state, from the raw inputs of the block's tokens among the last K
        out_base = state_out_ptr + b * so_b
        _store_conv_inputs(q_base, state_base, out_base, mask_base, first_token, rows, heads, dims,
                           row_ok, lane_ok, 0, T, sq_t, sq_h, sq_d, ss_c, ss_k, sm_t, so_c, so_k, HALF, K, HAS_STATE, HAS_MASK)
        _store_conv_inputs(k_base, state_base, out_base, mask_base, first_token, rows, heads, dims,
                           row_ok, lane_ok, HD, T, sk_t, sk_h, sk_d, ss_c, ss_k, sm_t, so_c, so_k, HALF, K, HAS_STATE, HAS_MASK)
        _store_conv_inputs(v_base, state_base, out_base, mask_base, first_token, rows, heads, dims,
                           row_ok, lane_ok, 2 * HD, T, sv_t, sv_h, sv_d, ss_c, ss_k, sm_t, so_c, so_k, HALF, K, HAS_STATE, HAS_MASK)


def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(b, t, d) strides of a ``(B or 1, T, D)`` table, batch stride 0 when it broadcasts."""
    return (table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2))


def triton_short_conv_rope_l2norm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    conv_state: torch.Tensor | None = None, input_mask: torch.Tensor | None = None, eps: float = 1e-6,
    *, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, tiling: Tiling | None = None,
    state_out: torch.Tensor | None = None, logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv + SiLU of q/k/v and RoPE + L2 norm of q/k in one Triton pass (no input checks, no autograd).

    Args:
        q, k, v: ``(B, T, H, D)``, one dtype, D even, any strides.
        weight: ``(3·H·D, K)`` conv taps in ``cat(q, k, v)`` channel order, any strides.
        cos, sin: ``(B or 1, T, D)``, any strides.
        conv_state: ``(B, 3·H·D, K)`` the ``K`` conv inputs before this chunk, or None (zeros).
        input_mask: ``(B, T)`` multiplies the inputs before the conv, or None.
        eps: added to the sum of squares before the square root.
        out: contiguous ``(B, T, H, D)`` buffers to write q, k, v into (allocated when None).
        tiling: tokens/heads per program (``default_tiling`` when None).
        state_out: ``(B, 3·H·D, K)``, any strides: also write the new conv state there (the last K inputs after
            the chunk, masked, as ``naive.next_conv_state`` forms them); it may be ``conv_state`` itself (then the
            kernel reads a copy of the old state).
        logits: ``(x, w, logits_out)`` or None: also store ``x @ w.T`` into ``logits_out`` (the GDN gate logits, so
            the layer launches no GEMM for them): ``x`` ``(B, T, hidden)`` with contiguous rows, ``w`` contiguous
            ``(R, hidden)`` in x's dtype, ``logits_out`` ``(B, T, R)`` with contiguous rows; float32 accumulation.
    Returns:
        q, k ``(B, T, H, D)`` in the promoted dtype of q, cos, sin; v ``(B, T, H, D)`` in v's dtype; all
        contiguous.
    """
    batch, length, n_heads, head_dim = q.shape
    if out is None:
        qk_dtype = q.dtype if q.dtype == cos.dtype == sin.dtype else torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
        if qk_dtype == v.dtype:  # one allocation, three views
            out = torch.empty(3, batch, length, n_heads, head_dim, dtype=v.dtype, device=q.device).unbind(0)
        else:
            out = tuple(torch.empty(batch, length, n_heads, head_dim, dtype=dtype, device=q.device)
                        for dtype in (qk_dtype, qk_dtype, v.dtype))
    if not (batch and length and n_heads):
        if state_out is not None:  # no new inputs: the state stays what it was
            state_out.copy_(conv_state) if conv_state is not None else state_out.zero_()
        return out
    tiling = tiling or default_tiling(length, n_heads, head_dim)
    # taps (K, C) and the state (B, C, K) with the channels contiguous: each tap loads as vectors along C (no
    # copy when the weight is already laid out so: the hybrid layer passes it that way at inference).
    # The composition rounds the state and the mask to the inputs' dtype: so does the kernel.
    taps = weight.t().contiguous()
    state = taps  # a placeholder pointer when there is no state (and no mask)
    if conv_state is not None:
        state = conv_state.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        if state_out is not None and state.untyped_storage().data_ptr() == state_out.untyped_storage().data_ptr():
            state = state.clone()  # (already channel-contiguous, so not copied above) the old state read, the new written
    mask = input_mask.to(q.dtype) if input_mask is not None else taps
    x, logit_weight, logits_out = logits if logits is not None else (taps, taps, taps)  # placeholders without logits
    hidden, rows = (x.shape[-1], logit_weight.shape[0]) if logits is not None else (0, 0)
    n_head_blocks = cdiv(n_heads, tiling.block_h)
    n_token_blocks = cdiv(length, tiling.block_t)
    grid = (batch * n_token_blocks * n_head_blocks,)
    with on_device(q):
        launch(
            _short_conv_rope_l2norm_kernel, grid,
            q, k, v, taps, state, mask, cos, sin, *out, state_out if state_out is not None else taps, x, logit_weight, logits_out,
            length, n_heads, eps, n_head_blocks, n_token_blocks, hidden, rows,
            *q.stride(), *k.stride(), *v.stride(), *(state.stride() if conv_state is not None else (0, 0, 0)),
            *(mask.stride() if input_mask is not None else (0, 0)), *_table_strides(cos), *_table_strides(sin),
            *(state_out.stride() if state_out is not None else (0, 0, 0)),
            *((x.stride(0), x.stride(1), logits_out.stride(0), logits_out.stride(1)) if logits is not None else (0, 0, 0, 0)),
            HALF=head_dim // 2, K=weight.shape[1], HAS_STATE=conv_state is not None, HAS_MASK=input_mask is not None,
            STORE_STATE=state_out is not None,
            BLOCK_T=tiling.block_t, BLOCK_H=tiling.block_h, BLOCK_HALF=next_power_of_2(head_dim // 2),
            LOGITS=logits is not None, LOGIT_T=max(16, tiling.block_t), BLOCK_R=max(16, next_power_of_2(max(rows, 1))),
            BLOCK_K=LOGIT_BLOCK_K, UPCAST=not q.is_cuda, num_warps=tiling.num_warps,
        )
    return out
