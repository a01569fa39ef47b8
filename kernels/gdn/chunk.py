"""Pure-torch chunked Gated DeltaNet (WY / UT-transform form) and a recurrent step for decode.

The sequence is cut into chunks of C = 64 tokens (padded with inert tokens: k = q = v = 0, beta = 0,
g = 0, which leave the state untouched). Inside a chunk, with local cumulative log-decays
``c_t = g_1 + ... + g_t``, decay matrix ``Gamma_ij = exp(c_i - c_j)`` for i >= j (0 above the
diagonal) and chunk-start state S0, the delta-rule corrections of the C tokens solve one
unit-lower-triangular system (the UT transform)::

    (I + strict_lower(diag(beta) K K^T * Gamma)) Delta = diag(beta) V - diag(beta exp(c)) K S0
    =>  Delta = U - W S0,   U = A diag(beta) V,   W = A diag(beta exp(c)) K,   A = (I + ...)^-1

U and W do not depend on the state, so they are computed for all chunks at once; only the
(K, V) state is carried sequentially from chunk to chunk::

    O     = diag(exp(c)) Q S0 + (Q K^T * Gamma) Delta           # Q already scaled
    S_end = exp(c_C) S0 + (K * exp(c_C - c))^T Delta

This is fla's ``naive_chunk_gated_delta_rule`` with the triangular inverse done by
``torch.linalg.solve_triangular`` instead of a row loop, and the decay matrix masked before the
exponential (no inf * 0 in the backward). Everything runs in float32 and is differentiable through
autograd, including with respect to the initial state. ``recurrent_step`` is the token-by-token form
used for decode (T == 1, or a few tokens) on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in float32 (any T; T need not be a multiple of ``chunk_size``).

    Args:
        q: queries (B, T, H, K), already L2-normalised by the caller.
        k: keys (B, T, H, K), already L2-normalised by the caller.
        v: values (B, T, H, V).
        g: log-decay (B, T, H), <= 0.
        beta: write strength (B, T, H).
        scale: query scale; defaults to K ** -0.5.
        initial_state: (B, H, K, V) state before the first token (cast to float32), or None for zeros.
        output_final_state: return the state after the last token.
        chunk_size: tokens per chunk.

    Returns:
        o: (B, T, H, V) in q's dtype.
        final_state: (B, H, K, V) float32, or None when ``output_final_state`` is False.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if scale is None:
        scale = key_dim**-0.5
    pad = (-length) % chunk_size
    n_chunks = (length + pad) // chunk_size

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, *) -> (B, H, N, C, *)
        x = x.float().transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(batch, heads, n_chunks, chunk_size, *x.shape[3:])

    q_c, k_c, v_c = to_chunks(q) * scale, to_chunks(k), to_chunks(v)  # (B, H, N, C, K|V)
    g_c, beta_c = to_chunks(g), to_chunks(beta)  # (B, H, N, C)

    cum_decay = g_c.cumsum(-1)  # c_t, (B, H, N, C)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    log_gamma = cum_decay[..., :, None] - cum_decay[..., None, :]  # c_i - c_j, (B, H, N, C, C)
    gamma = log_gamma.masked_fill(~causal, float("-inf")).exp()  # 0 above the diagonal

    # UT transform: A = (I + strict_lower(diag(beta) K K^T * Gamma))^-1, unit lower triangular.
    k_beta = k_c * beta_c[..., None]  # (B, H, N, C, K)
    interaction = ((k_beta @ k_c.transpose(-1, -2)) * gamma).tril(-1)  # (B, H, N, C, C)
    eye = torch.eye(chunk_size, dtype=interaction.dtype, device=q.device)
    ut_inverse = torch.linalg.solve_triangular(
        interaction + eye, eye.expand_as(interaction), upper=False, unitriangular=True
    )
    pseudo_values = ut_inverse @ (v_c * beta_c[..., None])  # U, (B, H, N, C, V)
    state_weights = ut_inverse @ (k_beta * cum_decay.exp()[..., None])  # W, (B, H, N, C, K)
    intra_scores = (q_c @ k_c.transpose(-1, -2)) * gamma  # causal (Q K^T * Gamma), (B, H, N, C, C)
    q_decayed = q_c * cum_decay.exp()[..., None]  # diag(exp(c)) Q, (B, H, N, C, K)
    key_decay_to_end = (cum_decay[..., -1:] - cum_decay).exp()  # exp(c_C - c_t), (B, H, N, C)
    k_to_end = (k_c * key_decay_to_end[..., None]).transpose(-1, -2)  # (B, H, N, K, C)
    chunk_decay = cum_decay[..., -1].exp()  # exp(c_C), (B, H, N)

    if initial_state is None:
        state = q_c.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.float()  # (B, H, K, V)
    outputs = []
    for n in range(n_chunks):
        delta = pseudo_values[:, :, n] - state_weights[:, :, n] @ state  # (B, H, C, V)
        outputs.append(q_decayed[:, :, n] @ state + intra_scores[:, :, n] @ delta)
        state = state * chunk_decay[:, :, n, None, None] + k_to_end[:, :, n] @ delta
    o = torch.stack(outputs, dim=2).reshape(batch, heads, n_chunks * chunk_size, value_dim)
    o = o[:, :, :length].transpose(1, 2)  # (B, T, H, V)
    return o.to(q.dtype), (state if output_final_state else None)


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence token by token (decode: T == 1, or a few tokens).

    Args:
        q: queries (B, T, H, K), already L2-normalised by the caller.
        k: keys (B, T, H, K), already L2-normalised by the caller.
        v: values (B, T, H, V).
        g: log-decay (B, T, H), <= 0.
        beta: write strength (B, T, H).
        state: (B, H, K, V) state before the first token (cast to float32), or None for zeros.
        scale: query scale; defaults to K ** -0.5.

    Returns:
        o: (B, T, H, V) in q's dtype.
        state: (B, H, K, V) float32 state after the last token.
    """
    batch, length, heads, key_dim = q.shape
    if scale is None:
        scale = key_dim**-0.5
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float32)
    state = state.float()
    q32, k32, v32 = q.float() * scale, k.float(), v.float()
    decay, beta32 = g.float().exp(), beta.float()  # (B, T, H)
    outputs = []
    for t in range(length):
        k_t = k32[:, t, :, None, :]  # (B, H, 1, K)
        state = state * decay[:, t, :, None, None]  # (B, H, K, V)
        delta = beta32[:, t, :, None, None] * (v32[:, t, :, None, :] - k_t @ state)  # (B, H, 1, V)
        state = state + k_t.transpose(-1, -2) @ delta
        outputs.append((q32[:, t, :, None, :] @ state)[:, :, 0])  # (B, H, V)
    return torch.stack(outputs, dim=1).to(q.dtype), state
