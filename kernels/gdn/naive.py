"""Float32 recurrent reference of the Gated DeltaNet rule (Qwen3-Next / GDN paper form).

One token at a time, written the way the rule reads, per batch row and head::

    S_t = S_{t-1} * exp(g_t)                       # scalar log-decay g_t <= 0
    delta_t = beta_t * (v_t - S_t^T k_t)           # delta-rule correction, (V,)
    S_t = S_t + k_t delta_t^T                      # rank-one write, (K, V)
    o_t = S_t^T (q_t * scale)                      # read-out, (V,)

The state S is (K, V) per head and lives in float32. There is no L2 norm inside: callers normalise
q and k. This is the slow exact twin that the chunked torch path (:mod:`.chunk`) and fla's Triton
kernels are tested against; it is differentiable through autograd (no in-place writes), so it is also
the gradient reference. Same argument order as :func:`headscope.kernels.gdn.ops.gated_delta_rule`
(``g`` before ``beta``; note that fla's own ``naive_recurrent_gated_delta_rule`` takes beta first).
"""

from __future__ import annotations

import torch


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the gated delta rule token by token in float32.

    Args:
        q: queries (B, T, H, K), already L2-normalised by the caller.
        k: keys (B, T, H, K), already L2-normalised by the caller.
        v: values (B, T, H, V).
        g: log-decay (B, T, H), <= 0.
        beta: write strength (B, T, H), usually in (0, 1).
        scale: query scale; defaults to K ** -0.5.
        initial_state: (B, H, K, V) state before the first token (cast to float32), or None for zeros.
        output_final_state: return the state after the last token.

    Returns:
        o: (B, T, H, V) in q's dtype.
        final_state: (B, H, K, V) float32, or None when ``output_final_state`` is False.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if scale is None:
        scale = key_dim**-0.5
    q32, k32, v32 = q.float() * scale, k.float(), v.float()
    decay, beta32 = g.float().exp(), beta.float()  # (B, T, H)
    if initial_state is None:
        state = q32.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.float()
    outputs = []
    for t in range(length):
        q_t, k_t, v_t = q32[:, t], k32[:, t], v32[:, t]  # (B, H, K), (B, H, K), (B, H, V)
        state = state * decay[:, t, :, None, None]  # (B, H, K, V)
        prediction = torch.einsum("bhkv,bhk->bhv", state, k_t)  # S_t^T k_t, (B, H, V)
        delta = beta32[:, t, :, None] * (v_t - prediction)  # (B, H, V)
        state = state + k_t[..., :, None] * delta[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    o = torch.stack(outputs, dim=1) if outputs else v32.new_zeros(batch, 0, heads, value_dim)
    return o.to(q.dtype), (state if output_final_state else None)
