"""Dispatcher for the GDN input preparation: conv + SiLU of q/k/v, then RoPE + L2 norm of q/k.

``short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state, input_mask, eps)`` computes what the
hybrid layer's GDN branch did in four steps (see :mod:`.naive` for the math): ``mixed = cat(q, k, v)``
(times the padding mask), ``short_conv`` (causal depthwise conv + SiLU, carrying the conv state),
unbind, then ``rope_l2norm`` on q and on k.

* CUDA (unless ``triton_off()``), no gradient needed (grad mode off or no input requiring
  one), q/k/v/cos/sin/weight float32, bfloat16 or float16 (q, k, v alike), D even: the one-pass Triton
  kernel of :mod:`.triton_gdn_prep` (prefill and decode alike). It reads the strided q, k, v once and
  writes contiguous outputs (no ``cat``); float32 math with one rounding, so in bf16 its numbers differ
  slightly from the composition's, which rounds after every stage. The new conv state (the last K
  inputs) is sliced from q, k, v in torch.
* Everything else (training, CPU, odd D, float64): the composition, with autograd: fla's
  ``causal_conv1d`` on CUDA unless ``triton_off()`` (:func:`short_conv`) and :func:`headscope.kernels.rope_norm.ops.rope_l2norm`
  (Triton forward and backward on CUDA). On CPU it is bit-identical to the layer's former code.

``short_conv_rope_l2norm_and_logits`` adds the GDN gate logits ``x @ W.T`` to the same Triton launch (the layer's
prefill at inference), ``F.linear`` elsewhere.

triton is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headscope.heads import HeadscopeError
from headscope.kernels.gdn_prep.naive import short_conv_reference, short_conv_rope_l2norm_reference
from headscope.kernels.rope_norm.ops import rope_l2norm
from headscope.kernels.switch import triton_off

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Logit rows the prep kernel takes in its launch: its (16, R) tile lives beside the prep's own (sm_90, D = 128, bf16: 126
# registers up to 128 rows, spills from 256); 64 GDN heads' [a; b] rows. More rows: F.linear.
MAX_FUSED_LOGIT_ROWS = 128


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.naive.short_conv_reference` with fla's Triton kernel on CUDA, unless ``triton_off()`` (same arguments
    and results)."""
    if not x.is_cuda or triton_off():
        return short_conv_reference(x, weight, state)
    from fla.modules.convolution import causal_conv1d

    y, final_state = causal_conv1d(  # fla reads the taps as contiguous (C, K); the layer's inference layout is not
        x, weight=weight.contiguous(), initial_state=state, output_final_state=True, activation="silu"
    )
    return y, final_state


def _check_inputs(q, k, v, weight, cos, sin, conv_state, input_mask, conv_state_out=None) -> None:
    """One ``HeadscopeError`` line for a bad shape or mixed devices; cheap when all is well (it runs at every
    prefill call of every GDN layer: shapes compared as sizes, devices pairwise, messages built only to fail)."""
    def fail(what: str) -> None:
        raise HeadscopeError(f"short_conv_rope_l2norm: {what}")

    shape = q.shape
    if len(shape) != 4 or k.shape != shape or v.shape != shape:
        fail(f"q, k, v must be (B, T, H, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, length, heads, dim = shape
    channels = 3 * heads * dim
    taps = weight.shape
    if len(taps) != 2 or taps[0] != channels or taps[1] < 1:
        fail(f"weight must be (3*H*D, K) = ({channels}, K); got {tuple(weight.shape)}")
    width = taps[1]
    if conv_state is not None and conv_state.shape != (batch, channels, width):
        fail(f"conv_state must be (B, 3*H*D, K) = {(batch, channels, width)}; got {tuple(conv_state.shape)}")
    if conv_state_out is not None and conv_state_out.shape != (batch, channels, width):
        fail(f"conv_state_out must be (B, 3*H*D, K) = {(batch, channels, width)}; got {tuple(conv_state_out.shape)}")
    if input_mask is not None and input_mask.shape != (batch, length):
        fail(f"input_mask must be (B, T) = {(batch, length)}; got {tuple(input_mask.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        rows = table.shape
        if len(rows) != 3 or rows[0] not in (1, batch) or rows[1] != length or rows[2] != dim:
            fail(f"{name} must be (B or 1, T, D) = ({batch} or 1, {length}, {dim}); got {tuple(table.shape)}")
    device = q.device
    if not (k.device == v.device == weight.device == cos.device == sin.device == device
            and (conv_state is None or conv_state.device == device) and (input_mask is None or input_mask.device == device)
            and (conv_state_out is None or conv_state_out.device == device)):
        tensors = [t for t in (q, k, v, weight, cos, sin, conv_state, input_mask, conv_state_out) if t is not None]
        fail(f"inputs are on different devices: {sorted({str(t.device) for t in tensors})}")


def use_triton(q, k, v, weight, cos, sin, conv_state=None) -> bool:
    """Whether :func:`short_conv_rope_l2norm` takes the Triton path for these inputs (module docstring)."""
    if not q.is_cuda or triton_off():
        return False
    if q.shape[-1] % 2 or len({q.dtype, k.dtype, v.dtype}) != 1:
        return False
    if any(t.dtype not in TRITON_DTYPES for t in (q, weight, cos, sin)):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, weight, cos, sin, conv_state)))


