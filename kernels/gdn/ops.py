"""Gated DeltaNet dispatcher: fla's Triton kernels on CUDA, the pure-torch paths on CPU.

``gated_delta_rule`` is the single entry point the hybrid layer calls. Routing:

==========  =====================================  ==========================================
device      prefill / training (T > 1, or grads)   decode (T == 1, no gradient needed)
==========  =====================================  ==========================================
CUDA        fla ``chunk_gated_delta_rule``         fla ``fused_recurrent_gated_delta_rule``
CPU         :func:`.chunk.chunk_gated_delta_rule`  :func:`.chunk.recurrent_step`
==========  =====================================  ==========================================

Short prefill on CUDA without gradients (T > 1, B·T <= ``FUSED_MAX_TOKENS``, K and V <= 128, bf16/fp16) takes
headscope's own two-launch chunk kernels instead (:mod:`.triton_chunk`: same algorithm and precision as fla, without
fla's three extra launches and its per-call Python). ``gated_delta_rule_from_logits`` is the layer's entry:
it takes the raw beta/decay logits, which that path turns into beta and g inside its first kernel (the
other paths compute them with :func:`gdn_gates`, ~11 eager ops on CUDA). The bound is on all tokens of
the call: the fused recurrence computes each chunk's output on its sequential path, which pays while
few programs run (batch 1: 112 for 14 heads) and costs once the grid fills the GPU, where fla's parallel
output kernel wins. ``FUSED_MAX_TOKENS = 8192`` is the measured bound (``benchmarks/gdn_prefill_speed.py``
on an H200, bf16, 14 heads of 128, ``benchmarks/results/gdn_prefill_speed.md``, 2026-12-03): the fused
kernels beat fla with the gates in torch at every size measured, batch 1 at 1K/2K/4K/8K tokens (0.124 /
0.196 / 0.327 / 0.547 ms against 0.563 / 0.650 / 0.647 / 0.716) and batch 8 x 1K (0.442 against 0.666:
B·T, not T, is the bound the data supports). Nothing above 8192 tokens was measured, and the fused scan
grows linearly with T while fla stays nearly flat, so the bound is not extrapolated. Rerun with the register-block
intra kernel (2026-12-04, same box): 0.154 / 0.179 / 0.288 / 0.467 ms at batch 1 x 1K-8K and 0.421 at batch 8 x 1K
against 0.986 / 1.002 / 0.927 / 0.935 and 1.453 for fla with the gates in torch; counting only GPU time fla is
ahead from 4K on (0.176 against 0.192 ms at 4K, 0.328 against 0.384 at 8K) and at batch 8 x 1K (0.256 against 0.278):
there fla's host time (~0.7 ms a call) is what the fused path saves, so the bound rests on host time, not on
the kernels' speed. The environment
variable ``HEADSCOPE_GDN_FUSED_MAX_TOKENS`` sets it at import (0 turns the fused path off).

fla's fused recurrent kernel has no backward, so a T == 1 call that needs gradients goes to the chunk
kernel. fla 0.6 refuses its chunk *backward* on Hopper GPUs with Triton >= 3.4.0 and < 3.7.1 (wrong
results in one kernel, ``chunk_bwd_dqkwg``, fla issue #640) unless tilelang is installed; there the
dispatcher registers :mod:`.fla_dqkwg`, a torch implementation of that one kernel, as an fla backend, and
fla's backward runs with it (the rest of fla's backward is unaffected). fla is imported lazily, only when
a CUDA tensor arrives, so ``import headscope.kernels`` works without triton or fla.
``triton_off()`` (``headscope.kernels.switch``: ``HEADSCOPE_NO_TRITON=1``, or inside a ``torch_paths`` block) forces the torch paths on CUDA too (slow; for debugging and exact references). fla arguments are always passed by keyword: the 5th positional argument of
``fused_recurrent_gated_delta_rule`` is ``gk``, not ``beta``.

States are float32 everywhere: ``initial_state`` is cast to float32 and ``final_state`` comes back as
(B, H, K, V) float32, whatever the dtype of q/k/v. The output o has q's dtype. fla gets q, k, v and beta in one dtype, the least precise of q, k, v (autocast can mix them).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from headscope.heads import HeadscopeError
from headscope.kernels.gdn.chunk import chunk_gated_delta_rule as torch_chunk_gated_delta_rule
from headscope.kernels.gdn.chunk import recurrent_step
from headscope.kernels.switch import triton_off

FLA_MAX_KEY_DIM = 256
FUSED_MAX_DIM = 128  # the fused kernels hold whole (chunk, K) and (chunk, V) tiles in registers
FUSED_MAX_TOKENS = int(os.environ.get("HEADSCOPE_GDN_FUSED_MAX_TOKENS", "8192"))  # most B·T for the fused path; 0 = off


def _use_fla(q: torch.Tensor) -> bool:
    return q.is_cuda and not triton_off()


def use_fused(q: torch.Tensor, v: torch.Tensor, needs_grad: bool) -> bool:
    """Whether a prefill of these inputs takes headscope's fused chunk kernels (module docstring)."""
    return (
        _use_fla(q) and not needs_grad and q.shape[1] > 1 and q.shape[0] * q.shape[1] <= FUSED_MAX_TOKENS
        and max(q.shape[-1], v.shape[-1]) <= FUSED_MAX_DIM and q.dtype in (torch.bfloat16, torch.float16)
    )


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise HeadscopeError(f"gated_delta_rule: q and k must both be (B, T, H, K); got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, length, heads, key_dim = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise HeadscopeError(f"gated_delta_rule: v must be (B, T, H, V) = ({batch}, {length}, {heads}, V); got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise HeadscopeError(f"gated_delta_rule: {name} must be (B, T, H) = {tuple(q.shape[:3])}; got {tuple(x.shape)}")
    if length == 0:
        raise HeadscopeError("gated_delta_rule: the sequence is empty (T == 0)")
    if initial_state is not None and initial_state.shape != (batch, heads, key_dim, v.shape[-1]):
        raise HeadscopeError(
            f"gated_delta_rule: initial_state must be (B, H, K, V) = {(batch, heads, key_dim, v.shape[-1])}; "
            f"got {tuple(initial_state.shape)}"
        )
    tensors = (q, k, v, g, beta) + ((initial_state,) if initial_state is not None else ())
    if len({x.device for x in tensors}) != 1:
        raise HeadscopeError(f"gated_delta_rule: inputs are on different devices: {sorted({str(x.device) for x in tensors})}")


def fla_backward_broken(triton_version: str, capability: tuple[int, int], has_tilelang: bool) -> bool:
    """True where fla 0.6 refuses its chunk backward: Hopper (sm_90), Triton in [3.4.0, 3.7.1), no tilelang."""
    parts = tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in triton_version.split(".")[:3])
    parts = parts + (0,) * (3 - len(parts))
    return capability[0] == 9 and (3, 4, 0) <= parts < (3, 7, 1) and not has_tilelang


