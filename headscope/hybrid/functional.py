"""Tensor functions of the head-wise hybrid layer (no parameters, no modules).

* ``apply_rope``: rotary position embedding in the Hugging Face "rotate half" convention, on
  ``(B, T, H, D)`` tensors with ``cos``/``sin`` of shape ``(B, T, D)`` from the base model's rotary module.
* ``log_position_scale``: the long-context query scale of the full-attention heads (Llama 4's NoPE
  layers; a fixed form of SSMax's s·log n)::

      scale(pos) = 1 + attn_scale · log(floor((pos + 1) / floor_scale) + 1)

  It is exactly 1 for ``pos < floor_scale - 1`` (8191 with the default ``floor_scale = 8192``), so short
  contexts see the pretrained logits unchanged, and grows like ``attn_scale · log(pos / floor_scale)``
  beyond: at 128K tokens with ``attn_scale = 0.1`` it is 1.28. It multiplies the queries, hence the logits.
  ``model_query_scale`` is what a model passes its layers: 1.0 when it knows every position is below
  ``floor_scale - 1``.
* ``causal_attention``: SDPA over contiguous head segments of the full-attention heads. Each segment is
  a run of KV heads serving the same number of query heads, so grouped-query attention runs without
  gathering or copying keys (``enable_gqa``); a mask is built only when padding or a sliding window needs
  one. A query block that does not start at key 0 (a later prefill chunk) is causal aligned to the last key:
  ``torch.nn.attention.bias.causal_lower_right``, which SDPA runs as FlashAttention's own causal mode on
  CUDA (grouped heads included) instead of a ``(T, past + T)`` bool mask, which only cuDNN or the math
  fallback take with grouped heads. With ``direct`` (the FA branch of a hybrid layer, a few heads beside the
  GDN heads) an unmasked inference call on CUDA runs ``aten._scaled_dot_product_flash_attention`` itself:
  the same FlashAttention kernel (grouped heads natively, causal aligned to the last key, which is also the
  decode step's "every key"), without SDPA's backend selection. On the H200 SDPA spent ~0.1 ms of host time
  per call choosing and setting up cuDNN's kernel, more than the GPU needs for two heads at 4K tokens, so the
  hybrid's short-context prefill waited on the host; full-attention (plain) layers keep SDPA's choice, as the
  model they stand for does. A direct call of 2 to ``kernels.fa_prefill.ops.MAX_TOKENS`` queries goes further:
  one launch of ``kernels/fa_prefill`` for every head segment at once (``segment_offsets``: the KV head map),
  reading q and k/v in the layouts they come in and no ATen call at all (``fa_prefill.ops.applies``).

The GDN branch's short convolution (with its RoPE + L2 norm) lives in ``headscope.kernels.gdn_prep``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import headscope.kernels.fa_prefill.ops as fa_prefill


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF convention.

    Args:
        x: ``(B, T, H, D)``.
        cos, sin: ``(B, T, D)`` (batch 1 broadcasts).
    Returns:
        ``(B, T, H, D)`` rotated, in ``x``'s dtype.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D)
    return x * cos + rotate_half(x) * sin


def log_position_scale(position_ids: torch.Tensor, attn_scale: float, floor_scale: float) -> torch.Tensor:
    """``1 + attn_scale · log(floor((pos + 1) / floor_scale) + 1)`` per position.

    Args:
        position_ids: ``(B, T)`` absolute positions (0-based).
    Returns:
        ``(B, T)`` float32 query multipliers (>= 1).
    """
    pos = position_ids.to(torch.float32)
    return 1.0 + attn_scale * torch.log(torch.floor((pos + 1.0) / floor_scale) + 1.0)


def model_query_scale(
    position_ids: torch.Tensor, last_position: int | None, attn_scale: float, floor_scale: float, dtype: torch.dtype
) -> torch.Tensor | float:
    """The FA query scale a model computes once per forward for all its layers.

    Exactly 1.0 (a Python float: the layers skip the multiply) when ``last_position``, an upper bound on
    the positions known on the host, is below ``floor_scale - 1``; else ``log_position_scale`` ``(B, T)``
    in ``dtype`` (the layers round it to the queries' dtype anyway).
    """
    if last_position is not None and last_position + 1 < floor_scale:
        return 1.0
    return log_position_scale(position_ids, attn_scale, floor_scale).to(dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dimension, computed in float32 (fla's ``l2norm``: x / sqrt(Σx² + eps))."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def attention_mask(
    query_len: int,
    key_len: int,
    *,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean SDPA mask (True = may attend) for queries at the last ``query_len`` of ``key_len`` positions.

    Query ``i`` sits at key position ``key_len - query_len + i``; it sees keys at or before it, within the
    sliding window if any, that are not padding. A padded query always sees itself, so no row is empty.

    Args:
        padding_mask: ``(B, key_len)``, 1/True for real tokens.
    Returns:
        ``(B or 1, 1, query_len, key_len)`` bool.
    """
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(key_len, device=device)[None, :]  # (1, Tk)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if padding_mask is not None:
        real_key = padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = (allowed & real_key) | (k_pos == q_pos)[None, None]
    return allowed


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    """Whether FlashAttention runs on this CUDA device (sm_80 or newer)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def direct_flash_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``causal_attention(..., direct=True)`` may call the flash kernel itself: CUDA, half precision,
    a head size flash takes unpadded (a multiple of 8, at most 256), no gradient wanted."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
            and torch.backends.cuda.flash_sdp_enabled() and _flash_capable(q.device))  # flash not switched off (sdpa_kernel)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: tuple[tuple[int, int, int, int], ...],
    *,
    scale: float,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    direct: bool = False,
) -> torch.Tensor:
    """Causal SDPA of the full-attention heads, one call per head segment.

    Args:
        q: ``(B, T, Hq, D)`` queries of the last ``T`` positions.
        k, v: ``(B, Hkv, Tk, D)`` keys/values of all ``Tk`` positions (cache layout).
        segments: ``(q_start, q_end, kv_start, kv_end)`` head ranges; each segment's query count is a
            multiple of its KV count, query heads of one KV head adjacent.
        scale: softmax scale (1/sqrt(D)).
        padding_mask: ``(B, Tk)`` real-token mask, or None.
        sliding_window: attend to at most this many most recent keys, or None.
        direct: when no mask is needed, ``kernels/fa_prefill``'s kernel if ``fa_prefill.ops.applies``, else the flash
            kernel itself if ``direct_flash_applies`` (module docstring); SDPA otherwise.
    Returns:
        ``(B, T, Hq, D)``.
    """
    query_len, key_len = q.shape[1], k.shape[2]
    window_bites = sliding_window is not None and key_len > sliding_window
    if direct and padding_mask is None and not window_bites and fa_prefill.applies(q, k, v):  # every segment, one launch
        return fa_prefill.prefill_attention(q, k, v, segment_offsets(segments), scale=scale, check=False)
    if direct and padding_mask is None and not window_bites and direct_flash_applies(q, k):
        def attend(qs, ks, vs, grouped):  # causal aligned to the last key; flash takes grouped heads natively
            return torch.ops.aten._scaled_dot_product_flash_attention(
                qs, ks, vs, 0.0, is_causal=query_len > 1, return_debug_mask=False, scale=scale)[0]
    else:
        mask, causal = None, False
        if padding_mask is not None or window_bites:
            mask = attention_mask(query_len, key_len, padding_mask=padding_mask, sliding_window=sliding_window, device=q.device)
        elif 1 < query_len < key_len:  # a later chunk: causal, aligned to the last key, nothing materialised on CUDA
            mask = causal_lower_right(query_len, key_len)
        elif query_len == key_len:
            causal = query_len > 1

        def attend(qs, ks, vs, grouped):
            return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=grouped)
    qh = q.transpose(1, 2)  # (B, Hq, T, D)
    whole = segments == ((0, qh.shape[1], 0, k.shape[1]),)  # one run over every head: no slicing
    outputs = [attend(qh if whole else qh[:, q0:q1], k if whole else k[:, k0:k1], v if whole else v[:, k0:k1], (q1 - q0) != (k1 - k0))
               for q0, q1, k0, k1 in segments]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, Hq, T, D)
    return out.transpose(1, 2)


@functools.cache
def segment_offsets(segments: tuple[tuple[int, int, int, int], ...]) -> tuple[int, ...]:
    """The first query head of each KV head, and the head count: ``q_offsets`` of ``kernels/fa_prefill`` for the
    ``fa_segments`` runs (the runs' KV heads in order, each serving ``(q_end - q_start) / (kv_end - kv_start)``)."""
    offsets = [0]
    for q0, q1, k0, k1 in segments:
        group = (q1 - q0) // (k1 - k0)
        offsets.extend(q0 + group * (i + 1) for i in range(k1 - k0))
    return tuple(offsets)


def fa_segments(fa_kv_sizes: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """Split FA heads into runs of KV heads that serve equally many query heads.

    ``fa_kv_sizes[j]`` is how many FA query heads (adjacent, in order) use FA KV head ``j``. One SDPA call
    per run keeps GQA gather-free; a mask aligned to whole KV groups gives a single run.

    Returns:
        ``(q_start, q_end, kv_start, kv_end)`` per run.
    """
    segments, q0, k0 = [], 0, 0
    while k0 < len(fa_kv_sizes):
        size, k1 = fa_kv_sizes[k0], k0
        while k1 < len(fa_kv_sizes) and fa_kv_sizes[k1] == size:
            k1 += 1
        q1 = q0 + size * (k1 - k0)
        segments.append((q0, q1, k0, k1))
        q0, k0 = q1, k1
    return tuple(segments)


def gdn_decay_init(n_heads: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's Gated DeltaNet decay initialisation.

    ``A ~ U(0, 16)`` stored as ``A_log = log A``; ``dt`` log-uniform in ``[1e-3, 0.1]`` (floored at 1e-4)
    stored as its inverse softplus ``dt_bias = dt + log(1 - exp(-dt))`` so that ``softplus(dt_bias) = dt``.

    Returns:
        ``A_log`` and ``dt_bias``, ``(n_heads,)`` float32.
    """
    a = torch.empty(n_heads).uniform_(0, 16, generator=generator).clamp_min(1e-4)
    log_dt = torch.rand(n_heads, generator=generator) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = log_dt.exp().clamp_min(1e-4)
    return a.log(), dt + torch.log(-torch.expm1(-dt))
