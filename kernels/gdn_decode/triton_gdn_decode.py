"""Triton kernel of one fused Gated DeltaNet decode step (math in :mod:`.naive`), states updated in place.

One program per (row b, GDN head h), grid ``(B · H,)``; it owns head h's ``3·D`` conv channels and its
``D x D`` state, so it can update both in place without racing another program:

1. conv: for q and k (as halves of D/2, the RoPE pairs) and, inside the value loop, for each block of v:
   load the last ``K - 1`` inputs from the window, append the new input (times the padding mask), dot
   with the taps, SiLU; after a barrier (every thread has read the old window) store the shifted window;
2. RoPE + L2 norm of q and k in float32 (as ``kernels/gdn_prep``);
3. ``beta = sigmoid(x · W_b[h])``, ``g = -exp(A_log[h]) · softplus(x · W_a[h] + dt_bias[h])`` as dot
   products over the hidden size (the two tiny projections need no GEMM launches);
4. the delta rule, one ``D x BLOCK_V`` slice of the state at a time (rows split in the same halves as
   q and k): decay, ``delta = beta (v - Sᵀk)``, rank-one write, ``o = scale · Sᵀq``; store S and o;
5. with ``gamma`` (the hybrid layer's fused epilogue, :mod:`headscope.kernels.epilogue`, for these heads):
   the sum of squares of the stored (rounded) o over the value blocks, then, after a barrier, each block read
   back and stored as ``gamma_h · o / sqrt(mean(o²) + eps)``: the epilogue's math on the values it would read,
   without its launch.

In a layer that also has FA heads these programs run inside ``kernels/hybrid_decode``'s launches
(:func:`gdn_program` is the body, :func:`gdn_launch` builds the arguments). There, with few heads (batch 1),
``gdn_program(SPLIT_V)`` runs one program per value block of each head (steps 1-3 again in each, step 4 for its
block alone, the q/k windows not stored) and :func:`gdn_finish_program`, in the next launch, stores the q/k
windows and does step 5.

This replaces, per layer and decode step, the gdn_prep kernel, the conv-state slicing (~4 kernels),
``b_proj``/``a_proj`` and the ~10 elementwise kernels of beta and g, fla's recurrent kernel, the two
state copies into the cache and (with ``gamma``) the epilogue: one launch. All arithmetic is float32 (one rounding: o at the store; the
new conv inputs are stored in the window's dtype). ``softplus`` is ``log(1 + exp(z))`` below 20 and ``z``
above, as torch's. Inference only. Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _conv_tile(
    x_lane, cs_base, w_ptr, channels, lane_ok, keep, scs_c, scs_k, sw_c, sw_k,
    K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """SiLU(conv) of one tile of channels ``(BLOCK,)`` for the new token, and its new window ``(BLOCK, BLOCK_K)``."""
    taps = tl.arange(0, BLOCK_K)[None, :]  # (1, BLOCK_K)
    new = tl.load(x_lane, mask=lane_ok, other=0.0).to(tl.float32) * keep  # (BLOCK,)
    old = tl.load(cs_base + channels[:, None] * scs_c + (taps + 1) * scs_k, mask=lane_ok[:, None] & (taps + 1 < K), other=0.0)
    window = tl.where(taps == K - 1, new[:, None], old.to(tl.float32))  # inputs t-K+1 .. t
    w = tl.load(w_ptr + channels[:, None] * sw_c + taps * sw_k, mask=lane_ok[:, None] & (taps < K), other=0.0).to(tl.float32)
    y = tl.sum(window * w, axis=1)
    return y * tl.sigmoid(y), window


@triton.jit
def _store_window(cs_base, channels, lane_ok, window, scs_c, scs_k, K: tl.constexpr, BLOCK_K: tl.constexpr):
    taps = tl.arange(0, BLOCK_K)[None, :]
    tl.store(cs_base + channels[:, None] * scs_c + taps * scs_k, window.to(cs_base.dtype.element_ty), mask=lane_ok[:, None] & (taps < K))


@triton.jit
def _qk_windows(q_lane, k_lane, cs_base, w_ptr, h, HD, keep, half, half_ok, sq_d, sk_d, scs_c, scs_k, sw_c, sw_k,
                HALF: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, STORE: tl.constexpr):
    """SiLU(conv) of head h's q and k channels (halves: the RoPE pairs); with ``STORE`` their shifted windows stored
    after a barrier (every thread has read the old ones)."""
    D = 2 * HALF
    yq1, wq1 = _conv_tile(q_lane + half * sq_d, cs_base, w_ptr, h * D + half, half_ok, keep, scs_c, scs_k, sw_c, sw_k, K, BLOCK_K)
    yq2, wq2 = _conv_tile(q_lane + (half + HALF) * sq_d, cs_base, w_ptr, h * D + HALF + half, half_ok, keep, scs_c, scs_k, sw_c, sw_k, K, BLOCK_K)
    yk1, wk1 = _conv_tile(k_lane + half * sk_d, cs_base, w_ptr, HD + h * D + half, half_ok, keep, scs_c, scs_k, sw_c, sw_k, K, BLOCK_K)
    yk2, wk2 = _conv_tile(k_lane + (half + HALF) * sk_d, cs_base, w_ptr, HD + h * D + HALF + half, half_ok, keep, scs_c, scs_k, sw_c, sw_k, K, BLOCK_K)
    if STORE:
        tl.debug_barrier()
        _store_window(cs_base, h * D + half, half_ok, wq1, scs_c, scs_k, K, BLOCK_K)
        _store_window(cs_base, h * D + HALF + half, half_ok, wq2, scs_c, scs_k, K, BLOCK_K)
        _store_window(cs_base, HD + h * D + half, half_ok, wk1, scs_c, scs_k, K, BLOCK_K)
        _store_window(cs_base, HD + h * D + HALF + half, half_ok, wk2, scs_c, scs_k, K, BLOCK_K)
    return yq1, yq2, yk1, yk2


@triton.jit
def _value_block(
    vb, h, v_lane, st_base, o_lane, cs_base, w_ptr, HD, keep, beta, decay, q1, q2, k1, k2, half, half_ok,
    sv_d, scs_c, scs_k, sw_c, sw_k, sst_k, sst_v, so_d,
    HALF: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Value block ``vb`` of head h: the conv of its value channels (window stored), the delta rule on its ``D x BLOCK_V``
    state columns (stored), o of those columns stored in o's dtype; returns the sum of squares of the stored o."""
    D = 2 * HALF
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < D
    v, wv = _conv_tile(v_lane + cols * sv_d, cs_base, w_ptr, 2 * HD + h * D + cols, col_ok, keep, scs_c, scs_k, sw_c, sw_k, K, BLOCK_K)
    tl.debug_barrier()
    _store_window(cs_base, 2 * HD + h * D + cols, col_ok, wv, scs_c, scs_k, K, BLOCK_K)
    tile_ok = half_ok[:, None] & col_ok[None, :]
    rows1 = half[:, None] * sst_k
    rows2 = (half + HALF)[:, None] * sst_k
    S1 = tl.load(st_base + rows1 + cols[None, :] * sst_v, mask=tile_ok, other=0.0) * decay  # (BLOCK_HALF, BLOCK_V)
    S2 = tl.load(st_base + rows2 + cols[None, :] * sst_v, mask=tile_ok, other=0.0) * decay
    delta = beta * (v - tl.sum(S1 * k1[:, None], axis=0) - tl.sum(S2 * k2[:, None], axis=0))  # (BLOCK_V,)
    S1 += k1[:, None] * delta[None, :]
    S2 += k2[:, None] * delta[None, :]
    o = tl.sum(S1 * q1[:, None], axis=0) + tl.sum(S2 * q2[:, None], axis=0)
    tl.store(st_base + rows1 + cols[None, :] * sst_v, S1, mask=tile_ok)
    tl.store(st_base + rows2 + cols[None, :] * sst_v, S2, mask=tile_ok)
    o = o.to(o_lane.dtype.element_ty)
    tl.store(o_lane + cols * so_d, o, mask=col_ok)
    return tl.sum(tl.where(col_ok, o.to(tl.float32) * o.to(tl.float32), 0.0), axis=0)


