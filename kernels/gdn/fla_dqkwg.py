"""A torch stand-in for fla's ``chunk_bwd_dqkwg``, the one backward kernel fla 0.6 refuses on Hopper.

fla's chunked Gated DeltaNet backward is a sequence of Triton kernels. One of them,
``chunk_bwd_kernel_dqkwg``, gives wrong results when Triton >= 3.4.0 and < 3.7.1 compiles it for Hopper
(fla issue #640), so fla raises there unless tilelang is installed. Everything else in the backward is
fine. This module computes exactly what that kernel computes, with batched torch matmuls over all chunks
at once (no sequential dependency: every chunk is independent given the per-chunk states ``h`` and state
gradients ``dh`` that fla's other kernels produce), and registers it as an fla backend of the ``common``
operation, so fla's own ``chunk_gated_delta_rule`` backward runs with it in place of the broken kernel.

Per chunk of ``BT`` tokens (``g`` the chunk-local cumulative log2-decay fla hands the kernel, ``g_l`` its
value at the chunk's last token, ``h`` / ``dh`` the (K, V) state entering the chunk and its gradient)::

    dq  = (dO h^T) * exp2(g) * scale + dS K          dS = tril(dO V^T * exp2(g_i - g_j)) * scale
    dk  = (V dh^T) * exp2(g_l - g) + dS^T Q
    dw  = -(dV h^T)                                   (delta rule only: ``w`` given)
    dg  = rowsum(dq * Q) - rowsum(dk * K),  plus  exp2(g_l) <h, dh> + <dk_state, K>  on the last token

where ``dk_state`` is the first term of ``dk``; the reverse cumulative sum of ``dg`` stays with fla (a
separate kernel there too). Only the case fla's Gated DeltaNet uses is covered: gated (``g``), no
``g_gamma``, fixed-length sequences; the verifier hands every other call back to fla's kernel. The
arithmetic is float32; ``dq``/``dk``/``dw`` come back in q's / w's dtype and ``dg`` in float32 (as fla's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


UNCOVERED = "headscope's chunk_bwd_dqkwg covers gated, fixed-length calls only (g given, no g_gamma, no cu_seqlens)"


def covers(g: torch.Tensor | None, g_gamma: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether :func:`chunk_bwd_dqkwg` computes this call (else fla's own kernel must)."""
    return g is not None and g_gamma is None and cu_seqlens is None


