"""One captured decode step of the 7:1 hybrid against the original on the same kernels, without a prefill (issue 15).

``generate_speed.py`` measures what a user sees, end to end, but a 128K row costs minutes of prefill and checks per
variant. This script times what its per-token latency is made of: one decode step as ``generate()`` runs it on a
``HybridStaticCache`` (``HybridStaticCache.decode``: the step's inputs copied in, the captured CUDA graph of
``HybridForCausalLM.decode_logits`` replayed), for ``hybrid_graph`` and ``original_graph`` (the original's own
weights as an all-FA hybrid, ``build_full_attention``), at a cache that already holds ``context`` tokens per row:
random keys and values (the work does not depend on them), random GDN conv windows and states, every slot valid.
The models are ``generate_speed``'s (``generate_speed_models.Bench``: a random Qwen3-1.7B shape with KV group 0 of
every layer at full attention, and the SmolLM2-135M shape with its KV-aware mask).

Per row (model, context, batch) and model: ms per step (CUDA events over ``--steps`` replays after three warm-up
steps, median of ``--rounds`` rounds), the kernels one step launches (one eager step under torch.profiler: what
the graph replays) and, with ``--ablate``, the same step with the one-launch block ops switched
off (``kernels/rms_norm``'s add + RMSNorm and ``kernels/swiglu``: their eager torch ops instead), which measures
what those cuts earn on each side, and compares the first step's logits of the two (the largest |difference|: bf16
rounding where the kernels are right, differences the size of the logits themselves where one is wrong). Rows are written after each model (``$OUT/decode_step_rows/``, atomic) and
skipped when present (``--redo`` to time them again); ``$OUT/decode_step_speed.{json,md}`` summarise every row file.

Not an end-to-end number: ``generate()`` adds its own per-step host work (logits processors, stopping checks,
a host sync), which the GPU hides only when the step is long enough; ``generate_speed.py`` stays the measure of the
issue's goals. ``--smoke``: tiny models on the CPU in float32 (the static step run eagerly: no graph there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # generate_speed's helper modules, also when this script is loaded by path (the tests)

import torch  # noqa: E402

import headscope.kernels.rms_norm.ops as norm_ops  # noqa: E402
import headscope.kernels.swiglu.ops as swiglu_ops  # noqa: E402
from generate_speed_device import gpu_work  # noqa: E402
from generate_speed_models import ROOT, Bench  # noqa: E402
from headscope.heads import HeadscopeError, write_json_atomic, write_text_atomic  # noqa: E402

MODELS = ("original_graph", "hybrid_graph")
WARM_UP = 3  # steps before timing: eager (kernels compile), capture, first replay
DEFAULT_ROWS = "qwen3-1.7b:4096:b1,qwen3-1.7b:4096:b32,qwen3-1.7b:32768:b32,qwen3-1.7b:131072:b8,smollm2-shape:4096:b32,smollm2-shape:32768:b32"


def parse_rows(text: str) -> list[tuple[str, int, int]]:
    """``<model>:<context>:b<batch>`` rows; a HeadscopeError naming the first bad one."""
    rows = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("qwen3-1.7b", "smollm2-shape") or not parts[1].isdigit() or not parts[2][1:].isdigit() \
                or parts[2][0] != "b" or int(parts[1]) < 1 or int(parts[2][1:]) < 1:
            raise HeadscopeError(f"bad row {item!r}: want <qwen3-1.7b|smollm2-shape>:<context>:b<batch>, e.g. qwen3-1.7b:4096:b32")
        rows.append((parts[0], int(parts[1]), int(parts[2][1:])))
    return rows


def filled_cache(model, batch: int, context: int, extra: int, graphed: bool, seed: int):
    """A ``HybridStaticCache`` for ``model`` holding ``context`` random tokens per row (room for ``extra`` more)."""
    from headscope.hybrid.static_cache import HybridStaticCache

    cache = HybridStaticCache(model, batch, context + extra, graphed=graphed)
    gen = torch.Generator(device=cache.device).manual_seed(seed)
    for t in cache.keys + cache.values:
        if t is not None:
            t[:, :, :context].normal_(generator=gen)  # (B, Hkv, context, D)
    for t in cache.conv_states:
        if t is not None:
            t.normal_(generator=gen)
    for t in cache.recurrent_states:
        if t is not None:
            t.normal_(std=0.05, generator=gen)  # (B, H, D, D) float32
    cache.valid[:, :context] = 1
    cache.seen.fill_(context)
    cache.seen_tokens = context
    return cache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_steps(model, cache, vocab: int, steps: int, rounds: int) -> tuple[list[float], torch.Tensor]:
    """ms per decode step in each round (CUDA events on the GPU, wall time on the CPU), after ``WARM_UP`` steps,
    and the first step's logits ``(B, 1, vocab)`` float32 on the CPU."""
    device, batch, start = cache.device, cache.batch_size, cache.seen_tokens
    ids = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(start)).to(device)
    positions = [torch.full((batch, 1), start + i, device=device) for i in range(WARM_UP + rounds * steps)]
    for i in range(WARM_UP):
        logits = cache.decode(model, ids, None, positions[i])
        if i == 0:
            first = logits.float().cpu()
    if not torch.isfinite(logits).all():
        raise HeadscopeError(f"decode step of {type(model).__name__} at {start} tokens gave non-finite logits")
    per_round = []
    for r in range(rounds):
        sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        for i in range(steps):
            cache.decode(model, ids, None, positions[WARM_UP + r * steps + i])
        if device.type == "cuda":
            end.record()
            sync(device)
            per_round.append(begin.elapsed_time(end) / steps)
        else:
            per_round.append((time.perf_counter() - t0) * 1e3 / steps)
    return per_round, first