@functools.cache
def _prepare_fla_backward(device: torch.device) -> None:
    """Where fla refuses its chunk backward, give it headscope's torch ``chunk_bwd_dqkwg`` (once per device:
    the version and capability checks stay off the per-layer training path)."""
    import importlib.util

    import triton

    capability = torch.cuda.get_device_capability(device)
    if fla_backward_broken(triton.__version__, capability, importlib.util.find_spec("tilelang") is not None):
        from headscope.kernels.gdn.fla_dqkwg import register_fla_backend

        register_fla_backend()


def kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The one dtype fla's kernels get for q, k, v and beta: the least precise of q, k, v.

    fla's Triton kernels need them in one dtype (``tl.dot`` refuses float32 x bfloat16). Under autocast
    they can differ: the projections come out in bfloat16 while RoPE with a float32 model's cos/sin
    tables makes q and k float32; the autocast dtype is the one the layer asked for.
    """
    return min((q.dtype, k.dtype, v.dtype), key=lambda dtype: torch.finfo(dtype).bits)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a sequence, on the fastest exact path for the device.

    Args:
        q: queries (B, T, H, K), L2-normalised over K by the caller.
        k: keys (B, T, H, K), L2-normalised over K by the caller.
        v: values (B, T, H, V).
        g: log-decay (B, T, H), <= 0 (e.g. ``-exp(A_log) * softplus(a + dt_bias)``).
        beta: write strength (B, T, H), usually ``sigmoid(b)``.
        scale: query scale; defaults to K ** -0.5.
        initial_state: (B, H, K, V) state to continue from (cast to float32), or None for zeros.
        output_final_state: also return the state after the last token.

    Returns:
        o: (B, T, H, V) in q's dtype.
        final_state: (B, H, K, V) float32, or None when ``output_final_state`` is False.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if initial_state is not None:
        initial_state = initial_state.float()
    needs_grad = _needs_grad(q, k, v, g, beta, initial_state)
    if use_fused(q, v, needs_grad):
        return _fused(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    return _unfused(q, k, v, g, beta, scale, initial_state, output_final_state, needs_grad)


def _fused(q, k, v, decay, write, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """headscope's two-launch chunk kernels (``use_fused``) on q, k, v in one dtype; o back in q's dtype."""
    from headscope.kernels.gdn.triton_chunk import triton_chunk_gated_delta_rule

    if q.dtype == k.dtype == v.dtype:  # the layer's case: no conversions
        return triton_chunk_gated_delta_rule(q, k, v, decay, write, **kwargs)
    dtype = kernel_dtype(q, k, v)
    o, state = triton_chunk_gated_delta_rule(q.to(dtype), k.to(dtype), v.to(dtype), decay, write, **kwargs)
    return o.to(q.dtype), state


def _unfused(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, needs_grad: bool):
    """``gated_delta_rule`` on checked inputs off the fused path: torch on the CPU, fla on CUDA."""
    decode = q.shape[1] == 1 and not needs_grad
    if not _use_fla(q):
        if decode:
            o, state = recurrent_step(q, k, v, g, beta, initial_state, scale=scale)
            return o, (state if output_final_state else None)
        return torch_chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )

    if q.shape[-1] > FLA_MAX_KEY_DIM:
        raise HeadscopeError(f"gated_delta_rule: fla supports head dims up to {FLA_MAX_KEY_DIM}; got K = {q.shape[-1]}")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError as exc:
        raise HeadscopeError(
            f"gated_delta_rule on CUDA needs flash-linear-attention (fla) and triton ({exc}); "
            "install them, or set HEADSCOPE_NO_TRITON=1 for the slow torch path"
        ) from exc
    if needs_grad:
        _prepare_fla_backward(q.device)
    kernel = fused_recurrent_gated_delta_rule if decode else chunk_gated_delta_rule
    dtype = kernel_dtype(q, k, v)
    o, state = kernel(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        g=g,
        beta=beta.to(dtype),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    return o.to(q.dtype), state


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, input_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GDN gates from their logits: ``g = -exp(A_log)·softplus(a + dt_bias)`` (float32) and
    ``beta = sigmoid(b)`` (b's dtype), both times ``input_mask`` ``(B, T)`` when given (a padded token is
    a no-op: no decay, no write).

    Args:
        a, b: ``(B, T, H)`` outputs of ``a_proj`` and ``b_proj``.
        A_log, dt_bias: ``(H,)``.
    Returns:
        g, beta: ``(B, T, H)``.
    """
    beta = torch.sigmoid(b)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    if input_mask is not None:
        beta = beta * input_mask.to(beta.dtype)[..., None]
        g = g * input_mask.to(g.dtype)[..., None]
    return g, beta


