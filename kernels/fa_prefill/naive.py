"""Float32 torch reference of the FA heads' causal prefill attention over grouped KV heads.

``q`` ``(B, T, Hq, D)`` holds the queries of the last ``T`` of ``Tk`` positions, ``k``/``v`` ``(B, Hkv, Tk, D)``
the keys and values of all of them (the KV-cache layout: earlier positions first, ``Tk >= T``). Query head ``h``
uses KV head ``j`` with ``q_offsets[j] <= h < q_offsets[j + 1]`` (the hybrid's FA heads keep the pretrained KV
groups they came from, so groups may differ in size: ``fa_kv_sizes`` (2, 1, 3) gives offsets (0, 2, 3, 6)).
Query ``t`` sits at position ``Tk - T + t`` and attends to the keys at or before it (causal aligned to the last
key, FlashAttention's convention; ``T = Tk`` is a plain causal prefill)::

    o[b, t, h] = sum_{i <= Tk - T + t} softmax_i(scale · q[b, t, h] · k[b, j, i]) v[b, j, i]

This is what ``headscope.hybrid.functional.causal_attention`` computes with SDPA for an unmasked call, written
for one KV head map instead of one call per run of equal groups. It is the float32 reference of the Triton
kernel in :mod:`.triton_fa_prefill`.
"""

from __future__ import annotations

import torch


def kv_heads_of(q_offsets: tuple[int, ...]) -> list[int]:
    """The KV head of each query head: ``j`` repeated ``q_offsets[j + 1] - q_offsets[j]`` times."""
    return [j for j, (lo, hi) in enumerate(zip(q_offsets, q_offsets[1:])) for _ in range(hi - lo)]


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: tuple[int, ...], *, scale: float) -> torch.Tensor:
    """``(B, T, Hq, D)`` float32 (module docstring)."""
    length, key_len = q.shape[1], k.shape[2]
    index = torch.tensor(kv_heads_of(q_offsets), device=q.device)
    keys, values = k.float().index_select(1, index), v.float().index_select(1, index)  # (B, Hq, Tk, D)
    scores = torch.einsum("bthd,bhsd->bhts", q.float(), keys) * scale  # (B, Hq, T, Tk)
    visible = torch.arange(key_len, device=q.device)[None, :] <= torch.arange(length, device=q.device)[:, None] + (key_len - length)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bhsd->bthd", weights, values)
