"""Head-wise hybrid speed: one Qwen3-1.7B-like layer, full attention vs the 7:1 head-wise hybrid, side by side.

Shape: hidden 2048, 16 query / 8 KV heads, head_dim 128, MLP 6144, bf16 on one GPU. Layers (all built
from ``headscope.hybrid``'s own modules, random weights):

* ``full``: 16 FA heads on 8 KV heads with RoPE: the pretrained attention (plain layer);
* ``headwise``: 2 FA heads sharing KV group 0 + 14 GDN heads (the 7:1 hybrid), timed with its FA and
  GDN branches on two CUDA streams (``overlap_branches=True``) and one after the other (``False``; the layer's
  default "auto" picks between them by length, from these rows);
* ``fa_branch`` / ``gdn_branch``: each branch alone (2 FA heads; 14 GDN heads) as its own layer;
* ``linear``: a pure 16-head GDN layer; ``layerwise`` = (full + 3 x linear) / 4, the per-layer average
  of a layer-wise 3:1 hybrid.

Scopes: ``core`` = everything between the input projections and ``o_proj`` (``HeadwiseHybridAttention.core``:
RoPE / log scaling, SDPA, conv, L2 norm, gated delta rule, fusion epilogue); ``layer`` = the whole decoder
layer (norms, projections, core, o_proj, MLP); ``kernel`` = SDPA or ``gated_delta_rule`` alone. Phases:
prefill at batch 1 (no cache), and decode of one token at batch 1 and 32 against a cache of T tokens
(a preallocated cache written in place, as a serving engine's static cache; HF's DynamicCache would add
a full cache copy per step). Decode is timed eagerly and as a CUDA-graph replay (launch overhead removed),
with L2 flushed between repetitions.

Method (device/METHOD.md): a correctness check first (the bf16 CUDA hybrid layer vs the same layer in
float32 on the CPU, and two-stream vs sequential); CUDA events around each call, warm-up, median of
repetitions. Floors: FLOPs / measured bf16 matmul rate (prefill) and bytes / measured copy bandwidth
(decode), both measured at start (H100 ~790 TFLOP/s, ~3.0 TB/s). GDN FLOPs are counted for fla's
chunked form (chunk 64): per token and head 10·64·D + 6·D² FLOPs.

Usage (GPU): ``python benchmarks/hybrid_speed.py`` (writes ``$OUT/hybrid_speed.{json,md}`` and a plot,
OUT defaults to benchmarks/results); ``--tiny`` runs tiny shapes on the CPU to check the script.
Each section runs in its own try/except: a failure is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

GOALS = {"prefill_core_128k_speedup": 5.0, "hybrid_over_branch_sum": 1.10, "decode_b32_128k_speedup": 4.0}


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 6144


@dataclass(frozen=True)
class Variant:
    n_fa: int
    fa_kv_sizes: tuple[int, ...]
    n_gdn: int
    plain: bool = False  # pretrained attention: RoPE on, no log scaling / gate / fusion


def variants(shape: Shape) -> dict[str, Variant]:
    group = shape.heads // shape.kv_heads
    return {
        "full": Variant(shape.heads, (group,) * shape.kv_heads, 0, plain=True),
        "headwise": Variant(2, (2,), shape.heads - 2),
        "fa_branch": Variant(2, (2,), 0),
        "gdn_branch": Variant(0, (), shape.heads - 2),
        "linear": Variant(0, (), shape.heads),
    }


def layer_spec(shape: Shape, v: Variant):
    from headscope.hybrid.layer import HybridLayerSpec

    return HybridLayerSpec(
        hidden_size=shape.hidden, head_dim=shape.head_dim, n_fa_heads=v.n_fa, n_gdn_heads=v.n_gdn, fa_kv_sizes=v.fa_kv_sizes,
        qk_norm=True, fa_rope=v.plain, log_scaling=not v.plain, output_gate=not v.plain, fusion_norm=not v.plain,
    )


def decoder_layer(shape: Shape, v: Variant, device, dtype):
    """A ``HybridDecoderLayer`` (Qwen3 norms and MLP) around the variant's attention."""
    from transformers import Qwen3Config

    from headscope.hybrid.modeling import HybridDecoderLayer

    base = Qwen3Config(hidden_size=shape.hidden, intermediate_size=shape.mlp, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, num_hidden_layers=1)
    spec = layer_spec(shape, v)
    with torch.device(device):
        layer = HybridDecoderLayer(types.SimpleNamespace(layer_spec=lambda _: spec), base, 0)
    return layer.to(dtype=dtype).eval()


