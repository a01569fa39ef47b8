"""Section ``gdn_prep`` of ``benchmarks/gpu_kernel_check.py``: the fused GDN input preparation.

Correctness: :func:`headscope.kernels.gdn_prep.ops.short_conv_rope_l2norm` (the Triton path on CUDA; the
kernel under the interpreter on CPU) against the float32 torch composition on the same dtype-rounded
inputs, for q, k, v and the new conv state, with q/k/v sliced from wider projection outputs as in the
layer, with and without a conv state and a padding mask, in fp32/bf16/fp16, and chunked (prefill, one
decode step, a second chunk, the state carried) against one pass; the former bf16 composition's own error
for comparison.

Timing at B=1, T=131072, H=14, D=128 bf16 (the 7:1 hybrid's GDN heads): the fused kernel (default
tiling, then a sweep of tilings) vs today's composition (``cat`` + fla ``causal_conv1d`` + two
``rope_l2norm``), GB/s over the fused minimum (read q, k, v, cos, sin; write q, k, v); then the whole GDN
branch ``HeadwiseHybridAttention._gated_delta`` (prep, beta/g, ``gated_delta_rule``) with each prep and
the chunk kernel alone; then one decode step at B=32.
"""

from __future__ import annotations

import traceback
from unittest import mock

import torch

import headscope.hybrid.layer as layer_module
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.kernels.gdn.ops import gated_delta_rule
from headscope.kernels.gdn_prep.naive import short_conv_rope_l2norm_reference
from headscope.kernels.gdn_prep.ops import short_conv, short_conv_rope_l2norm, use_triton
from headscope.kernels.gdn_prep.triton_gdn_prep import Tiling, default_tiling, triton_short_conv_rope_l2norm
from headscope.kernels.metrics import relative_rms_error as rel
from headscope.kernels.rope_norm.ops import rope_l2norm

SWEEP = [Tiling(8, 1, 4), Tiling(16, 1, 4), Tiling(32, 1, 4), Tiling(32, 1, 8), Tiling(16, 2, 8), Tiling(8, 2, 4)]


def composition(q, k, v, weight, cos, sin, conv_state=None, input_mask=None, eps=1e-6, output_conv_state=False, conv_state_out=None):
    """Today's unfused path (the dispatcher's training path), also at inference: cat, conv, RoPE + norm x2 (the new
    state copied into ``conv_state_out`` when given, as the dispatcher does)."""
    q, k, v, state = short_conv_rope_l2norm_reference(
        q, k, v, weight, cos, sin, conv_state, input_mask, eps, conv=short_conv, rope_norm=rope_l2norm
    )
    if output_conv_state and conv_state_out is not None:
        state = conv_state_out.copy_(state)
    return q, k, v, state if output_conv_state else None


