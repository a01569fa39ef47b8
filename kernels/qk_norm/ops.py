"""Dispatcher for the per-head RMSNorm of queries and keys (Qwen3's ``q_norm``/``k_norm``).

``qk_rms_norm(q, k, q_weight, k_weight, eps)`` = ``(head_rms_norm_reference(q, q_weight, eps),
head_rms_norm_reference(k, k_weight, eps))`` of :mod:`.naive`.

* CUDA (unless ``triton_off()`` or ``FUSED`` is off), no gradient needed, q/k/weights float32,
  bfloat16 or float16 with q, k of one dtype and the weights of that dtype: the one-launch Triton kernel
  of :mod:`.triton_qk_norm` (one read, one write of q and k; eager torch launches 8 kernels per tensor
  and moves ~9x the bytes: float32 copies, squares, products). Same roundings as the reference; the sum
  over D runs in another order, so a bf16 output can differ from it by one unit in the last place.
* Everything else (training, CPU): the reference, bit-identical to the layer's former module calls.

``FUSED`` (default on) is read at each call; the environment variable ``HEADSCOPE_FUSED_QK_NORM=0`` turns
it off at import (``benchmarks/gdn_prefill_speed.py`` times both). triton is imported only when the Triton
path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import os

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.qk_norm.naive import head_rms_norm_reference
from headscope.kernels.switch import triton_off

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED = os.environ.get("HEADSCOPE_FUSED_QK_NORM", "1") != "0"


def use_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> bool:
    """Whether :func:`qk_rms_norm` takes the Triton path for these inputs (module docstring)."""
    if not (FUSED and q.is_cuda) or triton_off():
        return False
    if q.dtype not in TRITON_DTYPES or len({q.dtype, k.dtype, q_weight.dtype, k_weight.dtype}) != 1:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight)))


def qk_rms_norm(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of every query and key head over D, each with its weight.

    Args:
        q: ``(B, T, Hq, D)``, k: ``(B, T, Hk, D)``; any strides (views of the projections).
        q_weight, k_weight: ``(D,)``.
        eps: added to the mean square.
    Returns:
        q, k normalised, in the promoted dtype of each and its weight (contiguous on the Triton path).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise HeadscopeError(f"qk_rms_norm: q and k must be (B, T, H, D) with one B, T, D; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q_weight.shape != (q.shape[-1],) or k_weight.shape != (q.shape[-1],):
        raise HeadscopeError(f"qk_rms_norm: the weights must be (D,) = ({q.shape[-1]},); got {tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    if use_triton(q, k, q_weight, k_weight):
        from headscope.kernels.qk_norm.triton_qk_norm import triton_qk_rms_norm

        return triton_qk_rms_norm(q, k, q_weight, k_weight, eps)
    return head_rms_norm_reference(q, q_weight, eps), head_rms_norm_reference(k, k_weight, eps)
