"""Dispatcher of the FA heads' decode step against a static KV cache: Triton on CUDA, the torch reference on CPU.

``decode_attention(q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, ...)`` (math in :mod:`.naive`)
writes the new token into slot ``seen`` of the caches and returns the FA heads' outputs ``(B, 1, Hq, D)``.

* CUDA (unless ``triton_off()``), no gradient needed, D <= 256: the two Triton kernels of
  :mod:`.triton_fa_decode` (split-K over the cached tokens, new token folded in, cache write included);
  nothing reads the device-side length on the host, so a CUDA graph can capture the call.
* Everything else: :func:`.naive.decode_attention_reference` (float32, over the whole buffer with a mask).

``triton_call(...)``: the checks and the choice alone (the Triton call's arguments, or None), for
``kernels/hybrid_decode``, which launches these heads' split programs with the GDN heads' programs.

triton is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.fa_decode.naive import decode_attention_reference
from headscope.kernels.switch import triton_off

MAX_HEAD_DIM = 256


def _check_inputs(q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, out, rope) -> None:
    def fail(what: str) -> None:
        raise HeadscopeError(f"decode_attention: {what}")

    if q.dim() != 4 or q.shape[1] != 1:
        fail(f"q must be (B, 1, Hq, D); got {tuple(q.shape)}")
    batch, _, n_q, dim = q.shape
    n_kv = k_cache.shape[1] if k_cache.dim() == 4 else -1
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != dim:
        fail(f"k_cache and v_cache must be (B, Hkv, L, D) = ({batch}, Hkv, L, {dim}); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (batch, 1, n_kv, dim):
            fail(f"{name} must be (B, 1, Hkv, D) = {(batch, 1, n_kv, dim)}; got {tuple(t.shape)}")
    if tuple(valid.shape) != (batch, k_cache.shape[2]):
        fail(f"valid must be (B, L) = {(batch, k_cache.shape[2])}; got {tuple(valid.shape)}")
    if seen.shape != (1,) or seen.dtype != torch.long:
        fail(f"seen must be a (1,) int64 tensor; got {tuple(seen.shape)} {seen.dtype}")
    if len(q_offsets) != n_kv + 1 or q_offsets[0] != 0 or q_offsets[-1] != n_q or any(b <= a for a, b in zip(q_offsets, q_offsets[1:])):
        fail(f"q_offsets must rise from 0 to Hq={n_q} in Hkv={n_kv} steps; got {tuple(q_offsets)}")
    if rope is not None and any(t.dim() != 2 or t.shape[0] not in (1, batch) or t.shape[1] != dim for t in rope):
        fail(f"rope must be (cos, sin), each (B, D) or (1, D) with B={batch}, D={dim}; got {[tuple(t.shape) for t in rope]}")
    if rope is not None and dim % 2:
        fail(f"rope needs an even head dim; got {dim}")
    if out is not None and tuple(out.shape) != tuple(q.shape):
        fail(f"out must be (B, 1, Hq, D) = {tuple(q.shape)}; got {tuple(out.shape)}")


def use_triton(q: torch.Tensor, k_cache: torch.Tensor, *tensors: torch.Tensor) -> bool:
    if not q.is_cuda or triton_off() or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if k_cache.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors)))


def decode_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    valid: torch.Tensor, seen: torch.Tensor, q_offsets: tuple[int, ...], *, scale: float,
    positions: torch.Tensor | None = None, attn_scale: float = 0.0, floor_scale: float = 1.0,
    sliding_window: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None, device_offsets: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
    gate: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One decode step of the FA heads against a static cache (see :func:`.naive.decode_attention_reference`).

    Args:
        as the reference (``rope``: the rotation done in the kernel, no launches of its own); ``out``: ``(B, 1, Hq, D)`` to write the result into (any strides), or None;
        ``device_offsets``: ``q_offsets`` as an int32 tensor on q's device (made here when None; the layer
        keeps one so a captured graph does not copy it every step); ``gamma`` ``(Hq,)`` and ``gate``
        ``(B, 1, Hq, D)`` or None: also apply the hybrid layer's epilogue to these heads
        (``head_epilogue_reference(o, gamma, gate, norm_eps)``; in the combine kernel on the Triton path; a gate
        needs gamma).
    Returns:
        ``(B, 1, Hq, D)`` (``out`` when given).
    """
    kwargs = dict(scale=scale, positions=positions, attn_scale=attn_scale, floor_scale=floor_scale, sliding_window=sliding_window, rope=rope)
    call = triton_call(q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, out=out, device_offsets=device_offsets,
                       gamma=gamma, gate=gate, norm_eps=norm_eps, **kwargs)
    if call is not None:
        from headscope.kernels.fa_decode.triton_fa_decode import triton_decode_attention

        return triton_decode_attention(**call)
    o = decode_attention_reference(q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, **kwargs)
    if gamma is not None:  # the epilogue reads the output as stored (in q's dtype)
        o = head_epilogue_reference(o, gamma, gate, norm_eps)
    return o if out is None else out.copy_(o)


def triton_call(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    valid: torch.Tensor, seen: torch.Tensor, q_offsets: tuple[int, ...], *, scale: float,
    positions: torch.Tensor | None = None, attn_scale: float = 0.0, floor_scale: float = 1.0,
    sliding_window: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None, device_offsets: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
    gate: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> dict | None:
    """:func:`decode_attention`'s input checks (one clear error) and choice of path: the keyword arguments of
    ``triton_decode_attention`` when the Triton kernels serve the call, None when the reference does.
    ``kernels/hybrid_decode`` uses it to launch these heads' split programs together with the GDN heads'."""
    _check_inputs(q, k_new, v_new, k_cache, v_cache, valid, seen, q_offsets, out, rope)
    if gamma is not None and tuple(gamma.shape) != (q.shape[2],) or gate is not None and (gamma is None or gate.shape != q.shape):
        raise HeadscopeError(f"decode_attention: gamma must be (Hq,) = ({q.shape[2]},) and gate (B, 1, Hq, D) = {tuple(q.shape)} "
                             f"with gamma; got {None if gamma is None else tuple(gamma.shape)}, {None if gate is None else tuple(gate.shape)}")
    if not use_triton(q, k_cache, k_new, v_new, *(t for t in (gamma, gate) if t is not None)):
        return None
    if device_offsets is None:
        device_offsets = torch.tensor(q_offsets, dtype=torch.int32, device=q.device)
    max_group = max(b - a for a, b in zip(q_offsets, q_offsets[1:]))
    return dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, valid=valid, seen=seen, q_offsets=device_offsets,
                scale=scale, max_group=max_group, positions=positions, attn_scale=attn_scale, floor_scale=floor_scale,
                sliding_window=sliding_window, rope=rope, out=out, gamma=gamma, gate=gate, norm_eps=norm_eps)