def prep_inputs(batch, length, heads, dim, dtype, device, seed, cos_batch=1):
    """q, k, v ``(B, T, H, D)`` as the layer's GDN slices of the q/k/v projections (2 FA query heads and 1
    FA KV head before them), conv taps, HF rotary tables, a conv state and a padding mask (last 5% zero)."""
    gen = torch.Generator().manual_seed(seed)
    q_all = torch.randn(batch, length, heads + 2, dim, generator=gen).to(device, dtype)
    k_all, v_all = (torch.randn(batch, length, heads + 1, dim, generator=gen).to(device, dtype) for _ in range(2))
    weight = (torch.randn(3 * heads * dim, 4, generator=gen) * 0.5).to(device, dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angle = (torch.arange(length).float()[:, None] + 3.0 * torch.arange(cos_batch).float()[:, None, None]) * inv_freq
    angle = torch.cat((angle, angle), dim=-1)  # (cos_batch, T, D)
    state = torch.randn(batch, 3 * heads * dim, 4, generator=gen).to(device, dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[:, : length // 20] = 0
    args = (q_all[:, :, 2:], k_all[:, :, 1:], v_all[:, :, 1:], weight, angle.cos().to(device, dtype), angle.sin().to(device, dtype))
    return args, state, mask


def fused_prep(q, k, v, weight, cos, sin, conv_state=None, input_mask=None, output_conv_state=False):
    """The dispatcher on CUDA; on CPU the Triton kernel itself (interpreted), the new conv state stored by it too."""
    if q.is_cuda:
        return short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state, input_mask, output_conv_state=output_conv_state)
    state = q.new_empty(q.shape[0], weight.shape[0], weight.shape[1]) if output_conv_state else None
    return (*triton_short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state, input_mask, state_out=state), state)


def check_case(harness, device, case, args, state, mask) -> None:
    """Errors of the fused prep, of the former composition and of a chunked run (prefill, one decode step,
    the rest, the state carried) against the float32 composition in one pass."""
    if device == "cuda" and not use_triton(*args, state):
        raise RuntimeError("the dispatcher would not take the Triton path on CUDA")
    dtype, length = args[0].dtype, args[0].shape[1]
    tol = 1e-5 if dtype == torch.float32 else 0.008
    want = short_conv_rope_l2norm_reference(*(t.float() if t is not None else None for t in (*args, state)), mask)
    with torch.no_grad():
        results = {case: fused_prep(*args, state, mask), f"{case} former composition": composition(*args, state, mask)}
        if length >= 3:
            pieces, carried = [], state
            for part in (slice(0, length // 2), slice(length // 2, length // 2 + 1), slice(length // 2 + 1, length)):
                sliced = [t[:, part] for t in args[:3]] + [args[3]] + [t[:, part] for t in args[4:]]
                *out, carried = fused_prep(*sliced, carried, mask[:, part], output_conv_state=True)
                pieces.append(out)
            results[f"{case} chunked+decode"] = [torch.cat(outs, dim=1) for outs in zip(*pieces)]
            harness.record("gdn_prep", f"{case} chunked+decode", "state", rel(carried, want[3].to(dtype)), 0.0)
    for label, got in results.items():
        for name, actual, expected in zip("qkv", got, want):
            harness.record("gdn_prep", label, name, rel(actual, expected), tol)


def time_rows(harness, device, tiny, row: dict, impls: dict, moved: int | None = None) -> None:
    """Time each ``impls[name]()`` without autograd; record ``row`` with its impl, ms and GB/s (over
    ``moved`` bytes, when given) in the harness's timings, and print it."""
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                ms = harness.timed_ms(fn, device, reps=3 if tiny else 20)
            gbps = moved / ms / 1e6 if moved else float("nan")
            harness.TIMINGS.append(dict(row, impl=name, fwd_ms=ms, fwd_GBps=gbps))
            print(f"  {row['config']} B{row['B']} T{row['T']} {name:<52} {ms:9.4f} ms ({gbps:7.1f} GB/s)", flush=True)
        except Exception:
            harness.FAILURES.append(f"timing {row['config']} {name}")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()


def time_prep(harness, device, tiny) -> None:
    """The fused kernel (default tiling and the sweep) vs the composition, at the 128K prefill shape."""
    batch, length, heads, dim = (1, 64, 2, 32) if tiny else (1, 131072, 14, 128)
    args, _, _ = prep_inputs(batch, length, heads, dim, torch.bfloat16, device, 0)
    moved = (6 * args[0].numel() + 2 * args[4].numel()) * 2  # read q, k, v, cos, sin; write q, k, v (bf16)
    label = lambda t: f"triton {t.block_t} tokens x {t.block_h} heads, {t.num_warps} warps"  # noqa: E731
    impls = {f"{label(default_tiling(length, heads, dim))} (default)": lambda: triton_short_conv_rope_l2norm(*args),
             "composition (cat + fla conv + rope_l2norm x2)": lambda: composition(*args)}
    for tiling in SWEEP if not tiny else SWEEP[:1]:
        impls[label(tiling)] = lambda tiling=tiling: triton_short_conv_rope_l2norm(*args, tiling=tiling)
    time_rows(harness, device, tiny, dict(config="gdn_prep prefill", B=batch, T=length, H=heads, D=dim), impls, moved)


def time_branch(harness, device, tiny, batch: int, length: int, decode: bool) -> None:
    """``_gated_delta`` of a 2 FA + 14 GDN layer (hidden 2048) with the fused prep and with the composition,
    and ``gated_delta_rule`` alone; ``decode``: one token against a conv window and recurrent state."""
    from hybrid_speed import SlotCache  # same directory (sys.path[0] of gpu_kernel_check.py)

    hidden, heads, dim = (64, 2, 32) if tiny else (2048, 14, 128)
    spec = HybridLayerSpec(hidden_size=hidden, head_dim=dim, n_fa_heads=2, n_gdn_heads=heads, fa_kv_sizes=(2,), qk_norm=True)
    dtype = torch.bfloat16
    with torch.device(device):
        layer = HeadwiseHybridAttention(spec, 0).to(dtype).eval()
    args, _, _ = prep_inputs(batch, length, heads, dim, dtype, device, 1)
    x = torch.randn(batch, length, hidden, device=device, dtype=dtype)
    cache = SlotCache(spec, batch, 0, device, dtype) if decode else None
    g = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, device=device))
    beta = torch.rand(batch, length, heads, device=device, dtype=dtype)
    with torch.no_grad():
        q, k, v, _ = short_conv_rope_l2norm(*args)
    branch = lambda: layer._gated_delta(x, *args[:3], args[4:6], cache, None)  # noqa: E731
    row = dict(config=f"gdn_branch {'decode' if decode else 'prefill'}", B=batch, T=length, H=heads, D=dim)
    time_rows(harness, device, tiny, row, {"fused prep": branch, "chunk kernel alone": lambda: gated_delta_rule(q, k, v, g, beta)})
    with mock.patch.object(layer_module, "short_conv_rope_l2norm", composition):
        time_rows(harness, device, tiny, row, {"composition prep": branch})


def section_gdn_prep(device: str, tiny: bool, harness) -> None:
    """Run the section; ``harness`` is the gpu_kernel_check module (record, timed_ms, TIMINGS, FAILURES)."""
    print("\n[e] GDN prep (conv + SiLU + RoPE + L2 norm): fused Triton vs float32 composition; timing", flush=True)
    cases = [(2, 33, 3, 32, torch.bfloat16, True), (1, 20, 3, 16, torch.float32, False)] if tiny else [
        (1, 4096, 14, 128, torch.bfloat16, True), (2, 1000, 14, 128, torch.float32, True),
        (3, 257, 16, 64, torch.float16, False), (32, 1, 14, 128, torch.bfloat16, True)]
    for seed, (batch, length, heads, dim, dtype, with_state) in enumerate(cases):
        case = f"B{batch} T{length} H{heads} D{dim} {str(dtype)[6:]}{' state' if with_state else ''}"
        try:
            args, state, mask = prep_inputs(batch, length, heads, dim, dtype, device, seed, cos_batch=batch if seed % 2 else 1)
            check_case(harness, device, case, args, state if with_state else None, mask)
        except Exception:
            harness.FAILURES.append(f"gdn_prep {case}")
            traceback.print_exc()
    time_prep(harness, device, tiny)
    time_branch(harness, device, tiny, 1, 64 if tiny else 131072, decode=False)
    time_branch(harness, device, tiny, 4 if tiny else 32, 1, decode=True)