@torch.no_grad()
def step_gpu_work(model, cache) -> dict | None:
    """CUDA kernels (and memcpy/memset) one eager step of the static path launches, what its graph replays
    (``cache`` not graphed; torch.profiler's CUDA activity): ``{"launches", "kernel_ms", "by_kernel"}`` (the 12
    kernel names with the most GPU time, ``[launches, us]``); None on the CPU."""
    if cache.device.type != "cuda":
        return None
    ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
    positions = torch.full((cache.batch_size, 1), cache.seen_tokens, device=cache.device)
    cache.decode(model, ids, None, positions)  # kernels compiled, cuBLAS settled
    work = gpu_work(lambda: cache.decode(model, ids, None, positions + 1), by_kernel=12)
    if "failed" in work:  # a profiler that cannot start (CUPTI busy): the timings still count
        print(f"  kernels per step not counted: {work['failed']}", flush=True)
        return None
    return work


@contextlib.contextmanager
def block_ops(fused: bool):
    """For the calls inside: the one-launch block add + RMSNorm and MLP activation on (``fused``) or off (eager torch ops)."""
    before = norm_ops.FUSED, swiglu_ops.FUSED
    norm_ops.FUSED = swiglu_ops.FUSED = fused
    try:
        yield
    finally:
        norm_ops.FUSED, swiglu_ops.FUSED = before


