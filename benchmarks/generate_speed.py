"""End-to-end ``generate()`` speed: the original model against its 7:1 head-wise hybrid, side by side, resumable.

Models (bf16 on CUDA): ``qwen3-1.7b``, a random Qwen3 with Qwen3-1.7B's shape built from a config (no
download), whose hybrid keeps KV group 0 of every layer at full attention (2 of 16 heads: 7:1); and
``smollm2`` (``--model DIR``, e.g. SmolLM2-135M), whose hybrid uses ``--mask`` (default the KV-aware fused
mask ``benchmarks/results/smollm2/kv_aware_mask.json``; a random KV-aware 7:1 mask when that file was
made for another model). The hybrid is ``build_hybrid`` of the same weights. Each row is one (model,
context, batch) with random prompt tokens; in one process it times ``generate()`` (greedy, exactly
``--new-tokens`` new tokens) for each variant:

* ``original``: transformers' default (``DynamicCache``, eager);
* ``original_compiled``: transformers' ``StaticCache``, which ``generate()`` compiles on CUDA
  (``torch.compile``, mode reduce-overhead): the original's fast path. One cache serves the warm-up and the
  timed call (reset in between), as the hybrid's does: the compiled graphs treat the cache tensors as static
  addresses, and a fresh cache per call (``cache_implementation="static"``) would re-record them in the timed
  call;
* ``hybrid_eager``: the hybrid with ``decode_mode="dynamic"`` (``DynamicCache``, eager: the reference);
* ``hybrid_graph``: the hybrid's default on CUDA (``HybridStaticCache``, decode steps replayed as one
  CUDA graph; ``--smoke``: the same static path, eager, on the CPU).

Per variant: a warm-up ``generate()`` of the same shape stopped after 3 tokens (kernels compile, the
static caches and graphs are built and then reused), then the timed call (``--prefill-chunk``: all
variants prefill in chunks, transformers' ``prefill_chunk_size``, for batch x context that does not fit at once). A logits processor records a
CUDA event at every step, so one call gives the time to first token (``generate()`` entered -> first
logits: prefill and set-up) and the per-token latency (mean over the remaining steps); tokens/s = batch x
new tokens / total. Correctness: ``graph_equals_static_eager``: the graph path's first ``--check-tokens``
tokens against the same static path run eagerly (identical kernels: must be equal); and each variant's
tokens against its eager twin (``hybrid_graph`` vs ``hybrid_eager``, ``original_compiled`` vs
``original``): fraction equal and first mismatch (different kernels round differently in bf16, so long
greedy runs of a random model may part); ``graph_captured`` (CUDA): whether the hybrid's decode step really
was captured (a failed capture warns and decodes eagerly; the summary flags it). A variant whose estimated memory does not fit is recorded as
skipped with its estimate; an out-of-memory error is recorded, not raised.

Usage (GPU, after ``. benchmarks/gpu_setup.sh``)::

    python benchmarks/generate_speed.py --rows qwen3-1.7b:4096:b1,qwen3-1.7b:4096:b32
    python benchmarks/generate_speed.py --model /tmp/smol --rows smollm2:32768:b1

Rows are ``<model>:<context>:b<batch>`` over ``--contexts`` x ``--batches`` (default 4096, 32768, 131072 x
1, 32); without ``--rows`` every unfinished row of the models at hand runs. Row files
(``--rows-dir``, default ``benchmarks/results/generate_speed_rows``) are written after every variant; a
rerun runs only the missing variants (``--variants`` restricts them), and stops starting variants after
``--budget`` seconds. The summary ``$OUT/generate_speed.{json,md}`` (OUT defaults to benchmarks/results)
is rebuilt from all row files, and ``$OUT`` gets a copy of them. ``--smoke``: tiny models on the CPU in
float32 (results under /tmp/headscope_generate_speed_smoke).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("original", "original_compiled", "hybrid_eager", "hybrid_graph")
TWIN = {"hybrid_graph": "hybrid_eager", "original_compiled": "original"}
SMOL_MASK = ROOT / "benchmarks" / "results" / "smollm2" / "kv_aware_mask.json"
GOALS = {4096: 1.0, 32768: 2.0, 131072: 4.0}  # original / hybrid per-token latency, Qwen3-1.7B shape, batch 32


def qwen3_config(smoke: bool):
    from transformers import Qwen3Config

    if smoke:
        return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rope_theta=1e6, tie_word_embeddings=True)


class Bench:
    """Both models of one kind on the device, built once per process."""

    def __init__(self, kind: str, args, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

        from headscope.heads import HeadMask
        from headscope.hybrid import build_hybrid
        from headscope.models import load_model

        self.kind, self.device, self.dtype = kind, device, dtype
        torch.manual_seed(0)
        if kind == "smollm2":
            original = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        else:
            with torch.device(device):
                original = Qwen3ForCausalLM(qwen3_config(args.smoke)).to(dtype).eval()
        lm = load_model(original)
        fp = lm.fingerprint
        if kind == "smollm2":
            self.mask, self.mask_source = self._file_mask(args.mask or SMOL_MASK, fp)
        else:
            full = torch.zeros(fp.shape, dtype=torch.bool)
            full[:, : fp.group_size] = True  # KV group 0 of every layer
            self.mask, self.mask_source = HeadMask(full, fp, {"ratio": "7:1"}), "KV group 0 of every layer"
        self.original = original
        self.hybrid = build_hybrid(lm, self.mask)
        self.vocab = original.config.vocab_size
        self.config = original.config
        self._static = None  # ((batch, tokens), StaticCache) of original_compiled

    @staticmethod
    def _file_mask(path, fp):
        from headscope.heads import HeadscopeError
        from headscope.mask import random_mask
        from headscope.maskfile import load_mask

        try:
            return load_mask(path, expect=fp), str(path)
        except HeadscopeError as err:
            return random_mask(fp, "7:1", seed=0, kv_aware=True), f"random KV-aware 7:1 (seed 0; {Path(path).name}: {err})"

    def cache_bytes(self, variant: str, batch: int, tokens: int) -> int:
        """KV cache (and GDN states) of one generate() call, in bytes."""
        c, el = self.config, torch.finfo(self.dtype).bits // 8
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if variant.startswith("original"):
            return 2 * c.num_hidden_layers * c.num_key_value_heads * d * el * batch * tokens
        fa_kv, gdn = int(self.mask.kv_groups_full().sum()), int((~self.mask.full).sum())
        return 2 * fa_kv * d * el * batch * tokens + batch * gdn * (4 * d * d + 3 * d * self.hybrid.config.conv_size * el)

    def static_cache(self, batch: int, tokens: int):
        """The original's ``StaticCache`` for ``batch`` rows of ``tokens``: kept for the row's calls, made empty."""
        from transformers import StaticCache

        if self._static is None or self._static[0] != (batch, tokens):
            self._static = None  # free the old buffers before allocating the new ones
            cache, c = StaticCache(config=self.config, max_cache_len=tokens), self.config
            # allocated now, as generate() does for chunked prefill: a compiled chunk must not meet an empty cache
            cache.early_initialization(batch_size=batch, num_heads=c.num_key_value_heads, dtype=self.dtype, device=self.device,
                                       head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
            self._static = ((batch, tokens), cache)
        cache = self._static[1]
        with torch.inference_mode():  # its tensors were made under inference mode by the generate() that filled them
            cache.reset()
        return cache

    def release(self) -> None:
        """Drop the static caches of the last variant (the hybrid keeps its own on the model)."""
        self._static = None
        if hasattr(self.hybrid, "_headscope_static_cache"):
            delattr(self.hybrid, "_headscope_static_cache")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prefill_bytes(self, batch: int, tokens: int) -> int:
        """Rough activation peak of a prefill of ``batch x tokens`` (hidden states, the MLP, a DynamicCache copy)."""
        c, el = self.config, torch.finfo(self.dtype).bits // 8
        return batch * tokens * (8 * c.hidden_size + 3 * c.intermediate_size) * el


class StepClock:
    """A logits processor that timestamps every generation step (CUDA events, no synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.marks.append(self.mark())
        return scores

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def generation_kwargs(variant: str, new: int, processors=(), stop_after: int | None = None, prefill_chunk: int | None = None,
                      cache=None) -> dict:
    """generate()'s keywords for ``variant``; ``cache``: the ``StaticCache`` of ``original_compiled`` (required there)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    from headscope.hybrid.modeling import CACHE_FIELD

    class StopAfter(StoppingCriteria):
        def __init__(self, steps: int) -> None:
            self.steps, self.calls = steps, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, prefill_chunk_size=prefill_chunk)
    kwargs = {"generation_config": config, "logits_processor": LogitsProcessorList(list(processors))}
    if variant == "original_compiled":
        kwargs[CACHE_FIELD] = cache  # generate()'s keyword: past_key_values before transformers 5.24, cache after
    if stop_after:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopAfter(stop_after)])
    if variant.startswith("hybrid"):
        kwargs["decode_mode"] = "dynamic" if variant == "hybrid_eager" else ("graph" if torch.cuda.is_available() and variant == "hybrid_graph" else "static")
    return kwargs


def timed_generate(bench: Bench, variant: str, ids: torch.Tensor, new: int, prefill_chunk: int | None = None) -> dict:
    model = bench.hybrid if variant.startswith("hybrid") else bench.original
    mask = torch.ones_like(ids)
    cache = (lambda: bench.static_cache(ids.shape[0], ids.shape[1] + new)) if variant == "original_compiled" else (lambda: None)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, **generation_kwargs(variant, new, stop_after=3, prefill_chunk=prefill_chunk, cache=cache()))  # warm-up
        clock = StepClock(bench.device)
        kwargs = generation_kwargs(variant, new, processors=[clock], prefill_chunk=prefill_chunk, cache=cache())  # (the reset: untimed)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = clock.mark()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        end = clock.mark()
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
    marks = clock.marks
    total_ms = clock.ms(start, end)
    steps = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    result = {"ttft_ms": clock.ms(start, marks[0]), "per_token_ms": sum(steps) / max(1, len(steps)), "total_s": total_ms / 1e3,
              "tokens_per_s": ids.shape[0] * new / (total_ms / 1e3), "new_tokens": out[:, ids.shape[1]:].tolist()}
    if bench.device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    static = getattr(bench.hybrid, "_headscope_static_cache", None) if variant == "hybrid_graph" else None
    if static is not None and bench.device.type == "cuda":  # a failed capture warns and decodes eagerly: say so in the row
        result["graph_captured"] = static[0]._graph is not None
    return result


def graph_check(bench: Bench, ids: torch.Tensor, graph_tokens: list, n: int) -> bool:
    """The graph path's first ``n`` tokens equal the static path run eagerly (same kernels, no graph)."""
    with torch.inference_mode():
        kwargs = generation_kwargs("hybrid_graph", n)
        kwargs["decode_mode"] = "static"
        eager = bench.hybrid.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1]:]
    return eager.tolist() == [row[:n] for row in graph_tokens]