@triton.jit
def _head_epilogue(o_lane, gamma_ptr, h, squares, norm_eps, so_d, HALF: tl.constexpr, V_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Step 5 given the sum of squares of head h's stored o: after a barrier (every thread has read what it summed),
    each block read back and stored as ``gamma_h · o / sqrt(squares / D + eps)``."""
    tl.debug_barrier()
    factor = tl.load(gamma_ptr + h).to(tl.float32) / tl.sqrt(squares / (2 * HALF) + norm_eps)
    for vb in tl.static_range(V_BLOCKS):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < 2 * HALF
        o = tl.load(o_lane + cols * so_d, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(o_lane + cols * so_d, (o * factor).to(o_lane.dtype.element_ty), mask=col_ok)


@triton.jit
def gdn_program(
    pid,
    x_ptr, q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, cos_ptr, sin_ptr, bw_ptr, aw_ptr, alog_ptr, dtb_ptr, st_ptr, mask_ptr, o_ptr,
    gamma_ptr, H, hidden, scale, eps, norm_eps,
    sx_b, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sw_c, sw_k, scs_b, scs_c, scs_k,
    sc_b, sc_d, ss_b, ss_d, sbw_h, sbw_c, saw_h, saw_c, sst_b, sst_h, sst_k, sst_v, so_b, so_h, so_d,
    HALF: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr, V_BLOCKS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_X: tl.constexpr, NORM: tl.constexpr,
    SPLIT_V: tl.constexpr,
):
    """The body of ``_gdn_decode_kernel`` and of ``kernels/hybrid_decode``'s first kernel.

    ``SPLIT_V`` off: program ``pid`` = b · H + h, the whole step of head h (module docstring). ``SPLIT_V`` on:
    program ``pid`` = (b · H + h) · V_BLOCKS + vb, value block vb of head h alone: the q/k conv from the old window
    (not stored: every block of the head reads it), RoPE + L2 norm, beta and decay, then only block vb's value
    channels and state columns; o left unscaled. :func:`gdn_finish_program` then stores the q/k windows and applies
    the epilogue, in a later launch (so that no program of this one reads a window another has written).
    """
    if SPLIT_V:
        vb_only = pid % V_BLOCKS
        pid = pid // V_BLOCKS
    b = (pid // H).to(tl.int64)
    h = pid % H
    D = 2 * HALF
    HD = H * D
    half = tl.arange(0, BLOCK_HALF)
    half_ok = half < HALF
    keep = 1.0
    if HAS_MASK:
        keep = tl.load(mask_ptr + b).to(tl.float32)
    cs_base = cs_ptr + b * scs_b

    # 1-2. conv + SiLU, RoPE + L2 norm of q and k (halves: the RoPE pairs)
    c1 = tl.load(cos_ptr + b * sc_b + half * sc_d, mask=half_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * sc_b + (half + HALF) * sc_d, mask=half_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * ss_b + half * ss_d, mask=half_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * ss_b + (half + HALF) * ss_d, mask=half_ok, other=0.0).to(tl.float32)
    yq1, yq2, yk1, yk2 = _qk_windows(q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + h * sk_h, cs_base, w_ptr, h, HD, keep,
                                     half, half_ok, sq_d, sk_d, scs_c, scs_k, sw_c, sw_k, HALF, K, BLOCK_K, not SPLIT_V)
    u1 = yq1 * c1 - yq2 * s1
    u2 = yq2 * c2 + yq1 * s2
    r = 1.0 / tl.sqrt(tl.sum(u1 * u1 + u2 * u2, axis=0) + eps)
    q1 = u1 * r * scale
    q2 = u2 * r * scale
    u1 = yk1 * c1 - yk2 * s1
    u2 = yk2 * c2 + yk1 * s2
    r = 1.0 / tl.sqrt(tl.sum(u1 * u1 + u2 * u2, axis=0) + eps)
    k1 = u1 * r
    k2 = u2 * r

    # 3. beta and the log-decay g from the layer input
    acc_b = tl.zeros((BLOCK_X,), tl.float32)
    acc_a = tl.zeros((BLOCK_X,), tl.float32)
    for first in range(0, hidden, BLOCK_X):
        cols = first + tl.arange(0, BLOCK_X)
        ok = cols < hidden
        xs = tl.load(x_ptr + b * sx_b + cols * sx_c, mask=ok, other=0.0).to(tl.float32)
        acc_b += xs * tl.load(bw_ptr + h * sbw_h + cols * sbw_c, mask=ok, other=0.0).to(tl.float32)
        acc_a += xs * tl.load(aw_ptr + h * saw_h + cols * saw_c, mask=ok, other=0.0).to(tl.float32)
    beta = tl.sigmoid(tl.sum(acc_b, axis=0)) * keep
    z = tl.sum(acc_a, axis=0) + tl.load(dtb_ptr + h).to(tl.float32)
    softplus = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))
    decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus * keep)

    # 4. conv of v and the delta rule, one block of value columns at a time (or block vb_only alone)
    v_lane = v_ptr + b * sv_b + h * sv_h
    st_base = st_ptr + b * sst_b + h * sst_h
    o_lane = o_ptr + b * so_b + h * so_h
    if SPLIT_V:
        _value_block(vb_only, h, v_lane, st_base, o_lane, cs_base, w_ptr, HD, keep, beta, decay, q1, q2, k1, k2, half, half_ok,
                     sv_d, scs_c, scs_k, sw_c, sw_k, sst_k, sst_v, so_d, HALF, K, BLOCK_K, BLOCK_V)
    else:
        squares = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)  # of the stored o (step 5)
        for vb in tl.static_range(V_BLOCKS):
            squares += _value_block(vb, h, v_lane, st_base, o_lane, cs_base, w_ptr, HD, keep, beta, decay, q1, q2, k1, k2, half,
                                    half_ok, sv_d, scs_c, scs_k, sw_c, sw_k, sst_k, sst_v, so_d, HALF, K, BLOCK_K, BLOCK_V)
        # 5. the epilogue of these heads: gamma_h · o / rms(o), over the o just stored (visible after the barrier)
        if NORM:
            _head_epilogue(o_lane, gamma_ptr, h, squares, norm_eps, so_d, HALF, V_BLOCKS, BLOCK_V)


@triton.jit
def gdn_finish_program(
    pid,
    x_ptr, q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, cos_ptr, sin_ptr, bw_ptr, aw_ptr, alog_ptr, dtb_ptr, st_ptr, mask_ptr, o_ptr,
    gamma_ptr, H, hidden, scale, eps, norm_eps,
    sx_b, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sw_c, sw_k, scs_b, scs_c, scs_k,
    sc_b, sc_d, ss_b, ss_d, sbw_h, sbw_c, saw_h, saw_c, sst_b, sst_h, sst_k, sst_v, so_b, so_h, so_d,
    HALF: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr, V_BLOCKS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_X: tl.constexpr, NORM: tl.constexpr,
):
    """After :func:`gdn_program` with ``SPLIT_V`` (a later launch): program ``pid`` = b · H + h stores head h's shifted
    q/k conv windows (the old ones, untouched by the value blocks, and the new input) and, with ``NORM``, applies the
    epilogue to its o: the sum of squares block by block in the whole-head program's order (bit for bit that
    program's under the interpreter; compiled, the sum inside a block may reduce in another thread layout, ~1 ulp)."""
    b = (pid // H).to(tl.int64)
    h = pid % H
    D = 2 * HALF
    half = tl.arange(0, BLOCK_HALF)
    keep = 1.0
    if HAS_MASK:
        keep = tl.load(mask_ptr + b).to(tl.float32)
    _qk_windows(q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + h * sk_h, cs_ptr + b * scs_b, w_ptr, h, H * D, keep,
                half, half < HALF, sq_d, sk_d, scs_c, scs_k, sw_c, sw_k, HALF, K, BLOCK_K, True)
    if NORM:
        o_lane = o_ptr + b * so_b + h * so_h
        squares = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        for vb in tl.static_range(V_BLOCKS):
            cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
            o = tl.load(o_lane + cols * so_d, mask=cols < D, other=0.0).to(tl.float32)
            squares += tl.sum(tl.where(cols < D, o * o, 0.0), axis=0)
        _head_epilogue(o_lane, gamma_ptr, h, squares, norm_eps, so_d, HALF, V_BLOCKS, BLOCK_V)


@triton.jit
def _gdn_decode_kernel(
    x_ptr, q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, cos_ptr, sin_ptr, bw_ptr, aw_ptr, alog_ptr, dtb_ptr, st_ptr, mask_ptr, o_ptr,
    gamma_ptr, H, hidden, scale, eps, norm_eps,
    sx_b, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sw_c, sw_k, scs_b, scs_c, scs_k,
    sc_b, sc_d, ss_b, ss_d, sbw_h, sbw_c, saw_h, saw_c, sst_b, sst_h, sst_k, sst_v, so_b, so_h, so_d,
    HALF: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr, V_BLOCKS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_X: tl.constexpr, NORM: tl.constexpr,
):
    gdn_program(
        tl.program_id(0),
        x_ptr, q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, cos_ptr, sin_ptr, bw_ptr, aw_ptr, alog_ptr, dtb_ptr, st_ptr, mask_ptr, o_ptr,
        gamma_ptr, H, hidden, scale, eps, norm_eps,
        sx_b, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sw_c, sw_k, scs_b, scs_c, scs_k,
        sc_b, sc_d, ss_b, ss_d, sbw_h, sbw_c, saw_h, saw_c, sst_b, sst_h, sst_k, sst_v, so_b, so_h, so_d,
        HALF, K, HAS_MASK, V_BLOCKS, BLOCK_HALF, BLOCK_K, BLOCK_V, BLOCK_X, NORM, False,
    )


def _strides_2d(t: torch.Tensor) -> tuple[int, int]:
    """(batch, last) strides of a ``(B or 1, 1, D)`` table, batch stride 0 when it broadcasts."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(-1))


def triton_gdn_decode(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b_weight: torch.Tensor, a_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, step_mask: torch.Tensor | None = None,
    *, scale: float, eps: float = 1e-6, out: torch.Tensor | None = None, block_v: int = 32,
    gamma: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`.naive.gdn_decode_reference` in one Triton launch (no input checks, no autograd).

    Args:
        as the reference (D even; ``x`` ``(B, hidden)`` any strides); ``out``: ``(B, 1, H, D)`` to write
        into (any strides, e.g. a slice of the layer's per-head output), allocated when None;
        ``block_v``: value columns per step of the state loop; ``gamma``: ``(H,)`` these heads' scales of the
        fused epilogue (``head_epilogue_reference`` of the output with ``norm_eps``, in the kernel), or None.
    Returns:
        ``out``.
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    programs, args, constexprs = gdn_launch(x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, A_log, dt_bias, state,
                                            step_mask, scale=scale, eps=eps, out=out, block_v=block_v, gamma=gamma, norm_eps=norm_eps)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _gdn_decode_kernel[(programs,)](*args, **constexprs, num_warps=NUM_WARPS)
    return out


def gdn_launch(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b_weight: torch.Tensor, a_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, step_mask: torch.Tensor | None, *, scale: float,
    eps: float, out: torch.Tensor, block_v: int = 32, gamma: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[int, tuple, dict]:
    """The kernel's launch, not made: ``(programs, args, constexprs)``: ``B · H`` programs and the positional and
    constexpr arguments of ``_gdn_decode_kernel`` (those of :func:`gdn_program` after ``pid``). Arguments as
    :func:`triton_gdn_decode`'s, ``out`` given."""
    batch, _, n_heads, dim = q.shape
    mask = step_mask if step_mask is not None else state  # a placeholder pointer when there is no mask
    width = conv_weight.shape[1]
    block_v = min(block_v, triton.next_power_of_2(dim))
    args = (
        x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, A_log, dt_bias, state, mask, out,
        gamma if gamma is not None else A_log, n_heads, x.shape[-1], scale, eps, norm_eps,
        x.stride(0), x.stride(-1), q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3), *conv_weight.stride(), *conv_state.stride(),
        *_strides_2d(cos), *_strides_2d(sin), *b_weight.stride(), *a_weight.stride(), *state.stride(),
        out.stride(0), out.stride(2), out.stride(3),
    )
    constexprs = dict(
        HALF=dim // 2, K=width, HAS_MASK=step_mask is not None, V_BLOCKS=triton.cdiv(dim, block_v),
        BLOCK_HALF=triton.next_power_of_2(dim // 2), BLOCK_K=triton.next_power_of_2(width),
        BLOCK_V=block_v, BLOCK_X=min(1024, triton.next_power_of_2(x.shape[-1])), NORM=gamma is not None,
    )
    return batch * n_heads, args, constexprs