def run_row(bench: Bench, context: int, batch: int, args, device: torch.device) -> dict:
    """Both models' step times at one (context, batch), with the block ops on and, with ``--ablate``, off."""
    record = {"context": context, "batch": batch, "mask": bench.mask_source, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": str(bench.dtype).removeprefix("torch."), "torch": torch.__version__}
    for name in MODELS:
        model = bench.same_kernels if name == "original_graph" else bench.hybrid
        logits = {}
        for fused in (True, False) if args.ablate else (True,):
            cache = filled_cache(model, batch, context, WARM_UP + args.rounds * args.steps + 8, device.type == "cuda", seed=context + batch)
            with block_ops(fused):
                rounds, logits[fused] = time_steps(model, cache, bench.vocab, args.steps, args.rounds)
            del cache
            bench.release()
            record.setdefault(name, {})["ms" if fused else "ms_eager_block_ops"] = statistics.median(rounds)
            record[name]["rounds" if fused else "rounds_eager_block_ops"] = rounds
            print(f"  {name} {context} x {batch}{'' if fused else ' (eager block ops)'}: {statistics.median(rounds):.3f} ms/step", flush=True)
        cache = filled_cache(model, batch, context, 4, graphed=False, seed=context + batch)
        work = step_gpu_work(model, cache)
        record[name]["kernels_per_step"] = work["launches"] if work is not None else None
        if work is not None:
            record[name]["step_gpu_work"] = work
        del cache
        bench.release()
        if args.ablate:  # the same first step (same cache, same token) through the one-launch block ops and through torch's
            record[name]["first_step_max_abs_dlogit_vs_eager_block_ops"] = float((logits[True] - logits[False]).abs().max())
    record["ratio"] = record["original_graph"]["ms"] / record["hybrid_graph"]["ms"]
    return record


def summary(rows: dict) -> list[str]:
    """The markdown table of every row file."""
    lines = ["# One captured decode step: original on the same kernels vs the 7:1 hybrid", "",
             "`benchmarks/decode_step_speed.py`: `HybridStaticCache.decode` at a cache already holding `context` random "
             "tokens per row, CUDA-graph replay; ms per step (median of rounds). 'eager block ops': the block's add + "
             "RMSNorm and MLP activation as torch ops instead of one launch each. Not end to end: `generate()` adds its "
             "per-step host work (`generate_speed.py` measures that).", "",
             "| model | context | batch | device | original_graph ms | hybrid_graph ms | original / hybrid | kernels per step "
             "(original / hybrid) | original, eager block ops | hybrid, eager block ops | step-1 max dlogit vs eager block ops "
             "(original / hybrid) |", "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---|"]
    fmt = lambda r, key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
    for key in sorted(rows, key=lambda k: (rows[k]["model"], rows[k]["context"], rows[k]["batch"])):
        r = rows[key]
        o, h = r["original_graph"], r["hybrid_graph"]
        lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['device']} | {fmt(o, 'ms')} | {fmt(h, 'ms')} | "
                     f"{r['ratio']:.2f}x | {o.get('kernels_per_step', '-')} / {h.get('kernels_per_step', '-')} | {fmt(o, 'ms_eager_block_ops')} | {fmt(h, 'ms_eager_block_ops')} | "
                     f"{fmt(o, 'first_step_max_abs_dlogit_vs_eager_block_ops')} / {fmt(h, 'first_step_max_abs_dlogit_vs_eager_block_ops')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of <model>:<context>:b<batch>")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ablate", action="store_true", help="also time each model with the one-launch block ops off")
    parser.add_argument("--redo", action="store_true", help="time rows again even where their files exist")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds: start no row after this")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32 (the test)")
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
    except HeadscopeError as err:
        parser.exit(2, f"decode_step_speed: {err}\n")
    if args.steps < 1 or args.rounds < 1:
        parser.exit(2, "decode_step_speed: --steps and --rounds must be at least 1\n")
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    rows_dir = out / "decode_step_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bench_args = types.SimpleNamespace(smoke=args.smoke, model=None, mask=None)
    benches, started = {}, time.monotonic()
    for kind, context, batch in rows:
        path = rows_dir / f"{kind}_{context}_b{batch}.json"
        if path.exists() and not args.redo:
            print(f"{path.name}: recorded", flush=True)
            continue
        if time.monotonic() - started > args.budget:
            print(f"{kind}:{context}:b{batch}: not started (budget spent); run again", flush=True)
            continue
        if kind not in benches:
            benches.clear()  # one model kind on the device at a time
            benches[kind] = Bench(kind, bench_args, device, dtype)
        record = {"model": kind, **run_row(benches[kind], context, batch, args, device)}
        write_json_atomic(path, record)
    recorded = {p.stem: json.loads(p.read_text()) for p in rows_dir.glob("*.json")}
    write_json_atomic(out / "decode_step_speed.json", recorded)
    write_text_atomic(out / "decode_step_speed.md", "\n".join(summary(recorded)) + "\n")
    print("\n".join(summary(recorded)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