def agreement(tokens: list, reference: list) -> dict:
    a, b = torch.tensor(tokens), torch.tensor(reference)
    same = a == b
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in same]
    return {"match_fraction": float(same.float().mean()), "rows_identical": int(same.all(1).sum()), "first_mismatch": first}


def run_row(bench: Bench, row: str, record: dict, args, save, deadline: float) -> None:
    _, context, batch = row.split(":")
    context, batch = int(context), int(batch.removeprefix("b"))
    gen = torch.Generator().manual_seed(context + batch)
    ids = torch.randint(0, bench.vocab, (batch, context), generator=gen).to(bench.device)
    variants = record.setdefault("variants", {})
    free = torch.cuda.mem_get_info()[0] if bench.device.type == "cuda" else None
    for variant in args.variants:
        if variant in variants:
            continue
        if time.perf_counter() > deadline:
            print(f"  {row} {variant}: not started (budget spent); run again", flush=True)
            return
        need = bench.cache_bytes(variant, batch, context + args.new_tokens) + bench.prefill_bytes(batch, min(context, args.prefill_chunk or context))
        if free is not None and need > 0.92 * free:
            variants[variant] = {"skipped": f"needs ~{need / 1e9:.0f} GB (cache + prefill activations), {free / 1e9:.0f} GB free"}
        else:
            print(f"  {row} {variant} ...", flush=True)
            try:
                variants[variant] = timed_generate(bench, variant, ids, args.new_tokens, args.prefill_chunk)
                if variant == "hybrid_graph":
                    variants[variant]["graph_equals_static_eager"] = graph_check(bench, ids, variants[variant]["new_tokens"], args.check_tokens)
            except torch.OutOfMemoryError as err:
                variants[variant] = {"skipped": f"out of memory: {str(err).splitlines()[0]}"}
            except Exception as err:  # noqa: BLE001 -- one failing variant (a compile, a capture) must not stop the row
                traceback.print_exc()
                variants[variant] = {"skipped": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            finally:
                bench.release()
        for name, twin in TWIN.items():
            if "new_tokens" in variants.get(name, {}) and "new_tokens" in variants.get(twin, {}):
                variants[name][f"vs_{twin}"] = agreement(variants[name]["new_tokens"], variants[twin]["new_tokens"])
        result = variants[variant]
        print(f"  {row} {variant}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                                                 if k not in ("new_tokens",) and not k.startswith("vs_")), flush=True)
        save()


def summary_lines(rows: dict, settings: dict) -> list[str]:
    lines = ["# generate() speed: original vs 7:1 head-wise hybrid", "",
             f"{settings['device']}, {settings['dtype']}, torch {settings['torch']}, transformers {settings['transformers']}. "
             f"Greedy, {settings['new_tokens']} new tokens after a random prompt of `context` tokens; TTFT = generate() entered -> "
             "first logits; per-token = mean of the later steps; tokens/s = batch x new tokens / total. Variants of one row ran in one "
             "process. `graph = static eager`: the graph path's first tokens equal the same static path run eagerly.", "",
             "| model | context | batch | variant | TTFT ms | per-token ms | tokens/s | peak GB | tokens = eager twin | graph = static eager |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for name, record in rows.items():
        model, context, batch = name.split(":")
        for variant in VARIANTS:
            r = record.get("variants", {}).get(variant)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {model} | {context} | {batch[1:]} | {variant} | - | - | - | - | skipped: {r['skipped']} | |")
                continue
            twin = r.get(f"vs_{TWIN.get(variant)}")
            twin_text = "" if twin is None else f"{twin['match_fraction']:.2f} ({twin['rows_identical']} rows identical)"
            check = {True: "yes", False: "**NO**", None: ""}[r.get("graph_equals_static_eager")]
            check += " (**capture failed: decoded eagerly**)" if r.get("graph_captured") is False else ""
            lines.append(f"| {model} | {context} | {batch[1:]} | {variant} | {r['ttft_ms']:.1f} | {r['per_token_ms']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {'%.1f' % r['peak_gb'] if 'peak_gb' in r else '-'} | {twin_text} | {check} |")
    lines += ["", "## Per-token latency, original / hybrid (fastest variant of each)", "",
              "| model | context | batch | original ms | hybrid ms | ratio | goal (Qwen3-1.7B shape, batch 32) |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, record in rows.items():
        model, context, batch = name.split(":")
        best = {}
        for side in ("original", "hybrid"):
            times = [r["per_token_ms"] for v, r in record.get("variants", {}).items() if v.startswith(side) and "per_token_ms" in r]
            best[side] = min(times) if times else None
        ratio = best["original"] / best["hybrid"] if best["original"] and best["hybrid"] else None
        goal = GOALS.get(int(context)) if model == "qwen3-1.7b" and batch == "b32" else None
        fmt = lambda x: f"{x:.2f}" if x else "-"  # noqa: E731
        lines.append(f"| {model} | {context} | {batch[1:]} | {fmt(best['original'])} | {fmt(best['hybrid'])} | {fmt(ratio)}{'x' if ratio else ''} | "
                     f"{'>= %gx: %s' % (goal, 'met' if ratio and ratio >= goal else 'not met') if goal else ''} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local HF model directory: the smollm2 rows (e.g. SmolLM2-135M)")
    parser.add_argument("--mask", default=None, help="mask file of --model's hybrid (default: benchmarks/results/smollm2/kv_aware_mask.json)")
    parser.add_argument("--rows", default=None, help="comma list of <model>:<context>:b<batch> rows (default: every unfinished row)")
    parser.add_argument("--rows-dir", default=None)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=32, help="tokens of the graph vs static-eager check")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens (all variants; less activation memory)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds: start no variant after this")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32 (the test)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from headscope.heads import write_json_atomic, write_text_atomic

    if args.smoke:
        args.contexts, args.batches, args.new_tokens, args.check_tokens = [16, 40], [1, 3], 6, 4
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}; variants are {', '.join(VARIANTS)}")
    results = Path("/tmp/headscope_generate_speed_smoke") if args.smoke else ROOT / "benchmarks" / "results"
    rows_dir = Path(args.rows_dir or results / "generate_speed_rows")
    out_dir = Path(os.environ.get("OUT", results))
    kinds = ["qwen3-1.7b"] + (["smollm2"] if args.model else [])
    order = [f"{k}:{c}:b{b}" for k in kinds for c in args.contexts for b in args.batches]
    wanted = args.rows.split(",") if args.rows else order
    for row in wanted:
        parts = row.split(":")
        if len(parts) != 3 or parts[0] not in ("qwen3-1.7b", "smollm2") or not parts[1].isdigit() or not parts[2].startswith("b"):
            parser.error(f"row {row!r} is not <qwen3-1.7b|smollm2>:<context>:b<batch>")
        if parts[0] == "smollm2" and not args.model:
            parser.error(f"row {row!r} needs --model (the SmolLM2 directory)")
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    import transformers

    settings = {"device": torch.cuda.get_device_name() if cuda else "cpu (--smoke)", "dtype": str(dtype).removeprefix("torch."),
                "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": args.new_tokens}
    if args.prefill_chunk:
        settings["prefill_chunk"] = args.prefill_chunk
    row_path = lambda row: rows_dir / f"{row.replace(':', '_')}.json"  # noqa: E731

    def write_summary() -> None:
        rows = {row: json.loads(row_path(row).read_text()) for row in dict.fromkeys(order + wanted) if row_path(row).is_file()}
        write_json_atomic(out_dir / "generate_speed.json", {"settings": settings, "rows": rows})
        write_text_atomic(out_dir / "generate_speed.md", "\n".join(summary_lines(rows, settings)) + "\n")

    pending = [row for row in wanted if not row_path(row).is_file()
               or not set(args.variants) <= set(json.loads(row_path(row).read_text()).get("variants", {}))]
    print(f"{len(wanted) - len(pending)} of {len(wanted)} rows done in {rows_dir}; running {pending or 'none'}", flush=True)
    benches: dict[str, Bench] = {}
    for row in pending:
        kind = row.split(":")[0]
        if kind not in benches:
            benches.clear()
            gc.collect()
            benches[kind] = Bench(kind, args, device, dtype)
        bench = benches[kind]
        record = json.loads(row_path(row).read_text()) if row_path(row).is_file() else {}
        record.update(row=row, mask=bench.mask_source, n_full_heads=bench.mask.n_full, **settings)
        run_row(bench, row, record, args, lambda: (write_json_atomic(row_path(row), record), write_summary()), started + args.budget)
    if out_dir.resolve() != rows_dir.parent.resolve() and rows_dir.is_dir():
        shutil.copytree(rows_dir, out_dir / rows_dir.name, dirs_exist_ok=True)
    write_summary()
    print((out_dir / "generate_speed.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
