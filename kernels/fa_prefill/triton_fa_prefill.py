"""Triton causal prefill attention of the FA heads, every KV group in one launch (see :mod:`.naive` for the math).

Why: in a hybrid layer a few FA heads sit beside many GDN heads, and at batch 1 and a few thousand tokens the
attention core is bound by the host, not the GPU (H200, ``benchmarks/results/gdn_prefill_speed.md``: the core at
4K enqueued in ~0.4-0.66 ms against ~0.34 ms of GPU work). ATen's FlashAttention call cost ~80 us of host time
there (under cProfile; its split-KV path allocates and launches a combine kernel too), one call per run of
equal KV groups, plus a ``cat`` when the groups differ. This kernel is one launch through
``headscope.kernels.launch.launch`` for all FA heads, reads q in the projection's layout ``(B, T, Hq, D)`` and
k/v in the cache's ``(B, Hkv, Tk, D)`` (any strides, last dimension contiguous: no transposes, no copies) and
writes ``(B, T, Hq, D)`` straight into ``out`` (any strides).

``_prefill_kernel``, grid ``(ceil(T / BLOCK_M), B · Hq)``: program ``(m, b·h)`` takes a ``BLOCK_M x D`` tile of
query rows of head ``h`` (the KV head from the int32 map ``kv_heads``), each head's longest rows first (the first
programs of a head take its last query block, whose loop is longest), and runs FlashAttention-2's online softmax over
``BLOCK_N`` keys at a time in base 2 (``scale · log2(e)`` folded into the scores): first over the keys every row
of the tile sees (no mask), then over the diagonal blocks (causal mask ``key <= Tk - T + row``). Key 0 is in
the first block and visible to every row, so no row's running maximum stays ``-inf``. Scores, maxima, sums and
the accumulator are float32; P is rounded to the input dtype for the second product, as FlashAttention does.
Under ``TRITON_INTERPRET=1`` (``UPCAST``) the operands are rounded the same way and multiplied in float32 (the
interpreter cannot multiply bf16 tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headscope.kernels.launch import cdiv, last_dim_contiguous, launch, next_power_of_2, on_device, sm_count

LOG2E = 1.4426950408889634


@triton.jit
def _operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to the dots' operand dtype; back in float32 under UPCAST (module docstring)."""
    x = x.to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend(q, k_base, v_base, start, rows, past, key_len, sk_t, sv_t, dims, dim_ok, m_i, l_i, acc, scale_log2,
            dtype: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """One block of ``BLOCK_N`` keys folded into the running maximum ``m_i``, sum ``l_i`` and accumulator ``acc``
    (unmasked blocks lie below ``key_len``: only the head dim's padding is masked there)."""
    cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
    if MASKED:
        tile_ok = (cols < key_len)[:, None] & dim_ok[None, :]
    else:
        tile_ok = dim_ok[None, :]
    k = _operand(tl.load(k_base + cols[:, None].to(tl.int64) * sk_t + dims[None, :], mask=tile_ok, other=0.0), dtype, UPCAST)
    v = _operand(tl.load(v_base + cols[:, None].to(tl.int64) * sv_t + dims[None, :], mask=tile_ok, other=0.0), dtype, UPCAST)
    s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N) float32, base-2 logits
    if MASKED:
        s = tl.where((cols[None, :] <= rows[:, None] + past) & (cols < key_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(_operand(p, dtype, UPCAST), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, kvh_ptr,
    T, TK, Hq, scale_log2,
    sq_b, sq_t, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_t, so_h, so_d,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    block = tl.num_programs(0) - 1 - tl.program_id(0)  # each head's last (longest) query blocks first
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    j = tl.load(kvh_ptr + h).to(tl.int64)
    past = TK - T  # query row t sits at position past + t
    first = block * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    dim_ok = dims < D
    q_tile = tl.load(q_ptr + b * sq_b + rows[:, None].to(tl.int64) * sq_t + h * sq_h + dims[None, :],
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    dtype = q_ptr.dtype.element_ty
    q_tile = _operand(q_tile, dtype, UPCAST)
    k_base = k_ptr + b * sk_b + j * sk_h
    v_base = v_ptr + b * sv_b + j * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    unmasked_end = ((first + past + 1) // BLOCK_N) * BLOCK_N  # keys [0, this) are visible to every row of the tile
    end = tl.minimum(first + BLOCK_M + past, TK)  # one past the last key any row of the tile sees
    for start in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _attend(q_tile, k_base, v_base, start, rows, past, TK, sk_t, sv_t, dims, dim_ok, m_i, l_i, acc,
                                scale_log2, dtype, BLOCK_N, False, UPCAST)
    for start in range(unmasked_end, end, BLOCK_N):
        m_i, l_i, acc = _attend(q_tile, k_base, v_base, start, rows, past, TK, sk_t, sv_t, dims, dim_ok, m_i, l_i, acc,
                                scale_log2, dtype, BLOCK_N, True, UPCAST)
    o = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + rows[:, None].to(tl.int64) * so_t + h * so_h + dims[None, :] * so_d, o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def block_sizes(batch_heads: int, length: int, head_dim: int, n_sms: int, element_size: int = 2) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. Rows of up to 256 bytes (D <= 128 in bf16/fp16): 128 query
    rows per program (8 warps) when that grid still fills the GPU's ``n_sms`` SMs, else 64 (4 warps: at 4K tokens
    and 2 FA heads, 128 programs instead of 64), 64 keys per step, 3 stages. Wider rows (D = 256, or float32 under
    the interpreter and the compile check): 64 rows, 32 keys, 8 warps (a 64 x 256 float32 accumulator is 64
    registers a thread), 2 stages, so the pipelined tiles fit an sm_90 SM's
    shared memory (``benchmarks/triton_compile_check.py``: 128 rows did not)."""
    if max(16, next_power_of_2(head_dim)) * element_size > 256:
        return 64, 32, 8, 2
    return (128, 64, 8, 3) if cdiv(length, 128) * batch_heads >= n_sms else (64, 64, 4, 3)


def triton_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: torch.Tensor, *, scale: float,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` ``(B, T, Hq, D)`` over ``k``, ``v`` ``(B, Hkv, Tk, D)``, ``Tk >= T`` (no input checks,
    no autograd).

    Args:
        kv_heads: ``(Hq,)`` int32 on q's device, the KV head of each query head.
        scale: the softmax scale.
        out: ``(B, T, Hq, D)`` to write into (any strides), allocated in q's dtype when None.
    Returns:
        ``out``.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, length, n_heads, head_dim = q.shape
    if out is None:
        out = torch.empty(batch, length, n_heads, head_dim, dtype=q.dtype, device=q.device)
    if not (batch and length and n_heads):
        return out
    block_m, block_n, warps, stages = block_sizes(batch * n_heads, length, head_dim, sm_count(q.device), q.element_size())
    with on_device(q):
        launch(
            _prefill_kernel, (cdiv(length, block_m), batch * n_heads),
            q, k, v, out, kv_heads, length, k.shape[2], n_heads, scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride(),
            D=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=not q.is_cuda,
            num_warps=warps, num_stages=stages,
        )
    return out
