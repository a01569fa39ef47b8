"""Dispatcher of the FA heads' causal prefill attention: Triton on CUDA, the float32 torch reference elsewhere.

``prefill_attention(q, k, v, q_offsets, scale=...)`` (math in :mod:`.naive`): ``q`` ``(B, T, Hq, D)``, ``k``/``v``
``(B, Hkv, Tk, D)`` with ``Tk >= T``, query heads ``[q_offsets[j], q_offsets[j + 1])`` on KV head ``j``; returns
``(B, T, Hq, D)``.

* :func:`applies` (q, k, v on one CUDA device in one of bf16/fp16, D <= 256, no gradient wanted, not under
  ``torch.compile`` tracing, ``triton_off()`` false, ``2 <= T <= Tk <= MAX_TOKENS``, ``T >= Tk /
  SHORTEST_CHUNK``, ``B · Hq <= 65535``): the one-launch kernel of :mod:`.triton_fa_prefill`. ``MAX_TOKENS``
  bounds it to the short prefills where the hybrid's FA branch is bound by the host (module docstring there);
  longer ones, where the GPU's work dominates, keep FlashAttention, whose kernel is tuned for them. So do a decode
  step (``T = 1``: a 64-row query tile for one row) and a short chunk over many keys (multi-token decoding over a
  cache: this kernel's grid is ``T / 64`` programs per head, each walking every key, where FlashAttention splits
  the keys over the SMs).
* Everything else: :func:`.naive.prefill_attention_reference` in q's dtype (the hybrid layer does not call this
  off the Triton path: its CPU and autograd path is SDPA, ``headscope.hybrid.functional.causal_attention``).

``kv_head_map(q_offsets, device)``: the int32 KV head of each query head on ``device``, made once per offsets
and device (the layer's FA branch passes the same offsets at every call: no host-to-device copy per call).

triton is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import functools

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.fa_prefill.naive import kv_heads_of, prefill_attention_reference
from headscope.kernels.switch import triton_off

MAX_HEAD_DIM = 256
MAX_TOKENS = 8192  # most keys (and queries) sent to the Triton kernel (not yet timed against FlashAttention: see above)
SHORTEST_CHUNK = 8  # T >= Tk / this: a short chunk over many keys keeps FlashAttention's split-KV (module docstring)
MAX_GRID_Y = 65535  # B · Hq programs on the grid's second axis (CUDA's limit)


@functools.cache
def kv_head_map(q_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(Hq,)`` int32 on ``device``: the KV head of each query head."""
    return torch.tensor(kv_heads_of(q_offsets), dtype=torch.int32, device=device)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`prefill_attention` takes the Triton kernel for these inputs (module docstring)."""
    length, key_len = q.shape[1], k.shape[2]
    if not q.is_cuda or triton_off() or not 2 <= length <= key_len <= MAX_TOKENS:
        return False
    if length * SHORTEST_CHUNK < key_len or q.shape[0] * q.shape[2] > MAX_GRID_Y or torch.compiler.is_compiling():
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if k.device != q.device or v.device != q.device:
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _check_inputs(q, k, v, q_offsets, out) -> None:
    def fail(what: str) -> None:
        raise HeadscopeError(f"prefill_attention: {what}")

    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        fail(f"q must be (B, T, Hq, D) and k, v (B, Hkv, Tk, D) alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, length, n_q, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or k.shape[2] < length:
        fail(f"k and v must be (B, Hkv, Tk, D) with B={batch}, D={dim}, Tk >= T={length}; got {tuple(k.shape)}")
    n_kv = k.shape[1]
    if len(q_offsets) != n_kv + 1 or q_offsets[0] != 0 or q_offsets[-1] != n_q or any(b <= a for a, b in zip(q_offsets, q_offsets[1:])):
        fail(f"q_offsets must rise from 0 to Hq={n_q} in Hkv={n_kv} steps; got {tuple(q_offsets)}")
    if out is not None and tuple(out.shape) != tuple(q.shape):
        fail(f"out must be (B, T, Hq, D) = {tuple(q.shape)}; got {tuple(out.shape)}")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: tuple[int, ...], *, scale: float,
                      out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Causal attention of the FA heads over grouped KV heads (see :mod:`.naive`).

    Args:
        q: ``(B, T, Hq, D)``; k, v: ``(B, Hkv, Tk, D)``, ``Tk >= T``; any strides with the last one 1.
        q_offsets: ``Hkv + 1`` rising ints from 0 to Hq (a tuple: it keys the cached KV head map).
        scale: the softmax scale.
        out: ``(B, T, Hq, D)`` to write the result into (any strides), or None.
        check: validate the shapes (the layer, which made them, passes False).
    Returns:
        ``(B, T, Hq, D)`` in q's dtype (``out`` when given).
    """
    if check:
        _check_inputs(q, k, v, q_offsets, out)
    if not applies(q, k, v):
        o = prefill_attention_reference(q, k, v, q_offsets, scale=scale).to(q.dtype)
        return o if out is None else out.copy_(o)
    from headscope.kernels.fa_prefill.triton_fa_prefill import triton_prefill_attention

    return triton_prefill_attention(q, k, v, kv_head_map(tuple(q_offsets), q.device), scale=scale, out=out)
