"""Headscope's own chunked Gated DeltaNet forward: two Triton launches, the gates computed inside.

Why: at batch 1 and a few thousand tokens the GDN branch of a hybrid layer is bound by launches, not by
arithmetic (4K tokens x 14 heads is ~10 GFLOP, ~15 us of an H100). fla's ``chunk_gated_delta_rule``
runs five Triton kernels (gate cumsum, fused K Kᵀ + triangular solve, W/U, state recurrence, output)
behind autotuners and decorators, and the layer computes beta and the decay in ~11 eager ops before it.
Here the same chunked algorithm (:mod:`.chunk` is its torch twin), in chunks of 64 tokens, is two kernels:

1. ``_chunk_intra_kernel``, grid ``(chunks, B·H)``, fully parallel. A chunk is four 16-row blocks held in
   registers (the layout of fla's fused K Kᵀ + solve kernel): the gates ``g = -exp(A_log)·softplus(a +
   dt_bias)``, ``beta = sigmoid(b)`` from the raw logits (or g and beta as given), times the padding mask;
   ``c = cumsum(g)`` within the chunk; the ten lower blocks of ``L = strict_lower(diag(beta) K Kᵀ ⊙
   exp(c_i − c_j))`` and of ``P = scale · (Q Kᵀ ⊙ exp(c_i − c_j))_{i≥j}``, one dot of two row blocks each;
   ``A = (I + L)⁻¹``: the four diagonal blocks by forward substitution, the six below by block merges
   (``A_10 = −A_11 L_10 A_00``, ...); ``W = A diag(beta·exp(c)) K``, ``U = A diag(beta) V`` block row by block row.
2. ``_chunk_scan_kernel``, grid ``(V / BV, B·H)``: the chunks in order with the state ``S`` (``K x BV``,
   float32) in registers: ``Δ = U − W S``; ``O = scale·diag(exp(c)) Q S + P Δ``;
   ``S ← exp(c_last) S + (K ⊙ exp(c_last − c))ᵀ Δ``.

Measured (``benchmarks/gdn_prefill_speed.py``, H200, bf16, 14 heads of 128, GPU ms of each kernel from the
profiler, triton 3.6; 2026-12-04):

* Intra kernel: the register-block layout replaced one that built the whole 64 x 64 L in a float32 scratch tile
  and solved it block row by block row (store, barrier, re-load: register tensors cannot be sliced). 0.069
  against 0.127 ms at 4K, 0.140 against 0.227 at 8K, 0.139 against 0.227 at batch 8 x 1K; the same errors against
  the float32 reference. 2 warps per program (``INTRA_WARPS``): 1 / 2 / 4 / 8 warps take 0.086 / 0.069 / 0.106 /
  0.168 ms at 4K, although at 2 warps and K = V = 128 in bf16 ptxas spills 392-544 bytes per thread
  (``benchmarks/triton_compile_check.py``, sm_90, Triton 3.9).
* Recurrence: fla stores S per chunk and computes O in a third, parallel kernel. That split was built and
  measured here: the state pass plus the output kernel took 0.094 + 0.028 ms at 4K against 0.124 for the one
  scan (0.194 + 0.050 against 0.242 at 8K), so the two dots per step on the sequential path cost nothing
  measurable, and the split was dropped. fla's own state pass takes 0.077 ms at 4K.
* ``block_v`` by :func:`default_block_v`: 16 value columns per scan program while that grid fits in one wave of
  the GPU's SMs, else 32 (2026-12-03: at batch 1, 112 programs at 16, half the columns per program is 2-4% faster;
  at batch 8, 896 programs, 32 is 14% faster). With 2 warps instead of 4 the scan takes 0.196 ms at 4K
  (1 stage) and 0.284 (2 stages). With 4 warps, block_v 16 and ``num_stages=1`` the scan faulted (illegal
  address) on the H200 under triton 3.6, reproducibly; not investigated. The launcher never takes it: 2 stages
  for 2-byte inputs, float32 refused on CUDA (its 1-stage loop, at 4 warps and block_v 16, is that configuration).
* Chunks of 128 tokens were 1.4-1.8x slower at batch 1 (twice the work per step of the sequential scan).

Every exponent is ``≤ 0`` (c falls within a chunk), masked before ``exp``: no overflow, underflow to 0.
Precision is fla's: input-dtype operands on the tensor cores with float32 accumulation (S, Δ and A
rounded to the input dtype for their products; L and the inverse blocks float32, tf32 dots on GPU);
the gates, c and S are float32. Tokens past T in the last chunk are inert (k = q = v = 0, g = beta = 0).
Inference only. Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (how the tests exercise it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, last_dim_contiguous, launch, next_power_of_2, on_device, sm_count, workspace

CHUNK_SIZE = 64  # tokens per chunk: fla's, the measured best, fixed by the intra kernel's four 16-row blocks
INTRA_WARPS = 2  # warps per intra-chunk program (module docstring)
NARROW_BLOCK_V, WIDE_BLOCK_V = 16, 32  # the recurrence's value columns per program (default_block_v)


@triton.jit
def _operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to the dots' operand dtype; back in float32 under UPCAST (the interpreter cannot
    multiply bf16 tiles: the same rounded products, accumulated in float32 as the tensor cores do)."""
    x = x.to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _unit_lower_inverse(lower, BC: tl.constexpr):
    """``(I + lower)⁻¹`` of a strictly lower ``(BC, BC)`` float32 tile, by forward substitution on rows."""
    idx = tl.arange(0, BC)
    inv = -lower  # rows 0 and 1 are already final
    for i in range(2, BC):
        row = tl.sum(tl.where(idx[:, None] == i, -lower, 0.0), 0)  # -L[i, :], zero from column i on
        row = row + tl.sum(row[:, None] * inv, 0)  # rows < i of inv are final, row[j >= i] = 0
        inv = tl.where(idx[:, None] == i, row[None, :], inv)
    return inv + (idx[:, None] == idx[None, :]).to(tl.float32)


