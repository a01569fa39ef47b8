"""Torch reference of the decoder layer's residual add + RMSNorm (Llama, Mistral, Qwen2, Qwen3 families).

A pre-norm block computes ``h = residual + x`` and then the family's ``RMSNorm`` of ``h`` over the hidden
size with a weight ``w`` (Hugging Face's ``LlamaRMSNorm`` / ``Qwen3RMSNorm``, op for op)::

    h = residual + x                                  (in the model's dtype, as the block's ``+``)
    hf = float32(h);   y = hf / sqrt(mean(hf^2) + eps);   out = w * y.to(h.dtype)

and returns ``(out, h)``: the norm feeds the next sub-block, ``h`` is the new residual stream. Without a
residual it is the plain norm of ``x`` (and returns ``x``). This is the CPU and training path of
:func:`headscope.kernels.rms_norm.ops.add_rms_norm`, bit-identical to the block's former ``+`` and module
call, and on float32 inputs the reference of the Triton kernel in :mod:`.triton_rms_norm`.
"""

from __future__ import annotations

import torch

from headscope.kernels.qk_norm.naive import head_rms_norm_reference


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w * rmsnorm(residual + x), residual + x)`` (module docstring).

    Args:
        x: ``(..., H)``.
        residual: ``(..., H)`` or None.
        weight: ``(H,)``.
        eps: added to the mean square.
    Returns:
        the normalised ``(..., H)`` and the sum ``(..., H)`` (``x`` itself without a residual).
    """
    h = x if residual is None else residual + x
    return head_rms_norm_reference(h, weight, eps), h
