"""Float32 torch reference of one decode step of a hybrid layer's FA and GDN heads together.

The step is the two branches' steps, independent of each other (they read and write disjoint tensors): the FA
heads' :func:`headscope.kernels.fa_decode.naive.decode_attention_reference` (the new token into the KV cache,
attention over the tokens seen) and the GDN heads' :func:`headscope.kernels.gdn_decode.naive.gdn_decode_reference`
(conv window and recurrent state updated in place), each followed by the hybrid layer's epilogue on its heads
when ``gamma`` is given (:func:`headscope.kernels.epilogue.naive.head_epilogue_reference`, on the output
rounded to q's dtype, as the kernels read it). :mod:`.triton_hybrid_decode` runs both in two launches.
"""

from __future__ import annotations

import torch

from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.fa_decode.naive import decode_attention_reference
from headscope.kernels.gdn_decode.naive import gdn_decode_reference

_NOT_OF_THE_REFERENCES = ("out", "device_offsets", "gamma", "gate", "norm_eps")


def hybrid_decode_reference(attention: dict, delta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches' decode steps in float32.

    Args:
        attention: the keyword arguments of ``kernels/fa_decode.ops.decode_attention`` (its ``out`` and
            ``device_offsets`` are not read).
        delta: those of ``kernels/gdn_decode.ops.gdn_decode_step`` (its ``out`` is not read).
    Returns:
        the FA heads' ``(B, 1, Hq, D)`` and the GDN heads' ``(B, 1, H, D)`` outputs in float32 (after the
        epilogue where ``gamma`` is given); the caches and states updated in place.
    """
    fa = {key: value for key, value in attention.items() if key not in _NOT_OF_THE_REFERENCES}
    gdn = {key: value for key, value in delta.items() if key not in _NOT_OF_THE_REFERENCES}
    o_fa, o_gdn = decode_attention_reference(**fa), gdn_decode_reference(**gdn)
    if attention.get("gamma") is not None:
        o_fa = head_epilogue_reference(o_fa.to(attention["q"].dtype).float(), attention["gamma"], attention.get("gate"),
                                       attention.get("norm_eps", 1e-6))
    if delta.get("gamma") is not None:
        o_gdn = head_epilogue_reference(o_gdn.to(delta["q"].dtype).float(), delta["gamma"], None, delta.get("norm_eps", 1e-6))
    return o_fa, o_gdn
