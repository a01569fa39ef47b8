"""Torch reference of the gated MLP's activation (Llama, Mistral, Qwen2, Qwen3 families).

Hugging Face's ``LlamaMLP.forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn`` SiLU; the
part between the projections, op for op::

    out = silu(gate) * up        (silu's result rounded to the model's dtype, then the product rounded again)

This is the CPU and training path of :func:`headscope.kernels.swiglu.ops.swiglu`, bit-identical to the module's
two calls, and on float32 inputs the reference of the Triton kernel in :mod:`.triton_swiglu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (module docstring); ``gate`` and ``up`` ``(..., I)`` of one shape."""
    return F.silu(gate) * up
