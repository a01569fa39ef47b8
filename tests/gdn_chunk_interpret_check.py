"""Helper run by tests/test_kernels_gdn_chunk.py in a subprocess with TRITON_INTERPRET=1.

Runs headscope's fused chunk GDN kernels (``kernels/gdn/triton_chunk.py``) on CPU through the interpreter
and prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are
``{name, dtype, errors: {o, state}, wrote_into_out}``: relative RMS errors against the float32 token-by-token
reference (``naive_recurrent_gated_delta_rule``, gates from ``gdn_gates``) run on the same dtype-rounded
inputs. q, k, v are slices of wider rows, and the output goes into a NaN-filled strided buffer, so an
element the kernels do not write is an infinite error; the final state goes into the initial state itself
(updated in place, as a static cache's) or, without one, into a NaN-filled buffer. One more case runs a hybrid layer through the
dispatchers with every Triton path forced (as on CUDA without autograd) against the layer on its CPU paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_interpreter import cases_in_dtypes, loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, B, T, H, K, V, block_v, raw gates, padding mask, initial state, log-decay scale (chunks of 64 tokens)
CASES = [
    ("raw_gates_mask_state", 2, 150, 3, 32, 48, 16, True, True, True, 1.0),  # V not a power of 2, 3 chunks, the last partial
    ("given_gates", 1, 150, 2, 16, 32, 32, False, False, False, 1.0),
    ("strong_decay_partial_chunk", 1, 12, 2, 16, 16, 16, False, False, True, 40.0),  # fewer tokens than one 16-row block
    ("weak_decay_state_chunks", 1, 200, 2, 32, 32, 16, False, False, True, 0.02),  # early tokens reach late block rows and chunks
    ("head_dim_128", 1, 80, 1, 128, 128, 32, True, False, False, 1.0),  # the Qwen3-1.7B tiles
]
# bf16 only: the Qwen3-1.7B tiles with everything on (float32 128-wide tiles are slow in the interpreter)
BF16_CASES = [("head_dim_128_mask_state", 2, 80, 1, 128, 128, 16, True, True, True, 1.0)]


def run_case(batch, length, heads, key_dim, value_dim, block_v, raw, with_mask, with_state, decay_scale, dtype, seed):
    from headscope.kernels.gdn.naive import naive_recurrent_gated_delta_rule
    from headscope.kernels.gdn.ops import gdn_gates
    from headscope.kernels.gdn.triton_chunk import triton_chunk_gated_delta_rule
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, length, heads + 1, 2 * key_dim + value_dim, generator=gen)
    q = F.normalize(wide[:, :, 1:, :key_dim], dim=-1).to(dtype)
    k = F.normalize(wide[:, :, :-1, key_dim : 2 * key_dim], dim=-1).to(dtype)
    v = wide[:, :, 1:, 2 * key_dim :].to(dtype)
    mask = None
    if with_mask:  # row 1 left-padded by 7 tokens, row 0 with one hole
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, :7] = 0
        mask[0, 40] = 0
    if raw:
        a, b = (torch.randn(batch, length, heads, generator=gen).to(dtype) for _ in range(2))
        A_log, dt_bias = torch.rand(heads, generator=gen).mul(16).log(), torch.randn(heads, generator=gen) - 2.0
        g, beta = gdn_gates(a.float(), b.float(), A_log, dt_bias, mask)
        decay, write, gates = a, b, {"A_log": A_log, "dt_bias": dt_bias, "input_mask": mask}
    else:
        g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen) + 2.0) * decay_scale
        g[:, : length // 4] = 0.0
        beta = torch.rand(batch, length, heads, generator=gen)
        decay, write, gates = g, beta.to(dtype), {}
    h0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen) * 0.3 if with_state else None
    scale = key_dim**-0.5
    want, want_state = naive_recurrent_gated_delta_rule(
        q.float(), k.float(), v.float(), g, write.float() if not raw else beta, scale=scale, initial_state=h0, output_final_state=True
    )
    out = torch.full((batch, length, heads, 2 * value_dim), float("nan"), dtype=dtype)[..., value_dim:]
    # the final state into the initial one (a static cache's state, in place) or into a NaN-filled buffer
    start = h0.clone() if h0 is not None else None
    final = start if start is not None else torch.full((batch, heads, key_dim, value_dim), float("nan"))
    got, state = triton_chunk_gated_delta_rule(
        q, k, v, decay, write, scale=scale, initial_state=start, output_final_state=True, out=out, final_state=final,
        block_v=block_v, **gates,
    )
    return {"errors": {"o": rel(got, want), "state": rel(state, want_state)},
            "wrote_into_out": got.data_ptr() == out.data_ptr() and state.data_ptr() == final.data_ptr()}


def layer_case() -> dict:
    """A hybrid layer (bf16, padded batch) through the dispatchers with every Triton path forced, as on CUDA
    without autograd (the prep kernel on the cached conv taps, the fused chunk kernels on the logits of the one
    cached GEMM, the epilogue reading the FA and GDN outputs in place), against the same layer in float32 on
    the CPU paths (and the bf16 layer on its CPU paths, for scale)."""
    from unittest import mock

    import headscope.kernels.epilogue.ops as epilogue_ops
    import headscope.kernels.gdn.ops as gdn_ops
    import headscope.kernels.gdn_prep.ops as prep_ops
    from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
    from headscope.kernels.epilogue import triton_epilogue
    from headscope.kernels.gdn_prep import triton_gdn_prep
    from headscope.kernels.metrics import relative_rms_error as rel

    torch.manual_seed(0)
    spec = HybridLayerSpec(hidden_size=48, head_dim=16, n_fa_heads=2, n_gdn_heads=3, fa_kv_sizes=(2,), qk_norm=True, floor_scale=32.0)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1 * torch.randn_like(param))
        x = torch.randn(2, 70, 48)
        pos = torch.arange(70)[None].expand(2, 70)
        angle = pos[..., None].float() * torch.linspace(0.05, 1.0, 8)
        rope = (torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1))
        mask = torch.ones(2, 70, dtype=torch.long)
        mask[1, :9] = 0
        want = layer(x, rope, pos, padding_mask=mask)
        layer, x, rope = layer.to(torch.bfloat16), x.to(torch.bfloat16), tuple(t.to(torch.bfloat16) for t in rope)
        cpu_bf16 = layer(x, rope, pos, padding_mask=mask)
        from headscope.kernels.gdn import triton_chunk

        calls = []

        def counted(module, name):
            real = getattr(module, name)
            return mock.patch.object(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

        with mock.patch.object(gdn_ops, "_use_fla", lambda q: True), mock.patch.object(prep_ops, "use_triton", lambda *a: True), \
                mock.patch.object(epilogue_ops, "use_triton", lambda o: True), counted(triton_chunk, "triton_chunk_gated_delta_rule"), \
                counted(triton_gdn_prep, "triton_short_conv_rope_l2norm"), counted(triton_epilogue, "triton_head_epilogue"):
            got = layer(x, rope, pos, padding_mask=mask)
    return {"name": "layer_through_dispatch", "dtype": "bfloat16", "errors": {"o": rel(got, want)}, "cpu_paths_error": rel(cpu_bf16, want),
            "triton_calls": sorted(calls)}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case) + [{"name": name, "dtype": "bfloat16", **run_case(*args, torch.bfloat16, 99)}
                                                             for name, *args in BF16_CASES] + [layer_case()], needs=loops_over_runtime_bounds)
