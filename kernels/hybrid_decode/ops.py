"""Dispatcher of a hybrid layer's decode step over both kinds of heads: two Triton launches on CUDA, the two
branches' own dispatchers elsewhere.

``hybrid_decode_step(attention, delta)`` takes the keyword arguments of ``kernels/fa_decode.ops.decode_attention``
(the FA heads) and of ``kernels/gdn_decode.ops.gdn_decode_step`` (the GDN heads) and does what the two calls do
(math in :mod:`.naive`): the KV cache, the conv window and the recurrent state updated in place, the outputs
written into their ``out`` (the layer passes the two slices of its per-head output).

* When both dispatchers would take their Triton path (each one's ``triton_call``: CUDA, no gradient, the
  shapes and dtypes its kernel serves): ``triton_hybrid_decode``, the FA split programs and the GDN programs
  in one launch, then the FA combine and GDN finish programs in another (:mod:`.triton_hybrid_decode`; no host
  synchronisation: capturable).
* Otherwise: ``decode_attention(**attention)`` then ``gdn_decode_step(**delta)``, each on its own path.

Both dispatchers' input checks run first either way (one clear error). triton is imported only when the
Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.fa_decode import ops as fa_ops
from headscope.kernels.gdn_decode import ops as gdn_ops


def hybrid_decode_step(attention: dict, delta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of a hybrid layer's FA heads (``attention``) and GDN heads (``delta``).

    Args:
        attention: keyword arguments of ``decode_attention`` (q ``(B, 1, Hq, D)``, the new key/value, the KV
            cache, ``valid``, ``seen``, ``q_offsets``, ``scale``, ``out``, ``gamma``, ``gate``...).
        delta: keyword arguments of ``gdn_decode_step`` (x ``(B, hidden)``, q/k/v ``(B, 1, H, D)``, the conv
            weight and window, cos/sin, the beta/decay weights, the state, ``scale``, ``out``, ``gamma``...).
    Returns:
        the FA heads' ``(B, 1, Hq, D)`` and the GDN heads' ``(B, 1, H, D)`` outputs (their ``out`` when given).
    """
    fa_call, gdn_call = fa_ops.triton_call(**attention), gdn_ops.triton_call(**delta)
    if attention["q"].device != delta["q"].device:
        raise HeadscopeError(f"hybrid_decode_step: both branches on one device; got {attention['q'].device} and {delta['q'].device}")
    if fa_call is not None and gdn_call is not None:
        from headscope.kernels.hybrid_decode.triton_hybrid_decode import triton_hybrid_decode

        return triton_hybrid_decode(fa_call, gdn_call)
    return fa_ops.decode_attention(**attention), gdn_ops.gdn_decode_step(**delta)