def rope(positions: torch.Tensor, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angle = positions[..., None].float() * inv_freq
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class SlotCache:
    """One layer's cache holding ``past`` tokens, preallocated; each decode step writes slot ``past`` in place.

    Implements the cache calls ``HeadwiseHybridAttention`` makes (``update``, ``has_previous_state``,
    ``layers[0].conv_states/recurrent_states``, ``update_conv_state``, ``update_recurrent_state``).
    """

    def __init__(self, spec, batch: int, past: int, device, dtype) -> None:
        d = spec.head_dim
        self.past = past
        self.keys = self.values = None
        if spec.n_fa_heads:
            self.keys = torch.randn(batch, spec.n_fa_kv_heads, past + 1, d, device=device, dtype=dtype)
            self.values = torch.randn_like(self.keys)
        conv = torch.randn(batch, 3 * spec.n_gdn_heads * d, spec.conv_size, device=device, dtype=dtype) if spec.n_gdn_heads else None
        state = 0.02 * torch.randn(batch, spec.n_gdn_heads, d, d, device=device) if spec.n_gdn_heads else None
        self.layers = [types.SimpleNamespace(conv_states={0: conv}, recurrent_states={0: state})]

    @classmethod
    def copy_of(cls, other: "SlotCache", device, dtype) -> "SlotCache":
        """The same cache contents on another device / dtype (the recurrent state stays float32)."""
        copy = cls.__new__(cls)
        copy.past = other.past
        move = lambda t, dt: t.to(device, dt, copy=True) if t is not None else None  # noqa: E731
        copy.keys, copy.values = move(other.keys, dtype), move(other.values, dtype)
        slot = other.layers[0]
        copy.layers = [types.SimpleNamespace(conv_states={0: move(slot.conv_states[0], dtype)},
                                             recurrent_states={0: move(slot.recurrent_states[0], torch.float32)})]
        return copy

    def nbytes(self) -> int:
        tensors = [self.keys, self.values, self.layers[0].conv_states[0], self.layers[0].recurrent_states[0]]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def update(self, k, v, layer_idx):
        self.keys[:, :, self.past :].copy_(k)
        self.values[:, :, self.past :].copy_(v)
        return self.keys, self.values

    def has_previous_state(self, layer_idx=None):
        return True

    def update_conv_state(self, conv, layer_idx, **kwargs):
        self.layers[0].conv_states[0].copy_(conv)

    def update_recurrent_state(self, state, layer_idx, **kwargs):
        self.layers[0].recurrent_states[0].copy_(state)


class Timer:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU), optional L2 flush."""

    def __init__(self, device: torch.device, budget_ms: float = 400.0) -> None:
        self.device, self.budget_ms = device, budget_ms
        self.flush_buffer = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, warmup: int = 2, flush: bool = False) -> float:
        for _ in range(warmup):
            fn()
        first = self._once(fn, flush)
        reps = int(min(50, max(4, self.budget_ms / max(first, 1e-3))))
        return statistics.median([first] + [self._once(fn, flush) for _ in range(reps)])

    def _once(self, fn, flush: bool) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        if flush:
            self.flush_buffer.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def graph_of(fn, device):
    """A CUDA graph replaying ``fn`` (captured after a side-stream warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_ceilings(device, tiny: bool) -> dict[str, float]:
    """bf16 matmul FLOP/s and device copy bytes/s (read + write), measured; nominal H100 values on failure."""
    ceilings = {"flops": 790e12, "bandwidth": 3.0e12, "measured": False}
    if device.type != "cuda" or tiny:
        return ceilings
    timer = Timer(device)
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timer(lambda: a @ b)
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    ceilings.update(flops=2 * n**3 / (ms * 1e-3), bandwidth=2 * src.numel() * 2 / (copy_ms * 1e-3), measured=True)
    return ceilings


# --- FLOP and byte counts ------------------------------------------------------------------------
def core_flops(v: Variant, shape: Shape, t: int, past: int = 0) -> float:
    """Prefill (past=0, T tokens, causal) or decode (T=1 query against past+1 keys) core FLOPs."""
    d = shape.head_dim
    keys = past + t
    fa = 2 * v.n_fa * d * (t * t if past == 0 else 2 * t * keys)  # causal halves 4·T²·D
    gdn = v.n_gdn * t * (10 * 64 * d + 6 * d * d)
    return float(fa + gdn)


def layer_params(v: Variant, shape: Shape) -> int:
    d, h = shape.head_dim, shape.hidden
    qkv = h * d * (v.n_fa + v.n_gdn + 2 * (len(v.fa_kv_sizes) + v.n_gdn))
    gate = h * d * v.n_fa if not v.plain else 0
    return qkv + gate + h * d * (v.n_fa + v.n_gdn) + 3 * h * shape.mlp + 2 * h * v.n_gdn


def state_bytes(v: Variant, shape: Shape, batch: int, tokens: int) -> dict[str, int]:
    d = shape.head_dim
    kv = 2 * batch * len(v.fa_kv_sizes) * tokens * d * 2
    gdn = batch * v.n_gdn * d * d * 4 + batch * 3 * v.n_gdn * d * 4 * 2
    return {"kv_bytes": kv, "state_bytes": gdn}


def floors(v: Variant, shape: Shape, scope: str, batch: int, t: int, past: int, ceilings) -> tuple[float, str]:
    """(floor ms, which term binds) for one call."""
    d = shape.head_dim
    flops = batch * core_flops(v, shape, t, past)
    sb = state_bytes(v, shape, batch, past + t)
    io = batch * t * d * 2 * (2 * (v.n_fa + v.n_gdn) + 2 * (len(v.fa_kv_sizes) + v.n_gdn))  # q, o, k, v
    nbytes = io + (sb["kv_bytes"] + 2 * sb["state_bytes"] if past else 0)
    if scope == "layer":
        flops += 2 * batch * t * layer_params(v, shape)
        nbytes += 2 * layer_params(v, shape) + 4 * batch * t * shape.hidden * 2
    flop_ms, byte_ms = flops / ceilings["flops"] * 1e3, nbytes / ceilings["bandwidth"] * 1e3
    return (flop_ms, "flops") if flop_ms >= byte_ms else (byte_ms, "bytes")


# --- sections ----------------------------------------------------------------------------------
class Run:
    """Shared state of one benchmark run: rows, errors, settings."""

    def __init__(self, args, device, dtype, shape: Shape, ceilings) -> None:
        self.args, self.device, self.dtype, self.shape, self.ceilings = args, device, dtype, shape, ceilings
        self.variants = variants(shape)
        self.timer = Timer(device)
        self.rows: list[dict] = []
        self.errors: list[str] = []

    def section(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 -- one failing section must not stop the run
            message = f"{name}: {type(err).__name__}: {err}"
            print("FAILED", message, file=sys.stderr)
            traceback.print_exc()
            self.errors.append(message)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def add(self, **row) -> None:
        v = self.variants.get(row["variant"])
        if v is not None and "ms" in row:
            past = row["context"] if row["phase"] == "decode" else 0
            t = 1 if row["phase"] == "decode" else row["context"]
            floor_ms, bound = floors(v, self.shape, row["scope"], row["batch"], t, past, self.ceilings)
            row.update(floor_ms=floor_ms, floor_bound=bound, floor_fraction=floor_ms / row["ms"])
            row.update(state_bytes(v, self.shape, row["batch"], row["context"]))
        self.rows.append(row)
        print("  " + " ".join(f"{k}={(round(x, 4) if isinstance(x, float) else x)}" for k, x in row.items()), flush=True)

    def inputs(self, batch: int, t: int, offset: int = 0):
        x = torch.randn(batch, t, self.shape.hidden, device=self.device, dtype=self.dtype)
        pos = torch.arange(offset, offset + t, device=self.device)[None].expand(batch, t)
        return x, rope(pos, self.shape.head_dim, self.dtype), pos


def check_correctness(run: Run) -> None:
    """The hybrid attention in bf16 on the device vs the same module in float32 on the CPU (torch kernels,
    F.conv1d), for a 256-token prefill and for one decode step against a 256-token cache; two streams vs
    sequential must be bit-identical. Raises on failure."""
    torch.manual_seed(0)
    attn = decoder_layer(run.shape, run.variants["headwise"], "cpu", torch.float32).self_attn
    d = run.shape.head_dim
    x, x1 = torch.randn(1, 256, run.shape.hidden), torch.randn(2, 1, run.shape.hidden)
    pos, pos1 = torch.arange(256)[None], torch.full((2, 1), 256)
    cache = SlotCache(attn.spec, 2, 256, "cpu", torch.float32)
    ref = attn(x, rope(pos, d, torch.float32), pos)
    ref1 = attn(x1, rope(pos1, d, torch.float32), pos1, SlotCache.copy_of(cache, "cpu", torch.float32))
    attn.to(run.device, run.dtype)
    on_device = lambda t: t.to(run.device, run.dtype) if t.is_floating_point() else t.to(run.device)  # noqa: E731
    results = {}
    for overlap in (False, True):
        attn.overlap_branches = overlap
        prefill = attn(on_device(x), rope(pos.to(run.device), d, run.dtype), pos.to(run.device))
        decode = attn(on_device(x1), rope(pos1.to(run.device), d, run.dtype), pos1.to(run.device), SlotCache.copy_of(cache, run.device, run.dtype))
        results[overlap] = (prefill, decode)
    rel = lambda a, b: float((a.float().cpu() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
    errors = (rel(results[True][0], ref), rel(results[True][1], ref1))
    same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
    print(f"check: {run.dtype} {run.device} hybrid attention vs float32 CPU: rel RMS prefill {errors[0]:.2e}, decode {errors[1]:.2e}; "
          f"two streams == sequential: {same}")
    run.add(phase="check", variant="headwise", scope="attention", batch=1, context=256, rel_rms_prefill=errors[0], rel_rms_decode=errors[1],
            overlap_equals_sequential=same)
    if not (all(math.isfinite(e) and e < 2e-2 for e in errors) and same):
        raise AssertionError(f"correctness check failed: rel RMS {errors}, two streams == sequential: {same}")


def bench_kernels(run: Run, t: int) -> None:
    """SDPA and gated_delta_rule alone (the anchors' numbers)."""
    s, d = run.shape, run.shape.head_dim
    _time_sdpa(run, t, torch.randn(1, s.heads, t, d, device=run.device, dtype=run.dtype),
               torch.randn(1, s.kv_heads, t, d, device=run.device, dtype=run.dtype),
               torch.randn(1, s.kv_heads, t, d, device=run.device, dtype=run.dtype))
    _time_gdn(run, t, s.heads - 2)


def _time_sdpa(run: Run, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    import torch.nn.functional as F

    for variant, heads in (("full", slice(None)), ("fa_branch", slice(0, 2))):
        kv = slice(None) if heads == slice(None) else slice(0, 1)
        ms = run.timer(partial(F.scaled_dot_product_attention, q[:, heads], k[:, kv], v[:, kv], is_causal=True, enable_gqa=True))
        run.add(phase="prefill", variant=variant, scope="kernel", batch=1, context=t, ms=ms)


def _time_gdn(run: Run, t: int, n: int) -> None:
    from headscope.kernels.gdn.ops import gated_delta_rule

    d = run.shape.head_dim
    unit = lambda: torch.nn.functional.normalize(torch.randn(1, t, n, d, device=run.device), dim=-1).to(run.dtype)  # noqa: E731
    q, k, v = unit(), unit(), torch.randn(1, t, n, d, device=run.device, dtype=run.dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(1, t, n, device=run.device))
    beta = torch.rand(1, t, n, device=run.device, dtype=run.dtype)
    ms = run.timer(partial(gated_delta_rule, q, k, v, g, beta))
    run.add(phase="prefill", variant="gdn_branch", scope="kernel", batch=1, context=t, ms=ms)


# which head-wise variants are also timed one branch after the other, and which as whole layers
OVERLAP_MODES = {"full": (True,), "headwise": (True, False), "fa_branch": (True,), "gdn_branch": (True,), "linear": (True,)}
WHOLE_LAYERS = ("full", "headwise", "linear")


def bench_prefill(run: Run, t: int) -> None:
    """Core and whole layer at batch 1, no cache; peak memory of one whole-layer call."""
    x, pe, pos = run.inputs(1, t)
    for name in OVERLAP_MODES:
        _prefill_variant(run, name, t, x, pe, pos)


def _prefill_variant(run: Run, name: str, t: int, x, pe, pos) -> None:
    v = run.variants[name]
    layer = decoder_layer(run.shape, v, run.device, run.dtype)
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    projected = attn.project(h)
    for overlap in OVERLAP_MODES[name]:
        attn.overlap_branches = overlap
        ms = run.timer(partial(attn.core, h, *projected, pe, pos))
        run.add(phase="prefill", variant=name, scope="core", mode="2 streams" if overlap else "sequential", batch=1, context=t, ms=ms)
    attn.overlap_branches = True
    if name in WHOLE_LAYERS:
        call = partial(layer, x, pe, pos)
        ms = run.timer(call)
        run.add(phase="prefill", variant=name, scope="layer", mode="2 streams" if v.n_fa and v.n_gdn else "", batch=1, context=t,
                ms=ms, peak_gb=_peak_gb(run, call))


def bench_decode(run: Run, t: int, batch: int, graph: bool) -> None:
    """One token against a T-token cache: core and whole layer, eagerly or as CUDA-graph replays."""
    x, pe, pos = run.inputs(batch, 1, offset=t)
    for name in OVERLAP_MODES:
        _decode_variant(run, name, t, batch, graph, x, pe, pos)


def _decode_variant(run: Run, name: str, t: int, batch: int, graph: bool, x, pe, pos) -> None:
    v = run.variants[name]
    layer = decoder_layer(run.shape, v, run.device, run.dtype)
    attn = layer.self_attn
    cache = SlotCache(attn.spec, batch, t, run.device, run.dtype)
    h = layer.input_layernorm(x)
    calls = {"core": partial(attn.core, h, *attn.project(h), pe, pos, cache)}
    if name in WHOLE_LAYERS:
        calls["layer"] = partial(layer, x, pe, pos, cache)
    for overlap in OVERLAP_MODES[name]:
        attn.overlap_branches = overlap
        for scope, call in calls.items():
            if scope == "layer" and not overlap:
                continue
            mode = ("2 streams" if overlap else "sequential") if v.n_fa and v.n_gdn else ""
            row = {"phase": "decode", "variant": name, "scope": scope, "mode": mode, "graph": graph, "batch": batch, "context": t}
            if not graph:
                run.add(**row, ms=run.timer(call, flush=True), peak_gb=_peak_gb(run, call) if scope == "layer" else None,
                        cache_gb=cache.nbytes() / 1e9)
                continue
            try:  # a capture that fails costs only its own row
                run.add(**row, ms=run.timer(graph_of(call, run.device), flush=True))
            except Exception as err:  # noqa: BLE001
                run.errors.append(f"graph decode {name}/{scope}/{mode} T={t} B={batch}: {type(err).__name__}: {err}")


def _peak_gb(run: Run, fn) -> float | None:
    if run.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


# --- results -----------------------------------------------------------------------------------
def pick(rows, **where) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()) and "ms" in row:
            return row["ms"]
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _core_ms(rows, t: int, variant: str, mode: str = "2 streams") -> float | None:
    return pick(rows, phase="prefill", scope="core", variant=variant, context=t, mode=mode)


def _decode(rows, t: int, batch: int, graph: bool, scope: str) -> dict:
    ms = {v: pick(rows, phase="decode", scope=scope, variant=v, context=t, batch=batch, graph=graph, mode="2 streams" if v == "headwise" else "")
          for v in ("full", "headwise", "linear")}
    layerwise = (ms["full"] + 3 * ms["linear"]) / 4 if ms["full"] and ms["linear"] else None
    return {"full": ms["full"], "headwise": ms["headwise"], "speedup": ratio(ms["full"], ms["headwise"]), "layerwise_3to1": layerwise}


def summarise(rows: list[dict], contexts: list[int]) -> dict:
    """Per-context derived numbers and the three goals."""
    per_context = {}
    for t in contexts:
        full, head2, head1 = _core_ms(rows, t, "full"), _core_ms(rows, t, "headwise"), _core_ms(rows, t, "headwise", "sequential")
        fa, gdn, lin = _core_ms(rows, t, "fa_branch"), _core_ms(rows, t, "gdn_branch"), _core_ms(rows, t, "linear")
        branch_sum = fa + gdn if fa and gdn else None
        entry = {
            "prefill_core_ms": {"full": full, "headwise": head2, "headwise_sequential": head1, "fa_branch": fa, "gdn_branch": gdn,
                                "linear": lin, "layerwise_3to1": (full + 3 * lin) / 4 if full and lin else None},
            "prefill_core_speedup": ratio(full, head2),
            "prefill_core_speedup_sequential": ratio(full, head1),
            "hybrid_over_branch_sum": ratio(head1, branch_sum),
            "hybrid_2streams_over_branch_sum": ratio(head2, branch_sum),
        }
        lf, lh, ll = (pick(rows, phase="prefill", scope="layer", variant=v, context=t) for v in WHOLE_LAYERS)
        entry["prefill_layer_speedup"] = ratio(lf, lh)
        entry["prefill_layer_ms"] = {"full": lf, "headwise": lh, "layerwise_3to1": (lf + 3 * ll) / 4 if lf and ll else None}
        for batch in (1, 32):
            for graph in (False, True):
                entry[f"decode_b{batch}{'_graph' if graph else ''}"] = {scope: _decode(rows, t, batch, graph, scope) for scope in ("core", "layer")}
        per_context[t] = entry
    last = per_context.get(131072, {})
    goals = {
        "prefill_core_128k_speedup": {"value": last.get("prefill_core_speedup"), "sequential": last.get("prefill_core_speedup_sequential"),
                                      "goal": f">= {GOALS['prefill_core_128k_speedup']}"},
        "hybrid_over_branch_sum": {"value": {t: e["hybrid_over_branch_sum"] for t, e in per_context.items()}, "goal": f"<= {GOALS['hybrid_over_branch_sum']}"},
        "decode_b32_128k_speedup": {"value": (last.get("decode_b32") or {}).get("core", {}).get("speedup"),
                                    "graph": (last.get("decode_b32_graph") or {}).get("core", {}).get("speedup"),
                                    "goal": f">= {GOALS['decode_b32_128k_speedup']}"},
    }
    return {"per_context": per_context, "goals": goals}


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown(meta: dict, rows: list[dict], summary: dict) -> str:
    lines = [f"# Head-wise hybrid speed ({meta['device']})", "",
             (f"One Qwen3-1.7B-like layer (hidden {meta['shape']['hidden']}, {meta['shape']['heads']} query / {meta['shape']['kv_heads']} KV heads, "
             f"head_dim {meta['shape']['head_dim']}, MLP {meta['shape']['mlp']}), {meta['dtype']}; torch {meta['torch']}. "
             f"Ceilings ({'measured' if meta['ceilings']['measured'] else 'nominal'}): {meta['ceilings']['flops'] / 1e12:.0f} TFLOP/s bf16, "
             f"{meta['ceilings']['bandwidth'] / 1e12:.2f} TB/s. Times are medians in ms; 'floor' = FLOPs or bytes over those ceilings."), "",
             "## Goals", ""]
    for name, goal in summary["goals"].items():
        value = goal["value"] if not isinstance(goal["value"], float) else round(goal["value"], 3)
        extra = "".join(f"; {key} {fmt(goal[key])}" for key in ("sequential", "graph") if key in goal)
        lines.append(f"- {name}: {json.dumps(value)} (goal {goal['goal']}){extra}")
    lines += ["", "## Prefill, batch 1, attention core (ms)", "",
              "| T | full | headwise (2 streams) | headwise (sequential) | FA branch | GDN branch | seq / branch sum | layer-wise 3:1 avg | full / headwise |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t, e in summary["per_context"].items():
        c = e["prefill_core_ms"]
        lines.append(f"| {t} | {fmt(c['full'])} | {fmt(c['headwise'])} | {fmt(c['headwise_sequential'])} | {fmt(c['fa_branch'])} | {fmt(c['gdn_branch'])} | "
                     f"{fmt(e['hybrid_over_branch_sum'])} | {fmt(c['layerwise_3to1'])} | {fmt(e['prefill_core_speedup'])}x |")
    lines += ["", "## Prefill, batch 1, whole layer (ms)", "", "| T | full | headwise | layer-wise 3:1 avg | full / headwise |", "|---|---|---|---|---|"]
    for t, e in summary["per_context"].items():
        c = e["prefill_layer_ms"]
        lines.append(f"| {t} | {fmt(c['full'])} | {fmt(c['headwise'])} | {fmt(c['layerwise_3to1'])} | {fmt(e['prefill_layer_speedup'])}x |")
    lines += ["", "## Decode one token (ms): core / whole layer", "",
              "| T | batch | graph | full core | headwise core | layer-wise avg core | full / headwise | full layer | headwise layer | layer-wise avg layer | full / headwise |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, e in summary["per_context"].items():
        for batch in (1, 32):
            for graph in (False, True):
                d = e[f"decode_b{batch}{'_graph' if graph else ''}"]
                c, l = d["core"], d["layer"]
                lines.append(f"| {t} | {batch} | {'yes' if graph else 'no'} | {fmt(c['full'])} | {fmt(c['headwise'])} | {fmt(c['layerwise_3to1'])} | {fmt(c['speedup'])}x | "
                             f"{fmt(l['full'])} | {fmt(l['headwise'])} | {fmt(l['layerwise_3to1'])} | {fmt(l['speedup'])}x |")
    lines += ["", "## All rows", "", "| phase | T | B | variant | scope | mode | graph | ms | floor ms (bound) | % of floor | KV GB | state MB | peak GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            continue
        lines.append(f"| {r['phase']} | {r['context']} | {r['batch']} | {r['variant']} | {r['scope']} | {r.get('mode', '')} | {'yes' if r.get('graph') else ''} | "
                     f"{fmt(r['ms'])} | {fmt(r.get('floor_ms'))} ({r.get('floor_bound', '')}) | {fmt(100 * r['floor_fraction'] if 'floor_fraction' in r else None)} | "
                     f"{fmt(r.get('kv_bytes', 0) / 1e9)} | {fmt(r.get('state_bytes', 0) / 1e6)} | {fmt(r.get('peak_gb'))} |")
    if meta["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in meta["errors"]]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> Path | None:
    """Prefill core and decode (B=32) core vs context: PNG via matplotlib, else HTML via plotly."""
    contexts = list(summary["per_context"])
    prefill = {k: [summary["per_context"][t]["prefill_core_ms"][k] for t in contexts]
               for k in ("full", "headwise", "headwise_sequential", "layerwise_3to1", "fa_branch", "gdn_branch")}
    decode = {k: [summary["per_context"][t]["decode_b32"]["core"][k] for t in contexts] for k in ("full", "headwise", "layerwise_3to1")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (title, series), ax in zip((("prefill, B=1, attention core", prefill), ("decode, B=32, attention core", decode)), axes):
            for name, ys in series.items():
                pts = [(t, y) for t, y in zip(contexts, ys) if y]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms", title=title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "hybrid_speed.png"
        fig.savefig(path, dpi=120)
        return path
    except ImportError:
        pass
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill, B=1, attention core", "decode, B=32, attention core"))
        for col, series in ((1, prefill), (2, decode)):
            for name, ys in series.items():
                fig.add_trace(go.Scatter(x=contexts, y=ys, name=name, mode="lines+markers"), row=1, col=col)
        fig.update_xaxes(type="log", title="context (tokens)")
        fig.update_yaxes(type="log", title="ms")
        path = out / "hybrid_speed.html"
        fig.write_html(path, include_plotlyjs=True)
        return path
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script, times nothing useful)")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="skip remaining sections after this long")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    shape = Shape(hidden=64, heads=16, kv_heads=8, head_dim=16, mlp=128) if args.tiny else Shape()
    contexts = [128, 256] if args.tiny else args.contexts
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    ceilings = measure_ceilings(device, args.tiny)
    print(f"ceilings: {ceilings['flops'] / 1e12:.0f} TFLOP/s, {ceilings['bandwidth'] / 1e12:.2f} TB/s ({'measured' if ceilings['measured'] else 'nominal'})")
    run = Run(args, device, dtype, shape, ceilings)
    plan = [("check", check_correctness, ())]
    plan += [(f"kernels T={t}", bench_kernels, (t,)) for t in contexts]
    plan += [(f"prefill T={t}", bench_prefill, (t,)) for t in contexts]
    plan += [(f"decode T={t} B={b}", bench_decode, (t, b, False)) for t in contexts for b in args.batches]
    if cuda:  # graphs last: a failed capture cannot spoil the eager numbers
        plan += [(f"decode graphs T={t} B={b}", bench_decode, (t, b, True)) for t in contexts for b in args.batches]
    with torch.inference_mode():
        for name, fn, fn_args in plan:
            if (time.time() - started) / 60 > args.max_minutes:
                run.errors.append(f"{name}: skipped (time budget of {args.max_minutes} min spent)")
                continue
            print(f"== {name} ({time.time() - started:.0f} s)", flush=True)
            run.section(name, fn, run, *fn_args)
    summary = summarise(run.rows, contexts)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (--tiny)", "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "shape": shape.__dict__, "ceilings": ceilings, "errors": run.errors, "seconds": time.time() - started}
    payload = {"meta": meta, "summary": summary, "rows": run.rows}
    (out / "hybrid_speed.json").write_text(json.dumps(payload, indent=1, default=str))
    report = markdown(meta, run.rows, summary)
    (out / "hybrid_speed.md").write_text(report)
    figure = plot(summary, out)
    print("\n" + report[report.index("## Goals") : report.index("## All rows")])
    print(f"wrote {out / 'hybrid_speed.json'}, {out / 'hybrid_speed.md'}" + (f", {figure}" if figure else " (no plotting library)"))
    return 1 if run.errors and not run.rows else 0


if __name__ == "__main__":
    sys.exit(main())