@triton.jit
def _block_gates(ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr, b, h, t, valid, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t,
                 RAW_GATES: tl.constexpr, HAS_MASK: tl.constexpr):
    """g (log-decay) and beta of the tokens ``t`` of one row block, float32, 0 past T and where masked."""
    za = tl.load(ga_ptr + b * sga_b + t * sga_t + h * sga_h, mask=valid, other=0.0).to(tl.float32)
    zb = tl.load(gb_ptr + b * sgb_b + t * sgb_t + h * sgb_h, mask=valid, other=0.0).to(tl.float32)
    if RAW_GATES:
        z = za + tl.load(dtb_ptr + h).to(tl.float32)
        e = tl.exp(-tl.abs(z))
        one_plus = 1.0 + e
        log1p = tl.where(one_plus == 1.0, e, tl.log(one_plus) * e / (one_plus - 1.0))  # log1p(e), accurately
        g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * (tl.maximum(z, 0.0) + log1p)  # softplus(z) = max(z, 0) + log1p(exp(-|z|))
        beta = tl.sigmoid(zb)
    else:
        g = za
        beta = zb
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * sm_b + t * sm_t, mask=valid, other=0).to(tl.float32)
        g = g * keep
        beta = beta * keep
    return tl.where(valid, g, 0.0), tl.where(valid, beta, 0.0)


