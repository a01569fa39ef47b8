"""Helper run by tests/test_kernels_fa_prefill.py in a subprocess with TRITON_INTERPRET=1.

Runs the one-launch causal prefill attention on CPU through the interpreter and prints one JSON line (see
``tests/triton_interpreter.py``) whose cases are ``{name, dtype, error, wrote_into_out, block_m}``: the relative
RMS error of the output against the float32 reference (same dtype-rounded inputs), whether the result is the
``out`` passed and the query tile the launcher chose. q is a head slice of a wider projection, k and v are
transposed views of ``(B, Tk, Hkv, D)`` projections (the layer's layouts) and the output goes into a NaN-filled
strided buffer, so an element the kernel does not write is an infinite error. A last case runs a hybrid layer with
its FA branch on the kernel against the same layer through SDPA.
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, B, FA query heads per KV head, D, T (queries), Tk (keys: Tk - T earlier positions), SMs the launcher
# sees (None: the H100/H200's 132; a few force the 128-row query tile), layout (None; "strided_out": the output's
# head dim strided; "cache": k/v slices of a longer cache buffer)
CASES = [
    ("one_group_three_tiles", 2, (2,), 32, 150, 150, None, None),
    ("uneven_groups_odd_dim", 1, (1, 3, 2), 24, 100, 100, None, None),
    ("later_chunk_past_keys", 2, (2, 2), 16, 70, 200, None, None),
    ("rows_128_tile", 1, (2,), 32, 300, 300, 4, None),
    ("one_query_row", 2, (1, 2), 16, 1, 33, None, None),
    ("short_block_inside_first_tile", 1, (3,), 64, 5, 9, None, None),
    ("head_dim_128", 1, (2,), 128, 130, 130, None, None),  # the Qwen3/SmolLM2 hybrids' heads (the compile check's config)
    ("head_dim_128_rows_128", 1, (2,), 128, 200, 200, 2, None),
    ("head_dim_256", 1, (1,), 256, 140, 140, 1, None),  # 64-row tiles whatever the grid (shared memory)
    ("output_head_dim_strided", 2, (1, 2), 16, 40, 40, None, "strided_out"),
    ("static_cache_slots", 2, (2, 1), 32, 50, 90, None, "cache"),  # k/v: slots [0, Tk) of a (B, Hkv, 160, D) buffer
]


def run_case(batch, groups, dim, length, key_len, n_sms, layout, dtype, seed):
    import headscope.kernels.fa_prefill.triton_fa_prefill as kernel
    import headscope.kernels.launch as launch_helpers
    from headscope.kernels.fa_prefill.naive import kv_heads_of, prefill_attention_reference
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    n_kv, n_q = len(groups), sum(groups)
    offsets = tuple(int(x) for x in torch.tensor((0,) + groups).cumsum(0))
    q = torch.randn(batch, length, n_q + 2, dim, generator=gen).to(dtype)[:, :, 1:-1]  # a head slice of a projection
    if layout == "cache":  # a HybridStaticCache's buffers, sliced to the tokens seen
        k, v = (torch.randn(batch, n_kv, 160, dim, generator=gen).mul(2).to(dtype)[:, :, :key_len] for _ in range(2))
    else:
        k, v = (torch.randn(batch, key_len, n_kv, dim, generator=gen).mul(2).to(dtype).transpose(1, 2) for _ in range(2))  # (B, Hkv, Tk, D) views
    want = prefill_attention_reference(q, k, v, offsets, scale=dim**-0.5)
    if layout == "strided_out":  # (B, T, Hq, D) with D's stride Hq
        out = torch.full((batch, length, dim, n_q), float("nan"), dtype=dtype).transpose(2, 3)
    else:
        out = torch.full((batch, length, n_q, 2 * dim), float("nan"), dtype=dtype)[..., dim:]
    kernel.sm_count = launch_helpers.sm_count if n_sms is None else (lambda device: n_sms)  # read by the launcher
    block_m = kernel.block_sizes(batch * n_q, length, dim, kernel.sm_count(q.device), q.element_size())[0]
    got = kernel.triton_prefill_attention(q, k, v, torch.tensor(kv_heads_of(offsets), dtype=torch.int32), scale=dim**-0.5, out=out)
    return {"error": rel(got, want), "wrote_into_out": got.data_ptr() == out.data_ptr(), "block_m": block_m}


def layer_case() -> dict:
    """A hybrid layer's core (3 FA heads on KV groups of 1 and 2, 2 GDN heads, log scaling past ``floor_scale``,
    float32) with its FA branch on the kernel (the dispatcher told it applies, as on CUDA) against the same
    core through SDPA: ``{name, dtype, error}``."""
    import headscope.kernels.fa_prefill.ops as prefill_ops
    from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
    from headscope.kernels.metrics import relative_rms_error as rel

    torch.manual_seed(0)
    spec = HybridLayerSpec(hidden_size=40, head_dim=16, n_fa_heads=3, n_gdn_heads=2, fa_kv_sizes=(1, 2), floor_scale=16.0)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.2 * torch.randn_like(param))
    length = 90
    x, pos = torch.randn(2, length, 40), torch.arange(length)[None].expand(2, -1)
    angle = pos[..., None].float() * torch.linspace(0.05, 1.0, 8)
    rope = (torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1))
    import headscope.kernels.fa_prefill.triton_fa_prefill as kernel

    calls, launcher = [], kernel.triton_prefill_attention
    with torch.no_grad():
        want = layer(x, rope, pos)
        prefill_ops.applies = lambda q, k, v: True
        kernel.triton_prefill_attention = lambda *args, **kwargs: calls.append(1) or launcher(*args, **kwargs)
        got = layer(x, rope, pos)
    return {"name": "layer_core_uneven_groups", "dtype": "float32", "error": rel(got, want), "kernel_calls": len(calls)}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case) + [layer_case()], needs=loops_over_runtime_bounds)  # the layer last: it patches
