"""Triton split-K decode attention of the FA heads against a static KV cache (see :mod:`.naive` for the math).

Two kernels per step, both with fixed grids (the cache length ``L`` is static, the number of tokens seen
``n`` is read from device memory), so the step can be captured in a CUDA graph:

* ``_split_kernel``, grid ``(B · Hkv, S)``: program ``(b, j, s)`` takes the slots of split ``s``
  (``[s·chunk, (s+1)·chunk) ∩ [lo, n)``, ``lo`` the sliding window's first slot) and every query head of
  KV head ``j`` at once (a ``BLOCK_G x D`` tile, so the keys are read once per KV head, not once per query
  head), runs an online softmax over blocks of ``BLOCK_N`` slots (masked by ``valid``) and writes its
  partial maximum, sum and weighted values ``(B, Hq, S[, D])`` in float32. With ``rope`` each program
  rotates its queries (and split 0 the new key) in float32 from ``cos``/``sin``: the layer's RoPE needs no
  kernels of its own (ten small elementwise ones per layer and step in torch). Split 0 also folds in the new
  token from registers (its key and value are never re-read) and writes it into slot ``n``: no other
  program reads slot ``n``, so the cache write needs no separate kernel. The log scaling of the queries
  is computed in the kernel from the positions. Splits past ``n`` stop at once, so a step reads the
  ``n`` cached tokens, not the whole buffer.
* ``_combine_kernel``, grid ``(B · Hq,)``: merges the ``S`` partials of one query head and writes the
  output (any strides: the layer passes a slice of its fused per-head output). With ``gamma`` it applies the
  hybrid layer's fused epilogue (:mod:`headscope.kernels.epilogue`) to the head before the store: the output
  rounded to its dtype (what the epilogue would read), ``gamma_h · o / sqrt(mean(o²) + eps)``, times
  ``sigmoid(gate)`` with a gate: the epilogue's launch is gone.

In a layer that also has GDN heads the split programs run inside ``kernels/hybrid_decode``'s first launch and the
combine programs inside its second (:func:`split_program` and :func:`combine_program` are the bodies;
:func:`split_launch` and :func:`combine_launch` build the arguments).

The number of splits fills the GPU: about two programs per streaming multiprocessor over ``B · Hkv``
(batch 1 with one KV head at 128K slots: ~260 splits of ~500 slots). All arithmetic is float32. Runs on
CUDA, and on CPU under ``TRITON_INTERPRET=1`` (how the tests exercise it).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import sm_count

BLOCK_N = 64  # slots per inner step


@triton.jit
def split_program(
    row, split,
    q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, seen_ptr, pos_ptr, qoff_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
    Hkv, Hq, S, chunk, window, scale, attn_scale, floor_scale, spos_b,
    sq_b, sq_h, sq_d, skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
    skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d, sva_b, sva_l, scs_b, scs_d,
    D: tl.constexpr, LOG_SCALING: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split ``split`` of ``row`` = b · Hkv + j: the body of ``_split_kernel`` (and of ``kernels/hybrid_decode``'s
    kernel, which runs these programs beside the GDN heads' in one launch)."""
    b = (row // Hkv).to(tl.int64)
    j = row % Hkv
    n = tl.load(seen_ptr)  # tokens already cached; the new token takes slot n
    q0 = tl.load(qoff_ptr + j)
    n_heads = tl.load(qoff_ptr + j + 1) - q0
    rows = tl.arange(0, BLOCK_G)  # (BLOCK_G,) query heads of this KV head
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_heads
    dim_ok = dims < D
    qk_mask = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(q_ptr + b * sq_b + (q0 + rows)[:, None] * sq_h + dims[None, :] * sq_d, mask=qk_mask, other=0.0)
    if ROPE:  # HF rotary in float32: x·cos + rotate_half(x)·sin, rotate_half([x1, x2]) = [-x2, x1]
        partner = (dims + D // 2) % D  # (BLOCK_D,) the element rotate_half brings to each position
        sign = tl.where(dims < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * scs_b + dims * scs_d, mask=dim_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * scs_b + dims * scs_d, mask=dim_ok, other=0.0).to(tl.float32) * sign
        q_partner = tl.load(q_ptr + b * sq_b + (q0 + rows)[:, None] * sq_h + partner[None, :] * sq_d, mask=qk_mask, other=0.0)
        q = q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]
    if LOG_SCALING:  # floor() of a positive number as a truncation
        pos = tl.load(pos_ptr + b * spos_b).to(tl.float32)
        q = q.to(tl.float32) * (1.0 + attn_scale * tl.log(((pos + 1.0) / floor_scale).to(tl.int64).to(tl.float32) + 1.0))
    # the dots run in the cache's dtype with float32 accumulation (bf16 tensor cores; exact float32 for a float32 cache)
    # (UPCAST: the same products in float32; the interpreter cannot multiply bf16 matrices)
    q = q.to(kc_ptr.dtype.element_ty)  # (BLOCK_G, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    lo = 0
    if WINDOW:
        lo = tl.maximum(n - window + 1, 0)
    start = tl.maximum(split * chunk, lo)
    end = tl.minimum((split + 1) * chunk, n)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    kc_base = kc_ptr + b * skc_b + j * skc_h
    vc_base = vc_ptr + b * svc_b + j * svc_h
    for first in range(start, end, BLOCK_N):
        slots = first + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        real = slots < end
        real = real & (tl.load(valid_ptr + b * sva_b + slots * sva_l, mask=real, other=0) != 0)
        kv_mask = real[:, None] & dim_ok[None, :]
        k = tl.load(kc_base + slots[:, None].to(tl.int64) * skc_l + dims[None, :] * skc_d, mask=kv_mask, other=0.0)
        v = tl.load(vc_base + slots[:, None].to(tl.int64) * svc_l + dims[None, :] * svc_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_N)
        scores = tl.where(real[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(vc_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    if split == 0:  # the new token: from registers, and into slot n of the caches
        k_new = tl.load(kn_ptr + b * skn_b + j * skn_h + dims * skn_d, mask=dim_ok, other=0.0)
        if ROPE:
            k_partner = tl.load(kn_ptr + b * skn_b + j * skn_h + partner * skn_d, mask=dim_ok, other=0.0)
            k_new = k_new.to(tl.float32) * cos + k_partner.to(tl.float32) * sin
        v_new = tl.load(vn_ptr + b * svn_b + j * svn_h + dims * svn_d, mask=dim_ok, other=0.0)
        tl.store(kc_base + n.to(tl.int64) * skc_l + dims * skc_d, k_new.to(kc_ptr.dtype.element_ty), mask=dim_ok)
        tl.store(vc_base + n.to(tl.int64) * svc_l + dims * svc_d, v_new.to(vc_ptr.dtype.element_ty), mask=dim_ok)
        # the cache's dtype, as a DynamicCache would hold it
        k_new = k_new.to(kc_ptr.dtype.element_ty).to(tl.float32)
        v_new = v_new.to(vc_ptr.dtype.element_ty).to(tl.float32)
        score = tl.sum(q.to(tl.float32) * k_new[None, :], axis=1) * scale  # (BLOCK_G,)
        m_new = tl.maximum(m_i, score)
        p = tl.exp(score - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new[None, :]
        m_i = m_new

    heads = (b * Hq + q0 + rows) * S + split  # (BLOCK_G,) row of the partials
    tl.store(m_ptr + heads, m_i, mask=row_ok)
    tl.store(l_ptr + heads, l_i, mask=row_ok)
    tl.store(acc_ptr + heads[:, None] * D + dims[None, :], acc, mask=qk_mask)


@triton.jit
def _split_kernel(
    q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, seen_ptr, pos_ptr, qoff_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
    Hkv, Hq, S, chunk, window, scale, attn_scale, floor_scale, spos_b,
    sq_b, sq_h, sq_d, skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
    skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d, sva_b, sva_l, scs_b, scs_d,
    D: tl.constexpr, LOG_SCALING: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split_program(
        tl.program_id(0), tl.program_id(1),
        q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, seen_ptr, pos_ptr, qoff_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
        Hkv, Hq, S, chunk, window, scale, attn_scale, floor_scale, spos_b,
        sq_b, sq_h, sq_d, skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
        skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d, sva_b, sva_l, scs_b, scs_d,
        D, LOG_SCALING, WINDOW, UPCAST, ROPE, BLOCK_G, BLOCK_D, BLOCK_N,
    )


@triton.jit
def combine_program(
    pid, m_ptr, l_ptr, acc_ptr, o_ptr, gamma_ptr, gate_ptr, Hq, S, norm_eps, so_b, so_h, so_d, sg_b, sg_h, sg_d,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, GATE: tl.constexpr,
):
    """Query head ``pid`` = b · Hq + h: the body of ``_combine_kernel`` (and of ``kernels/hybrid_decode``'s second kernel)."""
    pid = pid.to(tl.int64)
    b = pid // Hq
    h = pid % Hq
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    m_all = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)  # running max and sum (scalars)
    l_all = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for first in range(0, S, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        ok = splits < S
        m = tl.load(m_ptr + pid * S + splits, mask=ok, other=float("-inf"))  # (BLOCK_S,)
        l = tl.load(l_ptr + pid * S + splits, mask=ok, other=0.0)
        part = tl.load(acc_ptr + (pid * S + splits)[:, None] * D + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        m_new = tl.maximum(m_all, tl.max(m, axis=0))  # finite: split 0 always holds the new token
        w = tl.exp(m - m_new)  # (BLOCK_S,)
        alpha = tl.exp(m_all - m_new)
        l_all = l_all * alpha + tl.sum(w * l, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        m_all = m_new
    o = (acc / l_all).to(o_ptr.dtype.element_ty)
    if NORM:  # the fused epilogue on the output as stored (its dtype's rounding)
        y = o.to(tl.float32)
        y = y * (tl.load(gamma_ptr + h).to(tl.float32) / tl.sqrt(tl.sum(tl.where(dim_ok, y * y, 0.0), axis=0) / D + norm_eps))
        if GATE:
            y = y * tl.sigmoid(tl.load(gate_ptr + b * sg_b + h * sg_h + dims * sg_d, mask=dim_ok, other=0.0).to(tl.float32))
        o = y.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * so_b + h * so_h + dims * so_d, o, mask=dim_ok)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, gamma_ptr, gate_ptr, Hq, S, norm_eps, so_b, so_h, so_d, sg_b, sg_h, sg_d,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, GATE: tl.constexpr,
):
    combine_program(tl.program_id(0), m_ptr, l_ptr, acc_ptr, o_ptr, gamma_ptr, gate_ptr, Hq, S, norm_eps, so_b, so_h, so_d,
                    sg_b, sg_h, sg_d, D, BLOCK_S, BLOCK_D, NORM, GATE)


def n_splits(batch: int, n_kv: int, length: int, device: torch.device) -> int:
    """Splits of the ``length`` slots: about two programs per multiprocessor, at least ``BLOCK_N`` slots each."""
    units = sm_count(device) if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(2 * units, batch * n_kv), triton.cdiv(length, BLOCK_N)))


def triton_decode_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    valid: torch.Tensor, seen: torch.Tensor, q_offsets: torch.Tensor, *, scale: float, max_group: int | None = None,
    positions: torch.Tensor | None = None, attn_scale: float = 0.0, floor_scale: float = 1.0,
    sliding_window: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None, splits: int | None = None, gamma: torch.Tensor | None = None,
    gate: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`.naive.decode_attention_reference` in two Triton kernels (no input checks).

    Args:
        as the reference, except ``q_offsets``: a ``(Hkv + 1,)`` int32 tensor on the device; ``max_group``:
        the most query heads of one KV head (``Hq`` when None, an upper bound); ``out``: a
        ``(B, 1, Hq, D)`` tensor to write into (any strides; allocated when None); ``splits``: the number
        of splits (:func:`n_splits` when None); ``rope``: ``(cos, sin)``, each ``(B, D)`` or ``(1, D)``
        (any strides), applied to q and the new key in float32 before everything else; ``gamma`` ``(Hq,)`` and
        ``gate`` ``(B, 1, Hq, D)`` (any strides) or None: the hybrid layer's epilogue on these heads
        (``head_epilogue_reference(o, gamma, gate, norm_eps)``, in the combine kernel), or None.
    Returns:
        ``out``.
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    grid, args, constexprs, partials = split_launch(
        q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, scale=scale, max_group=max_group, positions=positions,
        attn_scale=attn_scale, floor_scale=floor_scale, sliding_window=sliding_window, rope=rope, splits=splits,
    )
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _split_kernel[grid](*args, **constexprs)
        programs, args, constexprs = combine_launch(partials, out, gamma, gate, norm_eps)
        _combine_kernel[(programs,)](*args, **constexprs)
    return out


def split_launch(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    valid: torch.Tensor, seen: torch.Tensor, q_offsets: torch.Tensor, *, scale: float, max_group: int | None = None,
    positions: torch.Tensor | None = None, attn_scale: float = 0.0, floor_scale: float = 1.0,
    sliding_window: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None, splits: int | None = None,
) -> tuple[tuple[int, int], tuple, dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The split kernel's launch, not made: ``(grid, args, constexprs, partials)``.

    ``grid`` is ``(B · Hkv, S)``, ``args``/``constexprs`` the positional and constexpr arguments of
    ``_split_kernel`` (those of :func:`split_program` after ``row, split``), ``partials`` the float32
    ``(m, l, acc)`` ``(B, Hq, S[, D])`` it writes, which the combine kernel merges (:func:`combine_launch`).
    Arguments as :func:`triton_decode_attention`'s.
    """
    batch, _, n_q, dim = q.shape
    n_kv, length = k_cache.shape[1], k_cache.shape[2]
    splits = splits or n_splits(batch, n_kv, length, q.device)
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N
    block_g = max(16, triton.next_power_of_2(max_group or n_q))  # tl.dot needs 16 rows
    m = torch.empty(batch, n_q, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(batch, n_q, splits, dim, device=q.device, dtype=torch.float32)
    pos = positions if positions is not None else seen
    cos, sin = rope if rope is not None else (q, q)  # unread without ROPE
    if rope is not None and cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    cos_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(-1)) if rope is not None else (0, 0)
    args = (
        q, k_new, v_new, k_cache, v_cache, valid, seen, pos, q_offsets, cos, sin, m, l, acc,
        n_kv, n_q, splits, chunk, sliding_window or 0, scale, attn_scale, floor_scale, pos.stride(0),
        q.stride(0), q.stride(2), q.stride(3), k_new.stride(0), k_new.stride(2), k_new.stride(3),
        v_new.stride(0), v_new.stride(2), v_new.stride(3), *k_cache.stride(), *v_cache.stride(), *valid.stride(), *cos_strides,
    )
    constexprs = dict(
        D=dim, LOG_SCALING=positions is not None, WINDOW=sliding_window is not None, UPCAST=not q.is_cuda, ROPE=rope is not None,
        BLOCK_G=block_g, BLOCK_D=triton.next_power_of_2(dim), BLOCK_N=BLOCK_N,
    )
    return (batch * n_kv, splits), args, constexprs, (m, l, acc)


def combine_launch(
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: torch.Tensor, gamma: torch.Tensor | None = None,
    gate: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[int, tuple, dict]:
    """The combine kernel's launch, not made: ``(programs, args, constexprs)``, ``B · Hq`` programs and the arguments
    of ``_combine_kernel`` (those of :func:`combine_program` after ``pid``): the ``(m, l, acc)`` partials of the split
    kernel merged into ``out`` ``(B, 1, Hq, D)``, with the hybrid layer's epilogue when ``gamma`` (and ``gate``) are
    given."""
    m, l, acc = partials
    batch, n_q, splits, dim = acc.shape
    gate_strides = (gate.stride(0), gate.stride(2), gate.stride(3)) if gate is not None else (0, 0, 0)
    args = (m, l, acc, out, gamma if gamma is not None else m, gate if gate is not None else m, n_q, splits, norm_eps,
            out.stride(0), out.stride(2), out.stride(3), *gate_strides)
    constexprs = dict(D=dim, BLOCK_S=min(64, triton.next_power_of_2(splits)), BLOCK_D=triton.next_power_of_2(dim),
                      NORM=gamma is not None, GATE=gate is not None)
    return batch * n_q, args, constexprs
