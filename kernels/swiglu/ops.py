"""Dispatcher of the gated MLP's activation: ``swiglu(gate, up)`` = ``silu(gate) * up`` (:mod:`.naive`).

* CUDA (unless ``triton_off()`` or ``FUSED`` is off), no gradient needed, gate and up of one shape and
  dtype (float32, bfloat16 or float16): the one-launch Triton kernel of :mod:`.triton_swiglu` (eager torch: two).
  Same roundings as the reference; Triton's ``exp`` may differ from torch's in the last float32 bit, so a bf16
  output can differ from it by one unit in the last place.
* Everything else (training, CPU): the reference, bit-identical to the MLP's ``act_fn(gate) * up``.

``FUSED`` (default on) is read at each call; ``HEADSCOPE_FUSED_SWIGLU=0`` turns it off at import. triton is
imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import os

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.swiglu.naive import swiglu_reference
from headscope.kernels.switch import triton_off

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED = os.environ.get("HEADSCOPE_FUSED_SWIGLU", "1") != "0"


def use_triton(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether :func:`swiglu` takes the Triton path for these inputs (module docstring)."""
    if not (FUSED and gate.is_cuda) or triton_off():
        return False
    if gate.dtype not in TRITON_DTYPES or up.dtype != gate.dtype:
        return False
    return not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``.

    Args:
        gate, up: ``(..., I)`` of one shape.
    Returns:
        ``(..., I)``.
    """
    if gate.shape != up.shape:
        raise HeadscopeError(f"swiglu: gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if use_triton(gate, up):
        from headscope.kernels.swiglu.triton_swiglu import triton_swiglu

        return triton_swiglu(gate, up)
    return swiglu_reference(gate, up)