def gated_delta_rule_from_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    input_mask: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    final_state: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``gated_delta_rule`` with the gates given as logits (:func:`gdn_gates`): the hybrid layer's GDN call.

    On the fused path (``use_fused``) the gates are computed inside its first kernel; everywhere else
    :func:`gdn_gates` then :func:`gated_delta_rule`.

    Args:
        q, k, v, scale, initial_state, output_final_state: as :func:`gated_delta_rule`.
        a, b: ``(B, T, H)`` the decay and beta logits (``a_proj(x)``, ``b_proj(x)``).
        final_state: with ``output_final_state``, a contiguous float32 ``(B, H, K, V)`` to return the final state
            in, e.g. a static cache's state (it may be ``initial_state`` itself): the fused path's recurrence writes
            it there directly, the others copy into it. None: a new tensor.
        A_log, dt_bias: ``(H,)`` decay parameters.
        input_mask: ``(B, T)`` 1 for real tokens, 0 for padding (made no-ops), or None.
        check: validate the shapes and devices, ``final_state``'s too (False where the caller guarantees them: the hybrid layer's q,
            k, v come out of ``short_conv_rope_l2norm``, which checked them and the mask, a and b out of its
            own projections, and A_log, dt_bias and the state are its parameters and cache).
    Returns:
        As :func:`gated_delta_rule`.
    """
    if check:
        _check_inputs(q, k, v, a, b, initial_state)
        heads = q.shape[2]
        if A_log.shape != (heads,) or dt_bias.shape != (heads,):
            raise HeadscopeError(f"gated_delta_rule_from_logits: A_log and dt_bias must be (H,) = ({heads},); got {tuple(A_log.shape)}, {tuple(dt_bias.shape)}")
        if input_mask is not None and input_mask.shape != q.shape[:2]:
            raise HeadscopeError(f"gated_delta_rule_from_logits: input_mask must be (B, T) = {tuple(q.shape[:2])}; got {tuple(input_mask.shape)}")
        state_shape = (q.shape[0], heads, q.shape[3], v.shape[3])
        if final_state is not None and output_final_state and (
                final_state.dtype != torch.float32 or not final_state.is_contiguous() or final_state.device != q.device
                or final_state.shape != state_shape):
            raise HeadscopeError(f"gated_delta_rule_from_logits: final_state must be contiguous float32 (B, H, K, V) = {state_shape} "
                                 f"on {q.device}; got {final_state.dtype} {tuple(final_state.shape)} on {final_state.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if initial_state is not None:
        initial_state = initial_state.float()
    needs_grad = _needs_grad(q, k, v, a, b, A_log, dt_bias, initial_state)
    if use_fused(q, v, needs_grad):
        return _fused(q, k, v, a, b, scale=scale, A_log=A_log, dt_bias=dt_bias, input_mask=input_mask,
                      initial_state=initial_state, output_final_state=output_final_state, final_state=final_state)
    g, beta = gdn_gates(a, b, A_log, dt_bias, input_mask)
    o, state = _unfused(q, k, v, g, beta, scale, initial_state, output_final_state, needs_grad)
    if final_state is not None and state is not None:
        state = final_state.copy_(state)
    return o, state