def short_conv_rope_l2norm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    conv_state: torch.Tensor | None = None, input_mask: torch.Tensor | None = None, eps: float = 1e-6,
    output_conv_state: bool = False, conv_state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv + SiLU of q, k, v; RoPE (HF rotate-half) + unit L2 norm of q and k.

    Args:
        q, k, v: GDN queries, keys, values ``(B, T, H, D)``; any strides (the layer passes slices of
            the projection outputs).
        weight: ``(3·H·D, K)`` depthwise conv taps, channels in ``cat(q, k, v)`` order (q, k, v; each
            head-major, then D); tap ``K - 1`` multiplies the current token.
        cos, sin: ``(B or 1, T, D)`` from the base model's rotary module, shared by the heads.
        conv_state: ``(B, 3·H·D, K)`` the ``K`` conv inputs before this chunk (a cache), or None.
        input_mask: ``(B, T)`` 1 for real tokens, 0 for padding (zeroes their conv input), or None.
        eps: added to the sum of squares before the square root (fla's ``l2norm``: 1e-6).
        output_conv_state: also return the new conv state (the last ``K`` inputs).
        conv_state_out: with ``output_conv_state``, a ``(B, 3·H·D, K)`` tensor to return it in (a static cache's
            window; it may be ``conv_state`` itself): the Triton pass stores it there, the composition copies
            into it. None: a new tensor.
    Returns:
        q, k ``(B, T, H, D)`` unit-norm rows, v ``(B, T, H, D)`` (contiguous on the Triton path), and the
        new conv state ``(B, 3·H·D, K)`` in q's dtype, or None unless ``output_conv_state``.
    """
    _check_inputs(q, k, v, weight, cos, sin, conv_state, input_mask, conv_state_out if output_conv_state else None)
    if not use_triton(q, k, v, weight, cos, sin, conv_state):
        q_out, k_out, v_out, new_state = short_conv_rope_l2norm_reference(
            q, k, v, weight, cos, sin, conv_state, input_mask, eps, conv=short_conv, rope_norm=rope_l2norm
        )
        if output_conv_state and conv_state_out is not None:
            new_state = conv_state_out.copy_(new_state)
        return q_out, k_out, v_out, new_state if output_conv_state else None
    return _triton_prep(q, k, v, weight, cos, sin, conv_state, input_mask, eps, output_conv_state, conv_state_out)


def _triton_prep(q, k, v, weight, cos, sin, conv_state, input_mask, eps, output_conv_state, conv_state_out, logits=None):
    """The Triton pass of :func:`short_conv_rope_l2norm` (``logits``: the launcher's ``(x, w, out)``, or None)."""
    from headscope.kernels.gdn_prep.triton_gdn_prep import triton_short_conv_rope_l2norm

    new_state = None
    if output_conv_state:  # stored by the kernel (``next_conv_state`` is its reference)
        new_state = conv_state_out if conv_state_out is not None else q.new_empty(q.shape[0], weight.shape[0], weight.shape[1])
    q_out, k_out, v_out = triton_short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state, input_mask, eps, state_out=new_state,
                                                        logits=logits)
    return q_out, k_out, v_out, new_state


def short_conv_rope_l2norm_and_logits(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    x: torch.Tensor, logit_weight: torch.Tensor, conv_state: torch.Tensor | None = None, input_mask: torch.Tensor | None = None,
    eps: float = 1e-6, output_conv_state: bool = False, conv_state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`short_conv_rope_l2norm` and the GDN gate logits ``x @ logit_weight.T`` ``(B, T, R)``, in one launch on
    the Triton path (the kernel's first program of each token block computes its tokens' logits), else ``F.linear``.

    Args:
        as :func:`short_conv_rope_l2norm`; ``x``: ``(B, T, hidden)`` the layer input; ``logit_weight``: ``(R, hidden)``
        (the layer's stacked ``[a_proj; b_proj; zeros]``, ``headscope.hybrid.inference_weights``). The logits are
        fused when x and the weight have q's dtype and device, x's rows and the weight are contiguous, the weight has
        at most ``MAX_FUSED_LOGIT_ROWS`` rows, there are heads, and neither needs a gradient; otherwise, and off the
        Triton path, they come from ``F.linear`` (the same numbers up to the summation order).
    Returns:
        q, k, v, the new conv state or None, and the logits ``(B, T, R)`` with contiguous rows.
    """
    batch, length = q.shape[:2]
    if x.shape[:2] != (batch, length) or x.dim() != 3 or logit_weight.dim() != 2 or logit_weight.shape[1] != x.shape[2]:
        raise HeadscopeError(f"short_conv_rope_l2norm_and_logits: x must be (B, T, hidden) = ({batch}, {length}, hidden) and the "
                             f"weight (R, hidden); got {tuple(x.shape)}, {tuple(logit_weight.shape)}")
    fused = (use_triton(q, k, v, weight, cos, sin, conv_state) and x.dtype == logit_weight.dtype == q.dtype
             and x.device == logit_weight.device == q.device and x.stride(-1) == 1 and logit_weight.is_contiguous()
             and 0 < logit_weight.shape[0] <= MAX_FUSED_LOGIT_ROWS and q.shape[2] > 0  # (no heads: no program computes them)
             and not (torch.is_grad_enabled() and (x.requires_grad or logit_weight.requires_grad)))
    if not fused:
        prep = short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state=conv_state, input_mask=input_mask, eps=eps,
                                      output_conv_state=output_conv_state, conv_state_out=conv_state_out)
        return (*prep, F.linear(x, logit_weight))
    _check_inputs(q, k, v, weight, cos, sin, conv_state, input_mask, conv_state_out if output_conv_state else None)
    logits = x.new_empty(batch, length, logit_weight.shape[0])
    return (*_triton_prep(q, k, v, weight, cos, sin, conv_state, input_mask, eps, output_conv_state, conv_state_out,
                          (x, logit_weight, logits)), logits)
