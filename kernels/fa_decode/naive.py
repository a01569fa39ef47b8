"""Float32 torch reference of one decode step of the FA heads against a preallocated (static) KV cache.

The cache holds ``L`` slots per row, ``k_cache``/``v_cache`` ``(B, Hkv, L, D)``; slots ``0 .. n-1`` hold
the tokens seen so far (``n = seen``, a one-element device tensor, the same for every row: left padding
keeps rows aligned) and ``valid`` ``(B, L)`` says which of them are real tokens (0 = padding). One step:

0. with ``rope = (cos, sin)``, rotates q and the new key (HF convention, in float32, before anything else)::

       x' = x · cos + rotate_half(x) · sin,    rotate_half([x1, x2]) = [-x2, x1]

1. writes the new token's key and value into slot ``n`` (``k_cache[:, :, n] = k_new``);
2. scales each query by the FA heads' long-context factor of its position ``p`` (when ``log_scaling``)::

       s(p) = 1 + attn_scale · log(floor((p + 1) / floor_scale) + 1)

3. attends from query head ``h`` (of KV head ``j``: query heads ``[q_offsets[j], q_offsets[j+1])``) over
   the keys ``i <= n`` that are real (``valid[b, i]``) or the token itself (``i == n``, so no row is
   empty), within ``sliding_window`` (``n - i < window``) if given::

       o_h = softmax_i(scale · s(p) · q_h · k_i) v_i

This is what ``headscope.hybrid.layer`` computes with ``cache.update`` + ``causal_attention`` on a
``DynamicCache`` for one new token, written for a fixed-size buffer and a device-side length so that it
can be captured in a CUDA graph. It is the CPU path of :func:`headscope.kernels.fa_decode.ops.decode_attention`
and the float32 reference of the Triton kernels in :mod:`.triton_fa_decode`.
"""

from __future__ import annotations

import torch

from headscope.kernels.rope_norm.naive import rotate_half


def log_scale(positions: torch.Tensor, attn_scale: float, floor_scale: float) -> torch.Tensor:
    """``1 + attn_scale · log(floor((p + 1) / floor_scale) + 1)``, float32, the shape of ``positions``."""
    pos = positions.to(torch.float32)
    return 1.0 + attn_scale * torch.log(torch.floor((pos + 1.0) / floor_scale) + 1.0)


def visible_keys(valid: torch.Tensor, seen: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """``(B, L)`` bool: the keys the new token (slot ``seen``) attends to."""
    slots = torch.arange(valid.shape[1], device=valid.device)[None]  # (1, L)
    visible = ((slots < seen) & valid.bool()) | (slots == seen)
    if sliding_window is not None:
        visible &= seen - slots < sliding_window
    return visible


def decode_attention_reference(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    valid: torch.Tensor, seen: torch.Tensor, q_offsets: tuple[int, ...], *, scale: float,
    positions: torch.Tensor | None = None, attn_scale: float = 0.0, floor_scale: float = 1.0,
    sliding_window: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decode step of the FA heads (module docstring); writes slot ``seen`` of the caches in place.

    Args:
        q: ``(B, 1, Hq, D)`` queries (RoPE already applied, or given as ``rope``).
        k_new, v_new: ``(B, 1, Hkv, D)`` the new token's key (likewise) and value.
        k_cache, v_cache: ``(B, Hkv, L, D)`` preallocated caches.
        valid: ``(B, L)`` 1/True for real tokens.
        seen: ``(1,)`` int64, tokens already in the cache (the slot the new token takes).
        q_offsets: ``Hkv + 1`` increasing offsets; KV head ``j`` serves query heads ``[q_offsets[j], q_offsets[j+1])``.
        scale: softmax scale (1/sqrt(D)).
        positions: ``(B,)`` position of the new token per row, for the log scaling; None = no scaling.
        attn_scale, floor_scale: the log scaling's constants.
        sliding_window: attend to at most this many most recent slots, or None.
        rope: ``(cos, sin)``, each ``(B, D)`` or ``(1, D)``, of the new token's position, or None (no rotation).
    Returns:
        ``(B, 1, Hq, D)`` in q's dtype.
    """
    dtype = q.dtype
    if rope is not None:
        cos, sin = (t.float()[:, None, None] for t in rope)  # (B, 1, 1, D)
        q, k_new = (x.float() * cos + rotate_half(x.float()) * sin for x in (q, k_new))  # float32 from here
    k_cache.index_copy_(2, seen, k_new.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, seen, v_new.transpose(1, 2).to(v_cache.dtype))
    sizes = torch.tensor(q_offsets[1:], device=q.device) - torch.tensor(q_offsets[:-1], device=q.device)
    kv_of_head = torch.repeat_interleave(torch.arange(len(sizes), device=q.device), sizes)  # (Hq,)
    qf = q[:, 0].float() * scale  # (B, Hq, D)
    if positions is not None:
        qf = qf * log_scale(positions, attn_scale, floor_scale)[:, None, None]
    keys, values = k_cache[:, kv_of_head].float(), v_cache[:, kv_of_head].float()  # (B, Hq, L, D)
    logits = torch.einsum("bhd,bhld->bhl", qf, keys)
    logits = logits.masked_fill(~visible_keys(valid, seen, sliding_window)[:, None], float("-inf"))
    o = torch.einsum("bhl,bhld->bhd", torch.softmax(logits, dim=-1), values)
    return o[:, None].to(dtype)