def chunk_bwd_dqkwg(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    w: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    scale: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fla's ``chunk_bwd_dqkwg`` (same arguments, same results) for gated, fixed-length calls.

    Args:
        q, k: (B, T, H, K); v (the delta-corrected values), do, dv: (B, T, HV, V), HV a multiple of H.
        h, dh: (B * NT, HV, K, V) per-chunk states and their gradients ((.., V, K) with ``state_v_first``).
        w: (B, T, HV, K) or None; only its presence matters (``dw`` is computed when given).
        g: (B, T, HV) chunk-local cumulative log2-decay, float32.
        scale: query scale (default K ** -0.5).
    Returns:
        dq, dk: (B, T, H, K) in q's dtype; dw: like ``w`` or None; dg: (B, T, HV) float32, before fla's
        reverse cumulative sum.
    """
    if not covers(g, g_gamma, cu_seqlens):
        raise ValueError(UNCOVERED)
    batch, length, n_qk, key_dim = k.shape
    n_v = v.shape[2]
    group = n_v // n_qk
    scale = key_dim**-0.5 if scale is None else scale
    bt = chunk_size
    n_chunks = -(-length // bt)
    pad = n_chunks * bt - length

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, HV, *) -> (B, N, HV, BT, *) float32
        x = x.float()
        if x.shape[2] != n_v:
            x = x.repeat_interleave(group, dim=2)
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        return x.view(batch, n_chunks, bt, n_v, *x.shape[3:]).transpose(2, 3)

    q_c, k_c, v_c, do_c = chunks(q), chunks(k), chunks(v), chunks(do)  # (B, N, HV, BT, K|V)
    last = (torch.arange(n_chunks, device=g.device) * bt + bt).clamp(max=length) - 1  # (N,) last real token
    g_pad = torch.cat([g.float(), g.float()[:, -1:].expand(-1, pad, -1)], dim=1) if pad else g.float()
    g_c = g_pad.view(batch, n_chunks, bt, n_v).transpose(2, 3)  # (B, N, HV, BT)
    g_last = g.float()[:, last]  # (B, N, HV)
    states = h.float().view(batch, n_chunks, n_v, *h.shape[-2:])
    d_states = dh.float().view(batch, n_chunks, n_v, *dh.shape[-2:])
    if state_v_first:  # stored (V, K): bring to (K, V)
        states, d_states = states.transpose(-1, -2), d_states.transpose(-1, -2)

    dq = (do_c @ states.transpose(-1, -2)) * (g_c.exp2() * scale)[..., None]  # (B, N, HV, BT, K)
    dk_state = (v_c @ d_states.transpose(-1, -2)) * (g_last[..., None] - g_c).exp2()[..., None]  # (B, N, HV, BT, K)
    valid = torch.arange(n_chunks * bt, device=g.device).view(n_chunks, 1, bt) < length  # (N, 1, BT)
    dk_state = dk_state * valid[..., None]
    causal = torch.ones(bt, bt, dtype=torch.bool, device=g.device).tril()
    decay = (g_c[..., :, None] - g_c[..., None, :]).masked_fill(~causal, float("-inf")).exp2()  # (B, N, HV, BT, BT)
    ds = (do_c @ v_c.transpose(-1, -2)) * decay * scale
    dq = dq + ds @ k_c
    dk = dk_state + ds.transpose(-1, -2) @ q_c
    dg = (dq * q_c).sum(-1) - (dk * k_c).sum(-1)  # (B, N, HV, BT)
    dg_last = g_last.exp2() * (states * d_states).sum((-1, -2)) + (dk_state * k_c).sum((-1, -2))  # (B, N, HV)
    dg = dg.transpose(2, 3).reshape(batch, n_chunks * bt, n_v).clone()
    dg[:, last] += dg_last

    def unchunk(x: torch.Tensor) -> torch.Tensor:  # (B, N, HV, BT, D) -> (B, T, HV, D)
        return x.transpose(2, 3).reshape(batch, n_chunks * bt, n_v, x.shape[-1])[:, :length]

    dq, dk = unchunk(dq), unchunk(dk)
    if group > 1:
        dq = dq.view(batch, length, n_qk, group, key_dim).sum(3)
        dk = dk.view(batch, length, n_qk, group, key_dim).sum(3)
    dw = None
    if w is not None:
        dw = -unchunk(chunks(dv) @ states.transpose(-1, -2)).to(w.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dw, dg[:, :length]


_registered = False


def register_fla_backend() -> None:
    """Make fla's ``common`` operation use :func:`chunk_bwd_dqkwg` (before its own kernel and tilelang's).

    Called by ``headscope.kernels.gdn.ops`` only where fla refuses its kernel (Hopper, Triton in
    [3.4.0, 3.7.1), no tilelang); idempotent. The backend answers ``chunk_bwd_dqkwg`` alone: fla asks
    every backend of the operation for each of its functions and skips one that has no method of that name.
    """
    global _registered
    if _registered:
        return
    from fla.backends import BaseBackend, register

    class HeadscopeTorchBackend(BaseBackend):
        backend_type = "headscope_torch"
        priority = 1

        def chunk_bwd_dqkwg_verifier(self, *args, g=None, g_gamma=None, cu_seqlens=None, **kwargs) -> tuple[bool, str | None]:
            return (True, None) if covers(g, g_gamma, cu_seqlens) else (False, UNCOVERED)

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg(*args, **kwargs)

    register("common")(HeadscopeTorchBackend)
    _registered = True