@triton.jit
def _rows(ptr, b, t, h, s_b, s_t, s_h, cols, n_cols, valid):
    """The ``(BC, len(cols))`` tile of rows ``t`` of a ``(B, T, H, D)`` tensor, zeros past T and past ``n_cols``."""
    return tl.load(ptr + b * s_b + t[:, None] * s_t + h * s_h + cols[None, :], mask=valid[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _kkt_block(ki, kj, beta_i, ci, cj, DIAGONAL: tl.constexpr, BC: tl.constexpr):
    """``diag(beta_i) K_i K_jᵀ ⊙ exp(c_i − c_j)``, float32; strictly lower on a diagonal block."""
    a = tl.dot(ki, tl.trans(kj)) * beta_i[:, None]
    if DIAGONAL:
        o = tl.arange(0, BC)
        lower = o[:, None] > o[None, :]
        return tl.where(lower, a * tl.exp(tl.where(lower, ci[:, None] - cj[None, :], 0.0)), 0.0)
    return a * tl.exp(ci[:, None] - cj[None, :])


@triton.jit
def _qkt_block(qi, kj, ci, cj, scale, DIAGONAL: tl.constexpr, BC: tl.constexpr):
    """``scale · (Q_i K_jᵀ ⊙ exp(c_i − c_j))``, float32; lower with the diagonal on a diagonal block."""
    a = tl.dot(qi, tl.trans(kj)) * scale
    if DIAGONAL:
        o = tl.arange(0, BC)
        causal = o[:, None] >= o[None, :]
        return tl.where(causal, a * tl.exp(tl.where(causal, ci[:, None] - cj[None, :], 0.0)), 0.0)
    return a * tl.exp(ci[:, None] - cj[None, :])


@triton.jit(do_not_specialize=["T", "T_PAD"])  # one compile for every length
def _chunk_intra_kernel(
    q_ptr, k_ptr, v_ptr, ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr,
    c_ptr, w_ptr, u_ptr, p_ptr,
    T, T_PAD, H, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVA: tl.constexpr, BT: tl.constexpr,
    RAW_GATES: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
):
    """One chunk of ``BT`` = 64 tokens of one (row, head) as four 16-row blocks held in registers (module docstring, kernel 1)."""
    BC: tl.constexpr = 16
    tl.static_assert(BT == 4 * BC, "the intra kernel holds a chunk as four 16-row blocks")
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    o = tl.arange(0, BC)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BVA)
    t0 = (i_t * BT + o).to(tl.int64)
    t1, t2, t3 = t0 + BC, t0 + 2 * BC, t0 + 3 * BC
    m0, m1, m2, m3 = t0 < T, t1 < T, t2 < T, t3 < T
    g0, beta0 = _block_gates(ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr, b, h, t0, m0, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t, RAW_GATES, HAS_MASK)
    g1, beta1 = _block_gates(ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr, b, h, t1, m1, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t, RAW_GATES, HAS_MASK)
    g2, beta2 = _block_gates(ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr, b, h, t2, m2, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t, RAW_GATES, HAS_MASK)
    g3, beta3 = _block_gates(ga_ptr, gb_ptr, alog_ptr, dtb_ptr, mask_ptr, b, h, t3, m3, sga_b, sga_t, sga_h, sgb_b, sgb_t, sgb_h, sm_b, sm_t, RAW_GATES, HAS_MASK)
    s0 = tl.sum(g0, 0)  # c within the chunk, block by block: each block's cumsum after the blocks before it
    s1 = s0 + tl.sum(g1, 0)
    s2 = s1 + tl.sum(g2, 0)
    c0, c1, c2, c3 = tl.cumsum(g0, 0), tl.cumsum(g1, 0) + s0, tl.cumsum(g2, 0) + s1, tl.cumsum(g3, 0) + s2
    scratch = i_bh * T_PAD + i_t * BT  # first row of this chunk in the (B·H, T_PAD, ...) scratch tensors
    tl.store(c_ptr + scratch + o, c0)
    tl.store(c_ptr + scratch + BC + o, c1)
    tl.store(c_ptr + scratch + 2 * BC + o, c2)
    tl.store(c_ptr + scratch + 3 * BC + o, c3)

    dtype = w_ptr.dtype.element_ty
    k0 = _operand(_rows(k_ptr, b, t0, h, sk_b, sk_t, sk_h, dk, K, m0), dtype, UPCAST)  # (BC, BK)
    k1 = _operand(_rows(k_ptr, b, t1, h, sk_b, sk_t, sk_h, dk, K, m1), dtype, UPCAST)
    k2 = _operand(_rows(k_ptr, b, t2, h, sk_b, sk_t, sk_h, dk, K, m2), dtype, UPCAST)
    k3 = _operand(_rows(k_ptr, b, t3, h, sk_b, sk_t, sk_h, dk, K, m3), dtype, UPCAST)

    # P = scale · (Q Kᵀ ⊙ exp(c_i − c_j)), lower with the diagonal, block by block (zeros above)
    q0 = _operand(_rows(q_ptr, b, t0, h, sq_b, sq_t, sq_h, dk, K, m0), dtype, UPCAST)
    q1 = _operand(_rows(q_ptr, b, t1, h, sq_b, sq_t, sq_h, dk, K, m1), dtype, UPCAST)
    q2 = _operand(_rows(q_ptr, b, t2, h, sq_b, sq_t, sq_h, dk, K, m2), dtype, UPCAST)
    q3 = _operand(_rows(q_ptr, b, t3, h, sq_b, sq_t, sq_h, dk, K, m3), dtype, UPCAST)
    zero = tl.zeros((BC, BC), dtype=tl.float32)
    p_row = p_ptr + (scratch + o[:, None]) * BT + o[None, :]  # block (0, 0) of this chunk's (BT, BT) P
    tl.store(p_row, _qkt_block(q0, k0, c0, c0, scale, True, BC).to(dtype))
    tl.store(p_row + BC, zero.to(dtype))
    tl.store(p_row + 2 * BC, zero.to(dtype))
    tl.store(p_row + 3 * BC, zero.to(dtype))
    p_row += BC * BT
    tl.store(p_row, _qkt_block(q1, k0, c1, c0, scale, False, BC).to(dtype))
    tl.store(p_row + BC, _qkt_block(q1, k1, c1, c1, scale, True, BC).to(dtype))
    tl.store(p_row + 2 * BC, zero.to(dtype))
    tl.store(p_row + 3 * BC, zero.to(dtype))
    p_row += BC * BT
    tl.store(p_row, _qkt_block(q2, k0, c2, c0, scale, False, BC).to(dtype))
    tl.store(p_row + BC, _qkt_block(q2, k1, c2, c1, scale, False, BC).to(dtype))
    tl.store(p_row + 2 * BC, _qkt_block(q2, k2, c2, c2, scale, True, BC).to(dtype))
    tl.store(p_row + 3 * BC, zero.to(dtype))
    p_row += BC * BT
    tl.store(p_row, _qkt_block(q3, k0, c3, c0, scale, False, BC).to(dtype))
    tl.store(p_row + BC, _qkt_block(q3, k1, c3, c1, scale, False, BC).to(dtype))
    tl.store(p_row + 2 * BC, _qkt_block(q3, k2, c3, c2, scale, False, BC).to(dtype))
    tl.store(p_row + 3 * BC, _qkt_block(q3, k3, c3, c3, scale, True, BC).to(dtype))

    # L = strict_lower(diag(beta) K Kᵀ ⊙ exp(c_i − c_j)) in blocks; A = (I + L)⁻¹ by block forward substitution
    a10 = _kkt_block(k1, k0, beta1, c1, c0, False, BC)
    a20 = _kkt_block(k2, k0, beta2, c2, c0, False, BC)
    a21 = _kkt_block(k2, k1, beta2, c2, c1, False, BC)
    a30 = _kkt_block(k3, k0, beta3, c3, c0, False, BC)
    a31 = _kkt_block(k3, k1, beta3, c3, c1, False, BC)
    a32 = _kkt_block(k3, k2, beta3, c3, c2, False, BC)
    i00 = _unit_lower_inverse(_kkt_block(k0, k0, beta0, c0, c0, True, BC), BC)
    i11 = _unit_lower_inverse(_kkt_block(k1, k1, beta1, c1, c1, True, BC), BC)
    i22 = _unit_lower_inverse(_kkt_block(k2, k2, beta2, c2, c2, True, BC), BC)
    i33 = _unit_lower_inverse(_kkt_block(k3, k3, beta3, c3, c3, True, BC), BC)
    i10 = -tl.dot(tl.dot(i11, a10), i00)
    i21 = -tl.dot(tl.dot(i22, a21), i11)
    i32 = -tl.dot(tl.dot(i33, a32), i22)
    i20 = -tl.dot(i22, tl.dot(a20, i00) + tl.dot(a21, i10))
    i31 = -tl.dot(i33, tl.dot(a31, i11) + tl.dot(a32, i21))
    i30 = -tl.dot(i33, tl.dot(a30, i00) + tl.dot(a31, i10) + tl.dot(a32, i20))
    i00, i10, i11, i20, i21, i22 = _operand(i00, dtype, UPCAST), _operand(i10, dtype, UPCAST), _operand(i11, dtype, UPCAST), \
        _operand(i20, dtype, UPCAST), _operand(i21, dtype, UPCAST), _operand(i22, dtype, UPCAST)
    i30, i31, i32, i33 = _operand(i30, dtype, UPCAST), _operand(i31, dtype, UPCAST), _operand(i32, dtype, UPCAST), _operand(i33, dtype, UPCAST)

    # W = A diag(beta·exp(c)) K and U = A diag(beta) V, block row by block row
    kb0 = _operand(k0.to(tl.float32) * (beta0 * tl.exp(c0))[:, None], dtype, UPCAST)
    kb1 = _operand(k1.to(tl.float32) * (beta1 * tl.exp(c1))[:, None], dtype, UPCAST)
    kb2 = _operand(k2.to(tl.float32) * (beta2 * tl.exp(c2))[:, None], dtype, UPCAST)
    kb3 = _operand(k3.to(tl.float32) * (beta3 * tl.exp(c3))[:, None], dtype, UPCAST)
    w_rows = w_ptr + (scratch + o[:, None]) * K + dk[None, :]
    k_ok = dk[None, :] < K
    tl.store(w_rows, tl.dot(i00, kb0).to(dtype), mask=k_ok)
    tl.store(w_rows + BC * K, (tl.dot(i10, kb0) + tl.dot(i11, kb1)).to(dtype), mask=k_ok)
    tl.store(w_rows + 2 * BC * K, (tl.dot(i20, kb0) + tl.dot(i21, kb1) + tl.dot(i22, kb2)).to(dtype), mask=k_ok)
    tl.store(w_rows + 3 * BC * K, (tl.dot(i30, kb0) + tl.dot(i31, kb1) + tl.dot(i32, kb2) + tl.dot(i33, kb3)).to(dtype), mask=k_ok)
    vb0 = _operand(_rows(v_ptr, b, t0, h, sv_b, sv_t, sv_h, dv, V, m0).to(tl.float32) * beta0[:, None], dtype, UPCAST)
    vb1 = _operand(_rows(v_ptr, b, t1, h, sv_b, sv_t, sv_h, dv, V, m1).to(tl.float32) * beta1[:, None], dtype, UPCAST)
    vb2 = _operand(_rows(v_ptr, b, t2, h, sv_b, sv_t, sv_h, dv, V, m2).to(tl.float32) * beta2[:, None], dtype, UPCAST)
    vb3 = _operand(_rows(v_ptr, b, t3, h, sv_b, sv_t, sv_h, dv, V, m3).to(tl.float32) * beta3[:, None], dtype, UPCAST)
    u_rows = u_ptr + (scratch + o[:, None]) * V + dv[None, :]
    v_ok = dv[None, :] < V
    tl.store(u_rows, tl.dot(i00, vb0).to(dtype), mask=v_ok)
    tl.store(u_rows + BC * V, (tl.dot(i10, vb0) + tl.dot(i11, vb1)).to(dtype), mask=v_ok)
    tl.store(u_rows + 2 * BC * V, (tl.dot(i20, vb0) + tl.dot(i21, vb1) + tl.dot(i22, vb2)).to(dtype), mask=v_ok)
    tl.store(u_rows + 3 * BC * V, (tl.dot(i30, vb0) + tl.dot(i31, vb1) + tl.dot(i32, vb2) + tl.dot(i33, vb3)).to(dtype), mask=v_ok)


@triton.jit(do_not_specialize=["T", "T_PAD", "n_chunks"])
def _chunk_scan_kernel(
    q_ptr, k_ptr, c_ptr, w_ptr, u_ptr, p_ptr, h0_ptr, o_ptr, ht_ptr,
    T, T_PAD, H, n_chunks, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sh0_b, sh0_h, sh0_k, sh0_v, so_b, so_t, so_h,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    rows = tl.arange(0, BT)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    k_ok = dk < K
    v_ok = dv < V
    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + b * sh0_b + h * sh0_h + dk[:, None] * sh0_k + dv[None, :] * sh0_v, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    dtype = w_ptr.dtype.element_ty
    for n in range(n_chunks):
        t = (n * BT + rows).to(tl.int64)
        valid = t < T
        scratch = i_bh * T_PAD + n * BT
        w = tl.load(w_ptr + (scratch + rows[:, None]) * K + dk[None, :], mask=k_ok[None, :], other=0.0)
        u = tl.load(u_ptr + (scratch + rows[:, None]) * V + dv[None, :], mask=v_ok[None, :], other=0.0)
        p = tl.load(p_ptr + (scratch + rows[:, None]) * BT + rows[None, :])
        c = tl.load(c_ptr + scratch + rows)
        c_last = tl.load(c_ptr + scratch + BT - 1)  # g = 0 past T: the last real token's c
        qq = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + dk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        kk = tl.load(k_ptr + b * sk_b + t[:, None] * sk_t + h * sk_h + dk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w, p, qq, kk = _operand(w, dtype, UPCAST), _operand(p, dtype, UPCAST), _operand(qq, dtype, UPCAST), _operand(kk, dtype, UPCAST)
        s_in = _operand(state, dtype, UPCAST)
        delta = u.to(tl.float32) - tl.dot(w, s_in)  # (BT, BV)
        o = tl.dot(qq, s_in) * (tl.exp(c) * scale)[:, None] + tl.dot(p, _operand(delta, dtype, UPCAST))
        tl.store(o_ptr + b * so_b + t[:, None] * so_t + h * so_h + dv[None, :], o.to(o_ptr.dtype.element_ty), mask=valid[:, None] & v_ok[None, :])
        delta = delta * tl.exp(c_last - c)[:, None]
        state = state * tl.exp(c_last) + tl.dot(tl.trans(kk), _operand(delta, dtype, UPCAST))
    if STORE_HT:
        tl.store(ht_ptr + ((i_bh * K + dk[:, None]) * V + dv[None, :]), state, mask=k_ok[:, None] & v_ok[None, :])


def default_block_v(batch_heads: int, value_dim: int, n_sms: int) -> int:
    """``NARROW_BLOCK_V`` while the recurrence's grid at that width (``V / 16`` x ``B·H`` programs) fits in
    one wave of ``n_sms`` SMs, else ``WIDE_BLOCK_V`` (module docstring: measured at B·H = 14 and 112)."""
    return NARROW_BLOCK_V if cdiv(value_dim, NARROW_BLOCK_V) * batch_heads <= n_sms else WIDE_BLOCK_V


def triton_chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, write: torch.Tensor, *,
    scale: float, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    input_mask: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, out: torch.Tensor | None = None, final_state: torch.Tensor | None = None,
    block_v: int | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a sequence in two Triton launches, chunks of ``CHUNK_SIZE`` tokens (no input
    checks, no autograd).

    Args:
        q, k: ``(B, T, H, K)`` L2-normalised, v: ``(B, T, H, V)``; one dtype, bf16 or fp16 on CUDA (float32 too
            under the interpreter); any strides with the last one 1 (others are copied).
        decay, write: ``(B, T, H)``: the log-decay g (<= 0) and beta; or, when ``A_log`` is given, the raw
            logits ``a`` and ``b`` of ``g = -exp(A_log)·softplus(a + dt_bias)`` and ``beta = sigmoid(b)``.
        scale: query scale.
        A_log, dt_bias: ``(H,)`` the decay parameters (raw-logit mode), or None.
        input_mask: ``(B, T)`` 1 for real tokens; a 0 makes the token a no-op (g = beta = 0), or None.
        initial_state: ``(B, H, K, V)`` float32, any strides, or None (zeros).
        output_final_state: also return the state after the last token.
        out: ``(B, T, H, V)`` to write the output into (any strides, e.g. a slice of the layer's per-head
            output), allocated in q's dtype when None.
        final_state: contiguous float32 ``(B, H, K, V)`` to write the final state into (with
            ``output_final_state``), allocated when None; it may be ``initial_state`` itself (a cache's state
            updated in place: each program of the recurrence reads its tile of the state before it writes it).
        block_v: value columns per program of the recurrence (its grid is ``V / block_v`` x ``B·H``);
            :func:`default_block_v` for the device when None.
        num_warps: warps per program of the recurrence (the intra-chunk kernel runs ``INTRA_WARPS``).
    The recurrence's chunk loop is software-pipelined 2 deep for 2-byte inputs (the next chunk's W, U, P, Q, K
    tiles are fetched while this one computes; sm_90, K = V = 128, block_v 32: ~125 KB of shared memory), 1 deep
    for float32, which doubles every tile (the interpreter, and ``benchmarks/triton_compile_check.py``, which
    compiles the helper's cases). float32 is refused on CUDA: its 1-stage loop is the configuration that
    faulted on the H200 (module docstring).
    Returns:
        ``out`` and the final state ``(B, H, K, V)`` float32, or None unless ``output_final_state``.
    """
    if q.is_cuda and q.element_size() != 2:
        raise ValueError(f"triton_chunk_gated_delta_rule: bf16 or fp16 inputs on CUDA, got {q.dtype} (the dispatcher sends float32 to fla)")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, length, n_heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if out is None:
        out = torch.empty(batch, length, n_heads, value_dim, dtype=q.dtype, device=q.device)
    final = None
    if output_final_state:
        final = final_state if final_state is not None else torch.empty(batch, n_heads, key_dim, value_dim, dtype=torch.float32, device=q.device)
    if not (batch and length and n_heads):
        if final is not None:
            final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return out, final
    n_chunks = cdiv(length, CHUNK_SIZE)
    padded = n_chunks * CHUNK_SIZE
    rows = batch * n_heads * padded  # the scratch tensors, flat, in one allocation: c (float32), w, u, p
    c, w, u, p = workspace(q.device, (torch.float32, rows), (q.dtype, rows * key_dim), (q.dtype, rows * value_dim), (q.dtype, rows * CHUNK_SIZE))
    raw = A_log is not None
    mask = input_mask if input_mask is not None else decay  # placeholder pointers when unused
    block_k, block_va = max(16, next_power_of_2(key_dim)), max(16, next_power_of_2(value_dim))
    block_v = max(16, min(block_v or default_block_v(batch * n_heads, value_dim, sm_count(q.device)), block_va))
    with on_device(q):
        launch(
            _chunk_intra_kernel, (n_chunks, batch * n_heads),
            q, k, v, decay, write, A_log if raw else decay, dt_bias if raw else decay, mask,
            c, w, u, p,
            length, padded, n_heads, scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *decay.stride(), *write.stride(), *(mask.stride() if input_mask is not None else (0, 0)),
            K=key_dim, V=value_dim, BK=block_k, BVA=block_va, BT=CHUNK_SIZE,
            RAW_GATES=raw, HAS_MASK=input_mask is not None, UPCAST=not q.is_cuda, num_warps=INTRA_WARPS,
        )
        launch(
            _chunk_scan_kernel, (cdiv(value_dim, block_v), batch * n_heads),
            q, k, c, w, u, p, initial_state if initial_state is not None else c, out, final if final is not None else c,
            length, padded, n_heads, n_chunks, scale,
            *q.stride()[:3], *k.stride()[:3],
            *(initial_state.stride() if initial_state is not None else (0, 0, 0, 0)), *out.stride()[:3],
            K=key_dim, V=value_dim, BK=block_k, BV=block_v, BT=CHUNK_SIZE,
            HAS_H0=initial_state is not None, STORE_HT=final is not None, UPCAST=not q.is_cuda, num_warps=num_warps,
            num_stages=2 if q.element_size() == 2 else 1,
        )
    return out, final
