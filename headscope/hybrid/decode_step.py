"""One decode token of a ``HeadwiseHybridAttention`` against a ``HybridStaticCache``: the kernels' arguments and call.

A one-token call against the static cache is what ``headscope.hybrid.static_cache`` captures in a CUDA graph: no
host synchronisation, no allocation but the output, every state updated in place. Both kinds of heads write slices
of one per-head output ``(B, 1, H, D)`` (FA heads first, the layer's head order):

* FA heads, ``kernels/fa_decode`` (``decode_attention``): q and the new key rotated in the kernel when the FA heads
  use RoPE, the log query scale computed there from the positions, the new key/value written into the cache slot
  ``seen``, split-K attention over the tokens seen (two launches on CUDA);
* GDN heads, ``kernels/gdn_decode`` (``gdn_decode_step``): conv window, SiLU, RoPE + L2 norm of q/k, beta and decay
  from the layer input, the delta rule; the conv window and the float32 recurrent state updated in place;
* a layer with both: ``kernels/hybrid_decode`` (``hybrid_decode_step``) runs the two in two launches, as many as
  the FA heads alone take.

With the fusion norm each kernel applies the layer's epilogue to its own heads (RMS norm, ``gamma_h``, and the
sigmoid gate on FA heads), so the output is final; without it the caller gates and returns it.
"""

from __future__ import annotations

import itertools

import torch

from headscope.hybrid.static_cache import HybridStaticCache
from headscope.kernels.fa_decode.ops import decode_attention
from headscope.kernels.gdn_decode.ops import gdn_decode_step
from headscope.kernels.hybrid_decode.ops import hybrid_decode_step


def static_decode_step(layer, x, q, k, v, gate, position_embeddings, position_ids, cache: HybridStaticCache) -> torch.Tensor:
    """The per-head outputs ``(B, 1, H, D)`` of one decode token (module docstring).

    Args:
        layer: the ``HeadwiseHybridAttention``.
        x: ``(B, 1, hidden)`` layer input (the GDN heads' beta and decay).
        q: ``(B, 1, H, D)``; k, v: ``(B, 1, n_fa_kv + n_gdn, D)``; gate: the FA heads' gate logits or None.
        position_embeddings: ``(cos, sin)``, each ``(B, 1, D)``; position_ids: ``(B, 1)``.
        cache: the static cache (FA keys/values, GDN windows and states of every layer).
    Returns:
        The output, with the epilogue applied when the layer has the fusion norm.
    """
    spec = layer.spec
    batch = x.shape[0]
    q_fa, q_gdn = q.split_with_sizes((spec.n_fa_heads, spec.n_gdn_heads), dim=2)
    k_fa, k_gdn = k.split_with_sizes((spec.n_fa_kv_heads, spec.n_gdn_heads), dim=2)
    v_fa, v_gdn = v.split_with_sizes((spec.n_fa_kv_heads, spec.n_gdn_heads), dim=2)
    o = q.new_empty(batch, 1, spec.n_heads, spec.head_dim)
    norm = spec.fusion_norm
    gamma_fa, gamma_gdn = (layer.gamma[: spec.n_fa_heads], layer.gamma[spec.n_fa_heads :]) if norm else (None, None)
    attention = delta = None
    if spec.n_fa_heads:
        attention = _fa_arguments(layer, q_fa, k_fa, v_fa, position_embeddings, position_ids, cache,
                                  o[:, :, : spec.n_fa_heads], gamma_fa, gate if norm else None)
    if spec.n_gdn_heads:
        delta = _gdn_arguments(layer, x, q_gdn, k_gdn, v_gdn, position_embeddings, cache, o[:, :, spec.n_fa_heads :], gamma_gdn)
    if attention is not None and delta is not None:
        hybrid_decode_step(attention, delta)
    elif attention is not None:
        decode_attention(**attention)
    else:
        gdn_decode_step(**delta)
    return o


def _fa_arguments(layer, q, k, v, position_embeddings, position_ids, cache, out, gamma=None, gate=None) -> dict:
    """``decode_attention``'s arguments for the FA heads: q ``(B, 1, n_fa, D)``, k and v ``(B, 1, n_fa_kv, D)``, into
    ``out`` ``(B, 1, n_fa, D)``; with ``gamma`` (and ``gate``) the layer's epilogue on these heads too."""
    spec = layer.spec
    rope = tuple(t[:, -1] for t in position_embeddings) if spec.fa_rope else None  # (cos, sin), each (B, D)
    positions = position_ids[:, -1] if spec.log_scaling else None  # (B,), any stride (an expanded arange: 0)
    return dict(
        q=q, k_new=k, v_new=v, k_cache=cache.keys[layer.layer_idx], v_cache=cache.values[layer.layer_idx], valid=cache.valid,
        seen=cache.seen, q_offsets=(0, *itertools.accumulate(spec.fa_kv_sizes)), scale=spec.head_dim**-0.5, positions=positions,
        attn_scale=spec.attn_scale, floor_scale=spec.floor_scale, sliding_window=spec.sliding_window, rope=rope, out=out,
        device_offsets=cache.q_offsets[layer.layer_idx], gamma=gamma, gate=gate,
    )


def _gdn_arguments(layer, x, q, k, v, position_embeddings, cache, out, gamma=None) -> dict:
    """``gdn_decode_step``'s arguments for the GDN heads: q, k, v ``(B, 1, n_gdn, D)``, into ``out``
    ``(B, 1, n_gdn, D)``; with ``gamma`` the layer's epilogue on these heads too."""
    cos, sin = position_embeddings
    return dict(
        x=x[:, 0], q=q, k=k, v=v, conv_weight=layer.conv1d.weight.squeeze(1), conv_state=cache.conv_states[layer.layer_idx],
        cos=cos, sin=sin, b_weight=layer.b_proj.weight, a_weight=layer.a_proj.weight, A_log=layer.A_log, dt_bias=layer.dt_bias,
        state=cache.recurrent_states[layer.layer_idx], step_mask=cache.step_mask, scale=layer.spec.head_dim**-0.5, out=out,
        gamma=gamma,
    )
