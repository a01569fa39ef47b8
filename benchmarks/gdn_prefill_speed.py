"""Short-context prefill of the head-wise hybrid, path by path: device time, host time, kernel launches (issue 15).

At batch 1 and a few thousand tokens the 7:1 hybrid's attention core was 3.9x slower than full attention on
an H200 (0.35 vs 1.37 ms at 4K) although it does a fraction of the arithmetic: it launched ~33 kernels
per layer (full attention: 11), most of them tiny (the FA query scale's 10 elementwise ops, beta and the
decay's 11, fla's five Triton kernels behind autotuners and decorators), so the GPU waited on the host.
This benchmark measures each cut separately, on one Qwen3-1.7B-like layer (``hybrid_speed``'s shape and
layers, random weights, bf16), B = 1:

* ``full``: 16 FA heads (the plain layer);
* ``hybrid_fla``: the hybrid as before the cuts: fla's chunk kernel, beta/decay in torch, the query scale
  computed in the layer (``query_scale=None``);
* ``hybrid_fla_scale``: the same with the query scale ``HybridModel`` passes (``model_query_scale``:
  1.0 below position 8190, no multiply): the query-scale cut alone;
* ``hybrid_fused``: + headscope's fused chunk kernels (``kernels/gdn/triton_chunk.py``, gates inside;
  ``FUSED_MAX_TOKENS`` raised for the run, with the ``block_v`` that ``default_block_v`` picks);
* ``hybrid_all``: + the one-launch q/k RMSNorm (``kernels/qk_norm``, 16 launches fewer, in ``project``:
  the whole layer only), the one-launch residual add + RMSNorm of the block (``kernels/rms_norm``, 16
  fewer) and the MLP's ``silu(gate) * up`` in one launch (``kernels/swiglu``), and since the fifteenth session the
  projections fused as ``generate()`` fuses them (``inference_weights.fuse_for_inference``: q/k/v/gate one GEMM,
  the MLP's gate/up one GEMM, the weights moved into one buffer each, no copy): every cut;
* ``full_qknorm``: full attention with those one-launch norms and activation too (what they give the baseline), and
  its projections fused as in ``hybrid_all``;
* ``hybrid_gdn_first``: ``hybrid_all`` with the GDN branch enqueued before the FA branch
  (``HeadwiseHybridAttention.gdn_first``): whether starting the long sequential chunk scan earlier hides the
  host time of the FA branch (same kernels, same results);
* ``hybrid_flash``: ``hybrid_all`` with the FA heads through ATen's FlashAttention (as before the fifteenth
  session) instead of the one-launch ``kernels/fa_prefill`` kernel that ``hybrid_all``, ``hybrid_gdn_first`` and
  the model take up to ``fa_prefill.ops.MAX_TOKENS`` (the ``hybrid_fla*``/``hybrid_fused`` paths keep flash too).

``full`` and the ``hybrid_fla*``/``hybrid_fused`` paths run the norms eagerly, as before the cuts and as
the Hugging Face model does. The layer's host-side cuts of the core (both GDN logits computed in the prep kernel's
launch from the stacked ``[a_proj; b_proj]`` rows, before the fourteenth session one cuBLAS GEMM padded to 32 rows; the conv
taps cached in the prep kernel's layout, the epilogue reading the FA and GDN outputs in place instead of a
``cat``; ``headscope.hybrid.inference_weights``; the prefill Triton kernels
launched through ``headscope.kernels.launch.launch``, which skips Triton's JIT binder after a specialisation's
first launch; one scratch allocation in the chunk kernels; the FA branch calling the flash kernel directly instead of
through SDPA's backend choice, ``causal_attention(direct=True)``: the plain ``full`` layers keep SDPA) are not switches: every hybrid path has them (the first
H200 run, ``benchmarks/results/gdn_prefill_speed.md`` of 2026-12-03, predates them). ``HEADSCOPE_FAST_LAUNCH=0``
in the environment sends every launch through the JIT again (a second run then measures the fast path's share).

Sections: ``check`` (first; on the device in bf16 at T = 1000, not a multiple of the chunk: every fused
kernel config and fla against the float32 token-by-token reference, o and final state, B = 2 with a
left-padded row and an initial state; the layer's core on the fla and fused paths against the same layer
in float32 through the torch paths (``headscope.kernels.switch.torch_paths``); the one-launch q/k RMSNorm, which both of
those core paths run, at T and T = 1 against float32, beside the torch norm); ``prefill`` (core and whole layer per
path); ``host profile`` (at 4K: cProfile of the enqueueing Python of the core and the layer of ``hybrid_all`` and
``full_qknorm``, the functions with the most own time); ``kernel`` (the GDN call alone, 14 heads, at each T and at each ``--batched`` B x T, default 8 x 1024: fla given g/beta, fla with
the gates in torch, the fused kernels at each ``block_v`` swept), last, as the first to go when the time budget
(``--max-minutes``) runs out. Each timing: device ms (CUDA events, median), host ms (time
to enqueue the call, no sync: when it is close to the device time the call is launch-bound), back-to-back ms
(per call of 20 enqueued between one pair of events: the host enqueues the next call while the GPU runs this one,
as layers follow each other in a model's forward; the goals stay on the isolated device ms) and the
kernels launched with each one's GPU ms (torch.profiler's CUDA activity of one call; memcpy/memset included).
A ``block_v`` above the head dim runs as the head dim rounded up to a power of 2 (the launcher clamps it), under its
requested name.

Usage (GPU): ``python benchmarks/gdn_prefill_speed.py`` (writes ``$OUT/gdn_prefill_speed.{json,md}``, OUT
defaults to benchmarks/results; ``--summary-only`` recomputes the summary and report of the rows already there). Both files are written again
after every section (``meta.partial`` until the last), so a run cut short by an outer timeout keeps what it measured. ``--tiny``: tiny shapes on the CPU, to check the script (under
``TRITON_INTERPRET=1`` the fused kernels then run through the interpreter; the layers take their CPU paths).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # hybrid_speed next to this script, also when it is loaded by path (the tests)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import headscope.kernels.fa_prefill.ops as fa_prefill_ops  # noqa: E402
import headscope.kernels.gdn.ops as gdn_ops  # noqa: E402
import headscope.kernels.gdn.triton_chunk as triton_chunk  # noqa: E402
import headscope.kernels.qk_norm.ops as qk_ops  # noqa: E402
import headscope.kernels.rms_norm.ops as norm_ops  # noqa: E402
import headscope.kernels.swiglu.ops as swiglu_ops  # noqa: E402
from headscope.heads import write_text_atomic  # noqa: E402
from headscope.hybrid.functional import model_query_scale  # noqa: E402
from headscope.hybrid.inference_weights import fuse_for_inference  # noqa: E402
from headscope.kernels.gdn.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from headscope.kernels.metrics import relative_rms_error as rel  # noqa: E402
from headscope.kernels.switch import torch_paths  # noqa: E402
from hybrid_speed import Shape, Timer, decoder_layer, rope, variants  # noqa: E402

class PathSpec(NamedTuple):
    """What a timed path switches on."""

    variant: str  # hybrid_speed variant: "full" or "headwise"
    query_scale: str  # "layer" (computed per layer) or "model" (as HybridModel passes it)
    fused_gdn: bool = False  # headscope's fused chunk GDN kernels (else fla)
    one_launch_norms: bool = False  # one-launch q/k RMSNorm, block add + RMSNorm and SwiGLU
    gdn_first: bool = False  # the GDN branch enqueued first
    fa_kernel: bool = True  # the hybrid's FA heads through kernels/fa_prefill (else ATen's FlashAttention)
    fused_projections: bool = False  # q/k/v/gate and the MLP's gate/up one GEMM each (inference_weights.fuse_for_inference)


PATHS = {
    "full": PathSpec("full", "layer"),
    "hybrid_fla": PathSpec("headwise", "layer", fa_kernel=False),
    "hybrid_fla_scale": PathSpec("headwise", "model", fa_kernel=False),
    "hybrid_fused": PathSpec("headwise", "model", fused_gdn=True, fa_kernel=False),
    "hybrid_all": PathSpec("headwise", "model", fused_gdn=True, one_launch_norms=True, fused_projections=True),
    "full_qknorm": PathSpec("full", "layer", one_launch_norms=True, fused_projections=True),
    "hybrid_gdn_first": PathSpec("headwise", "model", fused_gdn=True, one_launch_norms=True, gdn_first=True, fused_projections=True),
    "hybrid_flash": PathSpec("headwise", "model", fused_gdn=True, one_launch_norms=True, fa_kernel=False, fused_projections=True),
}
CONFIGS = (32, 16)  # block_v of the fused kernels swept (chunks of 64 tokens); the layer's: default_block_v
GOALS = {"core_4k_over_full": 1.5, "layer_4k_over_full": 1.0}
ROUNDS = 3  # interleaved rounds of the prefill paths (``bench_prefill``)
GOAL_ROUNDS = 7  # at the goals' length, 4096: one round's ratios ranged 0.63-1.37 for the same pair in the 12-04 run


@contextlib.contextmanager
def switches(enabled: bool, qk_norm: bool = True, fa_kernel: bool = True):
    """For the calls inside: the fused chunk GDN path on (for every T) or off (fla), the one-launch norms
    (q/k RMSNorm, the block's residual add + RMSNorm) and MLP activation on or off, the hybrid's FA heads through
    ``kernels/fa_prefill`` (as shipped, up to its ``MAX_TOKENS``) or ATen's FlashAttention."""
    before = gdn_ops.FUSED_MAX_TOKENS, qk_ops.FUSED, norm_ops.FUSED, swiglu_ops.FUSED, fa_prefill_ops.MAX_TOKENS
    gdn_ops.FUSED_MAX_TOKENS, qk_ops.FUSED, norm_ops.FUSED, swiglu_ops.FUSED = (1 << 30 if enabled else 0), qk_norm, qk_norm, qk_norm
    fa_prefill_ops.MAX_TOKENS = before[4] if fa_kernel else 0
    try:
        yield
    finally:
        gdn_ops.FUSED_MAX_TOKENS, qk_ops.FUSED, norm_ops.FUSED, swiglu_ops.FUSED, fa_prefill_ops.MAX_TOKENS = before


def host_ms(fn, device: torch.device, reps: int = 10) -> float:
    """Median wall time of enqueuing ``fn`` (synchronised before and after, not inside)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def back_to_back_ms(fn, device: torch.device, calls: int = 20) -> float:
    """ms per call of ``calls`` calls of ``fn`` enqueued back to back between one pair of CUDA events: how a layer
    runs inside a model's forward, where the host enqueues the next call while the GPU works through this one
    (the isolated timing of ``Run.time`` also counts the GPU waiting for the first launch); wall time on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def launches(fn, device: torch.device) -> dict | None:
    """Kernels (and memcpy/memset) one call of ``fn`` puts on the GPU, by name (count and ms), and the sum of their
    durations (``busy_ms``: well below the call's time when the GPU waits on the host); None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names, ms_by_name = Counter(e.name[:90] for e in events), Counter()
    for e in events:
        ms_by_name[e.name[:90]] += (e.time_range.end - e.time_range.start) / 1e3
    busy = sum(ms_by_name.values())
    spans = [(e.name[:60], e.time_range.start, e.time_range.end) for e in events]
    return {"count": len(events), "busy_ms": busy, "by_name": dict(names.most_common()), "ms_by_name": dict(ms_by_name.most_common()),
            "gaps": idle_gaps(spans)}


def idle_gaps(spans: list[tuple[str, float, float]], top: int = 4) -> dict:
    """Where the GPU waited inside one call, from its kernels' ``(name, start_us, end_us)``: the idle ms between
    the first start and the last end (``span_ms``) and the ``top`` largest gaps as ``[ms, kernel that waited]``
    (a gap before a kernel = the host was still preparing its launch, or a dependency on another stream)."""
    spans = sorted(spans, key=lambda s: s[1])
    gaps, end = [], None
    for name, start, stop in spans:
        if end is not None and start > end:
            gaps.append([(start - end) / 1e3, name])
        end = stop if end is None else max(end, stop)
    gaps.sort(key=lambda g: -g[0])
    return {"idle_ms": sum(g[0] for g in gaps), "span_ms": (end - spans[0][1]) / 1e3 if spans else 0.0, "largest": gaps[:top]}


class Run:
    """Rows, errors and the shared settings of one run."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shape: Shape, tiny: bool, configs: tuple) -> None:
        self.device, self.dtype, self.shape, self.tiny, self.configs = device, dtype, shape, tiny, configs
        self.timer = Timer(device, budget_ms=50.0 if tiny else 300.0)
        self.rows: list[dict] = []
        self.errors: list[str] = []

    def time(self, fn) -> tuple[float, float, float]:
        """Device ms (median, one call at a time), host ms (median) and back-to-back ms per call of ``fn``."""
        return (self.timer(fn, warmup=1 if self.tiny else 3), host_ms(fn, self.device, reps=3 if self.tiny else 10),
                back_to_back_ms(fn, self.device, calls=2 if self.tiny else 20))

    def measure(self, fn, **row) -> None:
        """One timed row: device ms, host ms, launches."""
        self.record(fn, [self.time(fn)], **row)

    def record(self, fn, rounds: list[tuple[float, float, float]], **row) -> None:
        """A row from ``(device ms, host ms, back-to-back ms)`` of one or more rounds (their medians; all kept when
        more than one) and the launches of one more call of ``fn``."""
        row.update(ms=statistics.median(r[0] for r in rounds), host_ms=statistics.median(r[1] for r in rounds),
                   b2b_ms=statistics.median(r[2] for r in rounds))
        if len(rounds) > 1:
            row.update(ms_rounds=[r[0] for r in rounds], host_ms_rounds=[r[1] for r in rounds], b2b_ms_rounds=[r[2] for r in rounds])
        row["launches"] = launches(fn, self.device)
        self.rows.append(row)
        counts = f" launches={row['launches']['count']} busy_ms={row['launches']['busy_ms']:.4g}" if row["launches"] else ""
        print("  " + " ".join(f"{k}={(round(v, 4) if isinstance(v, float) else v)}" for k, v in row.items() if k != "launches") + counts, flush=True)

    def gdn_inputs(self, batch: int, t: int, heads: int, seed: int = 0):
        """q, k (unit rows), v, the raw decay/beta logits and A_log, dt_bias as the layer makes them."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        d = self.shape.head_dim
        randn = partial(torch.randn, generator=gen, device=self.device)
        q, k = (F.normalize(randn(batch, t, heads, d), dim=-1).to(self.dtype) for _ in range(2))
        v = randn(batch, t, heads, d).to(self.dtype)
        a, b = randn(batch, t, heads).to(self.dtype), randn(batch, t, heads).to(self.dtype)
        A_log = torch.rand(heads, generator=gen, device=self.device).mul(16).log()
        dt_bias = torch.rand(heads, generator=gen, device=self.device).mul(-4.6).add(-2.3)  # softplus = 1e-3 .. 0.1
        return q, k, v, a, b, A_log, dt_bias


def build_layer(run: Run, variant: str, dtype: torch.dtype | None = None):
    """A decoder layer of ``variant`` whose parameters are ordinary tensors, as a model loaded for inference has: made
    under ``torch.inference_mode`` (where the sections run) they would be inference tensors, for which the layer's
    cached weight layouts (``headscope.hybrid.inference_weights``) are derived again at every call (3 launches more)."""
    with torch.inference_mode(False), torch.no_grad():
        return decoder_layer(run.shape, variants(run.shape)[variant], run.device, dtype or run.dtype)


def fused_kernel(block_v: int):
    return partial(triton_chunk.triton_chunk_gated_delta_rule, block_v=block_v)


def config_name(block_v: int) -> str:
    """``fused_v16``: the fused kernels with 16 value columns per scan program."""
    return f"fused_v{block_v}"


def can_run_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# --- sections ----------------------------------------------------------------------------------
def check(run: Run) -> None:
    """Errors of the fused kernels and fla against the float32 reference, and of the layer's core paths."""
    t, heads = (100, 3) if run.tiny else (1000, run.shape.heads - 2)
    q, k, v, a, b, A_log, dt_bias = run.gdn_inputs(2, t, heads, seed=1)
    mask = torch.ones(2, t, dtype=torch.long, device=run.device)
    mask[1, : t // 10] = 0
    h0 = 0.3 * torch.randn(2, heads, run.shape.head_dim, run.shape.head_dim, device=run.device)
    scale = run.shape.head_dim**-0.5
    g, beta = gdn_ops.gdn_gates(a.float(), b.float(), A_log, dt_bias, mask)
    want, want_state = naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, scale=scale, initial_state=h0, output_final_state=True)
    results = {}
    if run.device.type == "cuda":
        with switches(False):
            results["fla"] = gdn_ops.gated_delta_rule_from_logits(q, k, v, a, b, A_log, dt_bias, input_mask=mask, scale=scale, initial_state=h0, output_final_state=True)
    if can_run_triton(run.device):
        for block_v in run.configs:
            results[config_name(block_v)] = fused_kernel(block_v)(
                q, k, v, a, b, scale=scale, A_log=A_log, dt_bias=dt_bias, input_mask=mask, initial_state=h0, output_final_state=True)
    errors = {name: {"o": rel(o, want), "state": rel(s, want_state)} for name, (o, s) in results.items()}
    run.rows.append({"phase": "check", "scope": "kernel", "context": t, "errors": errors})
    print(f"  check kernel T={t}: " + ", ".join(f"{n} o {e['o']:.2e} state {e['state']:.2e}" for n, e in errors.items()), flush=True)
    worst = max((e["o"] for n, e in errors.items() if n != "fla"), default=0.0)
    limit = max(2 * errors["fla"]["o"], 0.02) if "fla" in errors else 0.03
    if worst > limit:
        run.errors.append(f"check: fused kernel error {worst:.3g} above {limit:.3g} (fla: {errors.get('fla')})")
    check_layer(run, t)
    check_qk_norm(run, t)


def check_qk_norm(run: Run, t: int) -> None:
    """The one-launch q/k RMSNorm (both arms of ``check_layer`` run it, so a fault of it is in both) against the
    float32 reference at T and at T = 1 (the decode step's shape), beside the torch norm in the run's dtype."""
    from headscope.kernels.qk_norm.naive import head_rms_norm_reference

    gen = torch.Generator(device=run.device).manual_seed(2)
    heads, d, errors = run.shape.heads, run.shape.head_dim, {}
    for length in (t, 1):
        q, k = ((3 * torch.randn(2, length, n, d, generator=gen, device=run.device)).to(run.dtype) for n in (heads, heads - 1))
        wq, wk = (torch.rand(d, generator=gen, device=run.device).add(0.5).to(run.dtype) for _ in range(2))
        want = (head_rms_norm_reference(q.float(), wq.float(), 1e-6), head_rms_norm_reference(k.float(), wk.float(), 1e-6))
        for name, on in (("kernel", True), ("torch", False)):
            with switches(False, qk_norm=on):
                got = qk_ops.qk_rms_norm(q, k, wq, wk, 1e-6)
            errors[f"{name}_T{length}"] = max(rel(g, w) for g, w in zip(got, want))
    run.rows.append({"phase": "check", "scope": "qk_norm", "context": t, "errors": errors})
    print("  check qk_norm: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()), flush=True)
    for length in (t, 1):
        if errors[f"kernel_T{length}"] > max(1.5 * errors[f"torch_T{length}"], 1e-6):
            run.errors.append(f"check: q/k norm kernel error {errors[f'kernel_T{length}']:.3g} at T={length} against the torch norm's "
                              f"{errors[f'torch_T{length}']:.3g}")


def check_layer(run: Run, t: int) -> None:
    """The hybrid attention's core in the run's dtype on the fla and fused paths vs float32 torch paths."""
    torch.manual_seed(0)
    attn = build_layer(run, "headwise", torch.float32).self_attn
    x = torch.randn(1, t, run.shape.hidden, device=run.device)
    pos = torch.arange(t, device=run.device)[None]
    with torch_paths():  # float32 matmuls, no tf32
        want = attn.core(x, *attn.project(x), rope(pos, run.shape.head_dim, torch.float32), pos)
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as the timed layers have (``build_layer``)
        attn.to(run.dtype)
    xd, pe = x.to(run.dtype), rope(pos, run.shape.head_dim, run.dtype)
    errors = {}
    for name, enabled in (("fla", False), ("fused", True)):
        with switches(enabled):
            errors[name] = rel(attn.core(xd, *attn.project(xd), pe, pos), want)
    run.rows.append({"phase": "check", "scope": "core", "context": t, "errors": errors})
    print(f"  check core T={t}: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()), flush=True)
    if errors["fused"] > max(1.5 * errors["fla"], 0.02):
        run.errors.append(f"check: fused layer core error {errors['fused']:.3g} against fla's {errors['fla']:.3g}")


def bench_kernel(run: Run, t: int, batch: int = 1) -> None:
    """The GDN call alone: fla given g and beta, fla with the gates in torch, each fused config."""
    heads = run.shape.heads - 2
    q, k, v, a, b, A_log, dt_bias = run.gdn_inputs(batch, t, heads)
    g, beta = gdn_ops.gdn_gates(a, b, A_log, dt_bias)
    calls = {}
    if run.device.type == "cuda":
        calls["fla"] = (partial(gdn_ops.gated_delta_rule, q, k, v, g, beta), False)
        calls["fla+gates"] = (partial(gdn_ops.gated_delta_rule_from_logits, q, k, v, a, b, A_log, dt_bias), False)
    if can_run_triton(run.device):
        for block_v in run.configs:
            calls[config_name(block_v)] = (partial(fused_kernel(block_v), q, k, v, a, b, scale=run.shape.head_dim**-0.5, A_log=A_log, dt_bias=dt_bias), True)
    for name, (call, fused) in calls.items():
        try:  # a config that cannot launch costs only its own row
            with switches(fused):
                run.measure(call, phase="prefill", scope="kernel", path=name, context=t, batch=batch)
        except Exception as err:  # noqa: BLE001
            run.errors.append(f"kernel {name} B={batch} T={t}: {type(err).__name__}: {str(err)[:300]}")


def path_calls(run: Run, t: int, paths=tuple(PATHS)) -> dict[str, tuple[tuple[bool, bool, bool], dict]]:
    """Per path of ``paths`` (names in ``PATHS``): its switches ``(fused, qk_norm, fa_kernel)`` and its two calls at B = 1, T = ``t``, no cache:
    ``{"core": attn.core on the projected input, "layer": the whole decoder layer}`` (a fresh layer per path)."""
    x = torch.randn(1, t, run.shape.hidden, device=run.device, dtype=run.dtype)
    pos = torch.arange(t, device=run.device)[None]
    pe = rope(pos, run.shape.head_dim, run.dtype)
    out = {}
    for path in paths:
        spec_of_path = PATHS[path]
        layer = build_layer(run, spec_of_path.variant)
        if spec_of_path.fused_projections:
            fuse_for_inference(layer)
        attn, spec = layer.self_attn, layer.self_attn.spec
        attn.gdn_first = spec_of_path.gdn_first
        scale = model_query_scale(pos, t - 1, spec.attn_scale, spec.floor_scale, run.dtype) if spec_of_path.query_scale == "model" else None
        flags = (spec_of_path.fused_gdn, spec_of_path.one_launch_norms, spec_of_path.fa_kernel)
        with switches(*flags):
            h = layer.input_layernorm(x)
            projected = attn.project(h)
        out[path] = (flags, {"core": partial(attn.core, h, *projected, pe, pos, None, None, scale),
                                        "layer": partial(layer, x, pe, pos, None, None, scale)})
    return out


def bench_prefill(run: Run, t: int) -> None:
    """Core and whole layer per path, B = 1, no cache. The paths are timed in ``ROUNDS`` (at 4096, ``GOAL_ROUNDS``) interleaved rounds
    (every path once per round) and each row keeps the median of its rounds' medians: the box's host jitter
    (one 4K row of the second H200 run took 0.9 ms to enqueue what took 0.5 ms at 2K and 8K) then hits every
    path alike instead of whichever happened to run during it."""
    calls = [(fn, flags, dict(phase="prefill", scope=scope, path=path, context=t))  # (fn, the switches, row)
             for path, (flags, fns) in path_calls(run, t).items() for scope, fn in fns.items()]
    rounds = [[] for _ in calls]  # (device ms, host ms, back-to-back ms) per round, per call
    for _ in range(2 if run.tiny else GOAL_ROUNDS if t == 4096 else ROUNDS):
        for (fn, flags, _), timed in zip(calls, rounds):
            with switches(*flags):
                timed.append(run.time(fn))
    for (fn, flags, row), timed in zip(calls, rounds):
        with switches(*flags):
            run.record(fn, timed, **row)


def profile_host(run: Run, t: int, calls: int = 50, top: int = 25) -> None:
    """Where the host time of one prefill call goes: cProfile over ``calls`` calls of the core and the layer of
    ``hybrid_all`` and ``full_qknorm`` (the GPU synchronised before each call, outside the profiled region: the
    profile is of the enqueueing Python), the ``top`` functions by own time, in microseconds per call."""
    import cProfile
    import pstats

    for path, (flags, fns) in path_calls(run, t, ("hybrid_all", "full_qknorm")).items():
        with switches(*flags):
            for scope, fn in fns.items():
                for _ in range(3):
                    fn()
                n = 2 if run.tiny else calls
                profiler = cProfile.Profile()
                for _ in range(n):
                    if run.device.type == "cuda":
                        torch.cuda.synchronize()
                    profiler.enable()
                    fn()
                    profiler.disable()
                stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
                total = sum(v[2] for v in stats.values()) * 1e6 / n
                ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
                functions = [[f"{Path(f).name}:{line}:{name}", round(v[0] / n, 2), round(v[2] * 1e6 / n, 2), round(v[3] * 1e6 / n, 2)]
                             for (f, line, name), v in ranked]
                run.rows.append({"phase": "profile", "scope": scope, "path": path, "context": t, "host_us": total, "functions": functions})
                print(f"  profile {scope} {path} T={t}: {total:.0f} us/call under cProfile; top: "
                      + ", ".join(f"{name} {own:.0f}" for name, _, own, _ in functions[:8]), flush=True)


# --- results -----------------------------------------------------------------------------------
def pick(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def ms_of(rows: list[dict], **where) -> float | None:
    row = pick(rows, **where)
    return row["ms"] if row else None


def summarise(rows: list[dict], contexts: list[int], default_config: int) -> dict:
    """Ratios to full attention at each T, the goals at 4K, where the fused kernels in the layer's config
    (``default_config``, timed when swept) beat fla with the gates in torch."""
    per_context = {}
    for t in contexts:
        entry = {}
        for scope in ("core", "layer"):
            ms = {p: ms_of(rows, scope=scope, path=p, context=t) for p in PATHS}
            entry[scope] = {p: {"ms": ms[p], "over_full": ms[p] / ms["full"] if ms[p] and ms["full"] else None} for p in PATHS}
        kernel = {r["path"]: r["ms"] for r in rows if r.get("phase") == "prefill" and r["scope"] == "kernel" and r["context"] == t and r.get("batch", 1) == 1}
        fused = {p: ms for p, ms in kernel.items() if p.startswith("fused")}
        default = config_name(default_config)
        entry["kernel"] = {"ms": kernel, "best_fused": min(fused, key=fused.get) if fused else None,
                           "default_fused_over_fla_gates": (kernel[default] / kernel["fla+gates"]) if "fla+gates" in kernel and default in kernel else None}
        per_context[t] = entry
    wins = [t for t, e in per_context.items() if e["kernel"]["default_fused_over_fla_gates"] is not None and e["kernel"]["default_fused_over_fla_gates"] < 1]
    def at_4k(scope: str, path: str, base: str, value) -> tuple:
        """``value(row)`` of the T = 4096 row of ``path`` and of ``base`` (``value({})`` for a missing row)."""
        return tuple(value(pick(rows, scope=scope, path=p, context=4096) or {}) for p in (path, base))

    def ratio(scope: str, path: str, base: str = "full", key: str = "ms") -> float | None:
        a, b = at_4k(scope, path, base, lambda row: row.get(key))
        return a / b if a and b else None

    def paired(scope: str, path: str, base: str = "full") -> float | None:  # the median of each round's own ratio
        a, b = at_4k(scope, path, base, lambda row: row.get("ms_rounds"))
        return statistics.median(x / y for x, y in zip(a, b)) if a and b and len(a) == len(b) else None

    def best(scope: str, path: str, base: str = "full") -> float | None:  # each path in its fastest round (the host's slow spells aside)
        a, b = at_4k(scope, path, base, lambda row: min(row["ms_rounds"]) if row.get("ms_rounds") else None)
        return a / b if a and b else None

    def busy(scope: str, path: str, base: str = "full") -> float | None:  # GPU work of one call (the host aside)
        a, b = at_4k(scope, path, base, lambda row: (row.get("launches") or {}).get("busy_ms"))
        return a / b if a and b else None

    goals = {
        "core_4k_over_full": {"value": ratio("core", "hybrid_all"), "before": ratio("core", "hybrid_fla"), "goal": f"<= {GOALS['core_4k_over_full']}",
                              "paired_rounds": paired("core", "hybrid_all"), "best_rounds": best("core", "hybrid_all"),
                              "back_to_back": ratio("core", "hybrid_all", key="b2b_ms"), "gpu_work": busy("core", "hybrid_all"),
                              "gdn_first": ratio("core", "hybrid_gdn_first"), "gdn_first_paired_rounds": paired("core", "hybrid_gdn_first"),
                              "gdn_first_best_rounds": best("core", "hybrid_gdn_first"),
                              "with_flash": ratio("core", "hybrid_flash"), "own_fa_over_flash_paired_rounds": paired("core", "hybrid_all", "hybrid_flash")},
        "layer_4k_over_full": {"value": ratio("layer", "hybrid_all"), "before": ratio("layer", "hybrid_fla"), "goal": f"<= {GOALS['layer_4k_over_full']}",
                               "vs_full_qknorm": ratio("layer", "hybrid_all", "full_qknorm"), "paired_rounds": paired("layer", "hybrid_all"),
                               "paired_rounds_vs_full_qknorm": paired("layer", "hybrid_all", "full_qknorm"), "best_rounds": best("layer", "hybrid_all"),
                               "best_rounds_vs_full_qknorm": best("layer", "hybrid_all", "full_qknorm"),
                               "back_to_back_vs_full_qknorm": ratio("layer", "hybrid_all", "full_qknorm", key="b2b_ms"),
                               "gpu_work": busy("layer", "hybrid_all"), "gpu_work_vs_full_qknorm": busy("layer", "hybrid_all", "full_qknorm"),
                               "gdn_first": ratio("layer", "hybrid_gdn_first"), "gdn_first_paired_rounds": paired("layer", "hybrid_gdn_first"),
                               "gdn_first_best_rounds": best("layer", "hybrid_gdn_first"),
                               "with_flash": ratio("layer", "hybrid_flash"), "own_fa_over_flash_paired_rounds": paired("layer", "hybrid_all", "hybrid_flash")},
    }
    return {"per_context": per_context, "goals": goals, "fused_faster_at": wins}


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def goal_lines(goals: dict) -> list[str]:
    """One markdown line per goal of ``summarise``: its value (hybrid_all), the goal, and every other ratio it holds."""
    lines = []
    for name, goal in goals.items():
        extra = f"; against full with the one-launch norms too {fmt(goal['vs_full_qknorm'])}" if "vs_full_qknorm" in goal else ""
        extra += "".join(f"; {key.replace('_', ' ')} {fmt(goal[key])}" for key in (
            "paired_rounds", "paired_rounds_vs_full_qknorm", "best_rounds", "best_rounds_vs_full_qknorm", "back_to_back",
            "back_to_back_vs_full_qknorm", "gpu_work", "gpu_work_vs_full_qknorm", "gdn_first", "gdn_first_paired_rounds",
            "gdn_first_best_rounds", "with_flash", "own_fa_over_flash_paired_rounds") if key in goal)
        lines.append(f"- {name} (hybrid_all): {fmt(goal['value'])} (goal {goal['goal']}; before the cuts {fmt(goal['before'])}{extra})")
    return lines


def markdown(meta: dict, rows: list[dict], summary: dict) -> str:
    lines = [f"# Short-context prefill of the head-wise hybrid ({meta['device']})", "",
             f"One Qwen3-1.7B-like layer ({meta['shape']}), {meta['dtype']}, batch 1; torch {meta['torch']}, triton {meta['triton']}. "
             "ms = device time of one call (median), host = time to enqueue it, b2b = ms per call of 20 calls enqueued back to back "
             "(as inside a model's forward), launches = kernels + memcpy/memset of one call. Goal lines: the ratio of the "
             "two paths' medians; `paired rounds`, the median over the interleaved rounds of each round's own ratio (drift of the "
             "host's speed between rounds cancels); `best rounds`, the ratio of each path's fastest round (the host's slow spells "
             "aside); `gdn first`, the same ratios for `hybrid_gdn_first`; `with flash`, for `hybrid_flash` (the FA heads through "
             "ATen's FlashAttention instead of `kernels/fa_prefill`); `own fa over flash paired rounds`, hybrid_all over hybrid_flash.", "",
             *([f"**Partial run** ({meta['partial']}): written after a section; the run did not finish.", ""] if meta.get("partial") else []),
             "## Goals (T = 4096)", ""]
    lines += goal_lines(summary["goals"])
    lines.append(f"- fused GDN kernels (the layer's config at batch 1, {config_name(meta['layer_config'])}) "
                 f"faster than fla + torch gates at T = {summary['fused_faster_at']} "
                 "(`FUSED_MAX_TOKENS`: the largest of an unbroken run from the shortest, at batch 1; the rows of batch > 1 show whether B·T is the right bound)")
    for scope, title in (("core", "attention core"), ("layer", "whole layer")):
        lines += ["", f"## Prefill, {title}: ms / host ms / b2b ms / launches (x full)", "", "| T | " + " | ".join(PATHS) + " |", "|---" * (len(PATHS) + 1) + "|"]
        for t, e in summary["per_context"].items():
            cells = []
            for p in PATHS:
                r = pick(rows, scope=scope, path=p, context=t)
                n = r["launches"]["count"] if r and r["launches"] else "-"
                cells.append(f"{fmt(r['ms'])} / {fmt(r['host_ms'])} / {fmt(r.get('b2b_ms'))} / {n} ({fmt(e[scope][p]['over_full'])}x)" if r else "-")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    names = sorted({r["path"] for r in rows if r.get("phase") == "prefill" and r["scope"] == "kernel"}, key=lambda n: (not n.startswith("fla"), n))
    lines += ["", f"## The GDN call alone ({meta['shape']['heads'] - 2} heads): ms / host ms / launches", "", "| B x T | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for batch, t in sorted({(r["batch"], r["context"]) for r in rows if r.get("phase") == "prefill" and r["scope"] == "kernel"}):
        cells = []
        for n in names:
            r = pick(rows, scope="kernel", path=n, context=t, batch=batch)
            cells.append(f"{fmt(r['ms'])} / {fmt(r['host_ms'])} / {r['launches']['count'] if r['launches'] else '-'}" if r else "-")
        lines.append(f"| {batch} x {t} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Best fused config per T (batch 1): " + ", ".join(f"{t}: {e['kernel']['best_fused']}" for t, e in summary["per_context"].items()))
    lines += ["", "## Checks (relative RMS error against float32)", ""]
    for r in rows:
        if r.get("phase") == "check":
            lines.append(f"- {r['scope']} T={r['context']}: " + json.dumps(r["errors"], default=str).replace("e-0", "e-"))
    at = 4096 if 4096 in summary["per_context"] else max(summary["per_context"], default=None)
    for scope in ("core", "layer"):
        lines += ["", f"## Kernels launched by the {scope} at T = {at} (GPU busy ms of the call's kernels)", ""]
        for p in PATHS:
            r = pick(rows, scope=scope, path=p, context=at)
            if r and r["launches"]:
                gaps = r["launches"].get("gaps")
                idle = (f"; GPU idle {fmt(gaps['idle_ms'])} of the {fmt(gaps['span_ms'])} ms from first kernel to last, largest gaps "
                        "before: " + ", ".join(f"{n} {fmt(ms)}" for ms, n in gaps["largest"])) if gaps else ""
                lines.append(f"- {p} ({r['launches']['count']}, busy {fmt(r['launches']['busy_ms'])} of {fmt(r['ms'])} ms{idle}): "
                             + ", ".join(f"{n} x{c} ({fmt(r['launches'].get('ms_by_name', {}).get(n))} ms)" for n, c in r["launches"]["by_name"].items()))
    for r in rows:
        if r.get("phase") == "profile":
            lines += ["", f"## Host profile: {r['scope']} of {r['path']} at T = {r['context']} ({fmt(r['host_us'])} us per call under cProfile)", "",
                      "| function | calls | own us | cumulative us |", "|---|---:|---:|---:|"]
            lines += [f"| `{name}` | {fmt(calls)} | {fmt(own)} | {fmt(cum)} |" for name, calls, own, cum in r["functions"][:15]]
    if meta["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in meta["errors"]]
    return "\n".join(lines) + "\n"


def block_v_values(text: str) -> tuple[int, ...]:
    """``--configs``: ``32,16`` -> ``(32, 16)``."""
    return tuple(int(n) for n in text.split(","))


def batch_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``--batched``: ``8x1024,32x4096`` -> ``((8, 1024), (32, 4096))``."""
    try:
        shapes = tuple((int(b), int(t)) for b, t in (item.split("x") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want BxT[,BxT...], e.g. 8x1024,32x4096; got {text!r}") from None
    if any(b < 2 or t < 1 for b, t in shapes) or len(set(shapes)) < len(shapes):
        raise argparse.ArgumentTypeError(f"want distinct shapes of batch >= 2 (batch 1 is --contexts) and length >= 1; got {text!r}")
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="prefill lengths (default 1024 2048 4096 8192; --tiny: 64)")
    parser.add_argument("--configs", type=block_v_values, default=CONFIGS,
                        help="block_v values of the fused kernels to sweep (default " + ",".join(map(str, CONFIGS)) + ")")
    parser.add_argument("--batched", type=batch_shapes, default=None, help="B x T shapes of the GDN call alone at batch > 1 "
                        "(default 8x1024; --tiny: 2x32): where the fused path's B·T bound holds")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script, times nothing useful)")
    parser.add_argument("--max-minutes", type=float, default=3.5, help="skip remaining sections after this long")
    parser.add_argument("--summary-only", action="store_true", help="recompute the summary and report of the rows already in "
                        "$OUT/gdn_prefill_speed.json (times nothing)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    if args.summary_only:
        try:
            recorded = json.loads((out / "gdn_prefill_speed.json").read_text())
            meta, rows = recorded["meta"], recorded["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.exit(2, f"gdn_prefill_speed: --summary-only needs a run's {out / 'gdn_prefill_speed.json'} ({type(err).__name__}: {err})\n")
        write(out, meta, rows, summarise(rows, sorted({r["context"] for r in rows if r.get("phase") == "prefill"}), meta["layer_config"]))
        return 0
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    shape = Shape(hidden=64, heads=5, kv_heads=1, head_dim=16, mlp=128) if args.tiny else Shape()
    contexts = args.contexts or ([64] if args.tiny else [1024, 2048, 4096, 8192])
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run = Run(device, dtype, shape, args.tiny, args.configs)
    batched = args.batched or (((2, 32),) if args.tiny else ((8, 1024),))  # B·T = 8K in 8 rows: is B·T the fused path's bound?
    plan = [("check", check, ())] + [(f"prefill T={t}", bench_prefill, (t,)) for t in contexts]  # the goals first
    plan += [(f"host profile T={contexts[min(2, len(contexts) - 1)]}", profile_host, (contexts[min(2, len(contexts) - 1)],))]
    plan += [(f"kernel T={t}", bench_kernel, (t,)) for t in contexts] + [(f"kernel B={b} T={t}", bench_kernel, (t, b)) for b, t in batched]
    import triton

    from headscope.kernels.launch import sm_count

    layer_config = triton_chunk.default_block_v(shape.heads - 2, shape.head_dim, sm_count(device))  # the layer's block_v at batch 1

    def save(final: bool) -> None:  # after every section: a run cut short (an outer timeout) keeps what it measured
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (--tiny)", "torch": torch.__version__, "triton": triton.__version__,
                "dtype": str(dtype).replace("torch.", ""), "shape": shape.__dict__, "errors": run.errors, "seconds": time.time() - started,
                "configs": args.configs, "layer_config": layer_config, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                **({} if final else {"partial": "cut after the sections listed in rows"})}
        write(out, meta, run.rows, summarise(run.rows, contexts, layer_config), echo=final)

    with torch.inference_mode():
        for name, fn, fn_args in plan:
            if (time.time() - started) / 60 > args.max_minutes:
                run.errors.append(f"{name}: skipped (time budget of {args.max_minutes} min spent)")
                continue
            print(f"== {name} ({time.time() - started:.0f} s)", flush=True)
            try:
                fn(run, *fn_args)
            except Exception as err:  # noqa: BLE001 -- one failing section must not stop the run
                run.errors.append(f"{name}: {type(err).__name__}: {err}")
                traceback.print_exc()
            save(final=False)
    save(final=True)
    return 1 if run.errors else 0


def write(out: Path, meta: dict, rows: list[dict], summary: dict, echo: bool = True) -> None:
    """``out``/gdn_prefill_speed.json (meta, summary, rows) and its report ``.md``, each written atomically; the report
    printed when ``echo``."""
    write_text_atomic(out / "gdn_prefill_speed.json", json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1, default=str))
    report = markdown(meta, rows, summary)
    write_text_atomic(out / "gdn_prefill_speed.md", report)
    if echo:
        print("\n" + report)


if __name__ == "__main__":
    sys.exit(main())
