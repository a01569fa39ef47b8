"""Dispatcher of the fused Gated DeltaNet decode step: Triton on CUDA, the float32 torch reference elsewhere.

``gdn_decode_step(x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, A_log, dt_bias, state,
step_mask, scale=...)`` advances one GDN layer by one token with ``conv_state`` and ``state`` updated in
place (math in :mod:`.naive`).

* CUDA (unless ``triton_off()``), no gradient needed, D even and <= 256, float32/bf16/fp16
  projections: the single kernel of :mod:`.triton_gdn_decode` (no host synchronisation: capturable).
* Everything else: :func:`.naive.gdn_decode_reference` (float32 composition of the prep, beta/decay and
  recurrent references), then copied into ``out`` when one is given.

``triton_call(...)``: the checks and the choice alone (the Triton call's arguments, or None), for
``kernels/hybrid_decode``, which launches these heads' programs with the FA heads' split programs.

triton is imported only when the Triton path is taken, so ``import headscope.kernels`` works without it.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.gdn_decode.naive import gdn_decode_reference
from headscope.kernels.switch import triton_off

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def _check_inputs(x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, state, step_mask) -> None:
    def fail(what: str) -> None:
        raise HeadscopeError(f"gdn_decode_step: {what}")

    if q.dim() != 4 or q.shape[1] != 1 or k.shape != q.shape or v.shape != q.shape:
        fail(f"q, k, v must be (B, 1, H, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, _, heads, dim = q.shape
    channels = 3 * heads * dim
    if x.dim() != 2 or x.shape[0] != batch:
        fail(f"x must be (B, hidden) with B = {batch}; got {tuple(x.shape)}")
    if conv_weight.dim() != 2 or conv_weight.shape[0] != channels:
        fail(f"conv_weight must be (3*H*D, K) = ({channels}, K); got {tuple(conv_weight.shape)}")
    if tuple(conv_state.shape) != (batch, channels, conv_weight.shape[1]):
        fail(f"conv_state must be (B, 3*H*D, K) = {(batch, channels, conv_weight.shape[1])}; got {tuple(conv_state.shape)}")
    for name, w in (("b_weight", b_weight), ("a_weight", a_weight)):
        if tuple(w.shape) != (heads, x.shape[1]):
            fail(f"{name} must be (H, hidden) = {(heads, x.shape[1])}; got {tuple(w.shape)}")
    if tuple(state.shape) != (batch, heads, dim, dim) or state.dtype != torch.float32:
        fail(f"state must be float32 (B, H, D, D) = {(batch, heads, dim, dim)}; got {tuple(state.shape)} {state.dtype}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1:] != (1, dim):
            fail(f"{name} must be (B or 1, 1, D); got {tuple(table.shape)}")
    if step_mask is not None and tuple(step_mask.shape) != (batch,):
        fail(f"step_mask must be (B,) = ({batch},); got {tuple(step_mask.shape)}")


def use_triton(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    if not q.is_cuda or triton_off():
        return False
    if q.shape[-1] % 2 or q.shape[-1] > MAX_HEAD_DIM or q.dtype not in DTYPES:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors)))


def gdn_decode_step(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b_weight: torch.Tensor, a_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, step_mask: torch.Tensor | None = None,
    *, scale: float, eps: float = 1e-6, out: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One GDN decode step with the states updated in place (see :func:`.naive.gdn_decode_reference`).

    Args:
        as the reference; ``out``: ``(B, 1, H, D)`` to write the output into (any strides), or None;
        ``gamma``: ``(H,)``: also apply the hybrid layer's epilogue to these heads
        (``head_epilogue_reference(o, gamma, None, norm_eps)``; in the kernel on the Triton path), or None.
    Returns:
        ``(B, 1, H, D)`` in q's dtype (``out`` when given).
    """
    args = (x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, A_log, dt_bias, state, step_mask)
    call = triton_call(*args, scale=scale, eps=eps, out=out, gamma=gamma, norm_eps=norm_eps)
    if call is not None:
        from headscope.kernels.gdn_decode.triton_gdn_decode import triton_gdn_decode

        return triton_gdn_decode(**call)
    o = gdn_decode_reference(*args, scale=scale, eps=eps)
    if gamma is not None:  # the epilogue reads the output as stored (in q's dtype)
        o = head_epilogue_reference(o, gamma, None, norm_eps)
    return o if out is None else out.copy_(o)


def triton_call(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b_weight: torch.Tensor, a_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, step_mask: torch.Tensor | None = None,
    *, scale: float, eps: float = 1e-6, out: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> dict | None:
    """:func:`gdn_decode_step`'s input checks (one clear error) and choice of path: the keyword arguments of
    ``triton_gdn_decode`` when the Triton kernel serves the call, None when the reference does.
    ``kernels/hybrid_decode`` uses it to launch these heads' programs together with the FA heads'."""
    _check_inputs(x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, state, step_mask)
    if gamma is not None and tuple(gamma.shape) != (q.shape[2],):
        raise HeadscopeError(f"gdn_decode_step: gamma must be (H,) = ({q.shape[2]},); got {tuple(gamma.shape)}")
    if not use_triton(q, x, k, v, conv_weight, b_weight, a_weight, A_log, dt_bias, *((gamma,) if gamma is not None else ())):
        return None
    return dict(x=x, q=q, k=k, v=v, conv_weight=conv_weight, conv_state=conv_state, cos=cos, sin=sin, b_weight=b_weight,
                a_weight=a_weight, A_log=A_log, dt_bias=dt_bias, state=state, step_mask=step_mask, scale=scale, eps=eps, out=out,
                gamma=gamma, norm_eps=norm_eps)
