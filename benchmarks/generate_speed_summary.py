"""The summary of ``benchmarks/generate_speed.py``'s row files: every variant's line (timings, checks, the GPU
that timed it), the per-token ratios of both baselines over the hybrid at each row's batch with the goals,
and the tables of the interleaved rounds (per token, TTFT) and of the first-token call's GPU work. The
checks behind the cells are ``generate_speed_report``'s."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from generate_speed_report import RANDOM_PROMPT, TWIN, VARIANTS, failed_check, twin_gap, variant_device

# the summary's per-token comparison: the original as transformers ships it, the original on the hybrid's kernels, the hybrid
SIDES = (("as shipped", ("original", "original_compiled")), ("same kernels", ("original_graph",)), ("hybrid", ("hybrid_eager", "hybrid_graph")))
SETTINGS = ("device", "dtype", "torch", "transformers", "new_tokens")
GOALS = {4096: 1.0, 32768: 2.0, 131072: 4.0}  # original / hybrid per-token latency, Qwen3-1.7B shape, batch 32


def short_device(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100' (the tables' GPU cells)."""
    return name.removeprefix("NVIDIA ").split(" ")[0] or "?"


def ttft_ms(result: dict) -> float:
    """A variant's TTFT: the median of its interleaved rounds where it has them, else its timed call's."""
    rounds = result.get("ttft_rounds_ms")
    return statistics.median(rounds) if rounds else result["ttft_ms"]


def ttft_text(result: dict) -> str:
    """The TTFT cell: ``median (min-max, n rounds)`` of the interleaved rounds, or the timed call's alone."""
    rounds = result.get("ttft_rounds_ms")
    if not rounds:
        return f"{result['ttft_ms']:.1f}"
    elsewhere = result.get("rounds_device") not in (None, result.get("device"))  # rounds of a later run on another GPU
    on = f" on {short_device(result['rounds_device'])}" if elsewhere else ""
    return f"{ttft_ms(result):.1f} ({min(rounds):.1f}-{max(rounds):.1f}, {len(rounds)} rounds{on})"


def per_token_rounds_table(rows: dict) -> list[str]:
    """Lines of the per-token ratios of the rows whose graph variants were timed again in interleaved rounds of
    whole calls (``per_token_rounds_ms``, one run on one GPU): original_graph's median over hybrid_graph's."""
    measured = [r for r in rows.values() if all("per_token_rounds_ms" in r.get("variants", {}).get(name, {})
                                                for name in ("hybrid_graph", "original_graph"))]
    if not measured:
        return []
    lines = ["", "## Per-token latency, interleaved rounds: the original on the same kernels / the hybrid", "",
             "Median (min-max) ms per token of whole `generate()` calls of the graph variants, alternating, every variant "
             "once per round (`--ttft-rounds` rounds, after the TTFT rounds): at batch 1 a replayed step is partly host work, "
             "whose speed drifts on the lent box, so this ratio is steadier than the timed calls' above. A variant whose "
             "tokens fail their checks gets no ratio.", "",
             "| model | context | batch | prompt | GPU | hybrid_graph ms | original_graph ms | same kernels / hybrid |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for record in measured:
        variants = record["variants"]
        cells, medians = [], []
        for name in ("hybrid_graph", "original_graph"):
            ms = variants[name]["per_token_rounds_ms"]
            medians.append(statistics.median(ms))
            cells.append(f"{medians[-1]:.3f} ({min(ms):.3f}-{max(ms):.3f})")
        failed = any(failed_check(variants[name], variants.get(TWIN.get(name))) for name in ("hybrid_graph", "original_graph"))
        ratio = "- (checks failed)" if failed else f"{medians[1] / medians[0]:.3f}x"
        gpu = short_device(variants["hybrid_graph"].get("rounds_device") or variant_device(variants["hybrid_graph"], record))
        lines.append(f"{row_head(record)} {gpu} | {cells[0]} | {cells[1]} | {ratio} |")
    return lines


def ttft_table(rows: dict) -> list[str]:
    """Lines of the TTFT ratios of the rows measured in interleaved rounds: each original variant's median over
    the hybrid_graph's (above 1: the hybrid gets its first token sooner)."""
    measured = [r for r in rows.values() if "ttft_rounds_ms" in r.get("variants", {}).get("hybrid_graph", {})]
    if not measured:
        return []
    lines = ["", "## Time to first token, interleaved rounds: the original's / the hybrid's", "",
             "Median ms of calls stopped at the first token, every variant once per round (`--ttft-rounds`); "
             "original_compiled's is its timed call's. A variant whose tokens fail their checks gets no ratio (as in the "
             "per-token table).", "",
             "| model | context | batch | prompt | hybrid_graph ms | original ms (x) | original_compiled ms (x) | original_graph ms (x) | hybrid_eager ms |",
             "|---|---:|---:|---|---:|---|---|---|---:|"]
    for record in measured:
        variants = record["variants"]
        flag = lambda name: failed_check(variants[name], variants.get(TWIN.get(name)))  # noqa: E731
        hybrid, hybrid_flag = ttft_ms(variants["hybrid_graph"]), flag("hybrid_graph")

        def cell(name: str) -> str:
            if "ttft_ms" not in variants.get(name, {}):
                return "-"
            ms, why = ttft_ms(variants[name]), flag(name)
            return f"{ms:.1f} (**{why}**)" if why else f"{ms:.1f}" + ("" if hybrid_flag else f" ({ms / hybrid:.2f}x)")

        eager = f"{ttft_ms(variants['hybrid_eager']):.1f}" if "ttft_ms" in variants.get("hybrid_eager", {}) else "-"
        shown = f"{hybrid:.1f}" + (f" (**{hybrid_flag}**)" if hybrid_flag else "")
        lines.append(f"{row_head(record)} {shown} | {cell('original')} | {cell('original_compiled')} | {cell('original_graph')} | {eager} |")
    return lines


def ttft_gpu_table(rows: dict) -> list[str]:
    """Lines of the GPU work of one first-token call per variant (``ttft_gpu``: kernel ms, launches) for the rows
    that have it, with the original_graph's kernel ms over the hybrid_graph's (above 1: the hybrid's prefill costs
    the GPU less): unlike the TTFT it does not move with the host's speed."""
    measured = [r for r in rows.values() if "ttft_gpu" in r.get("variants", {}).get("hybrid_graph", {})]
    if not measured:
        return []
    names = ("hybrid_graph", "original", "original_graph", "hybrid_eager")  # a variant whose profiler failed: '-' and why
    lines = ["", "## GPU work of one first-token call: kernel ms (launches)", "",
             "Summed durations of the kernels, copies and memsets one `generate()` call stopped at the first token puts on "
             "the GPU (torch profiler, after the TTFT rounds): TTFT minus this is time the GPU waited on the host.", "",
             "| model | context | batch | prompt | " + " | ".join(names) + " | original_graph / hybrid_graph |",
             "|---|---:|---:|---|" + "---:|" * (len(names) + 1)]
    for record in measured:
        work = {name: record["variants"].get(name, {}).get("ttft_gpu") for name in names}
        cells = [f"{w['kernel_ms']:.1f} ({w['launches']})" if w and "kernel_ms" in w else f"- ({w['failed']})" if w else "-"
                 for w in work.values()]
        both = all(w and "kernel_ms" in w for w in (work["original_graph"], work["hybrid_graph"]))
        ratio = f"{work['original_graph']['kernel_ms'] / work['hybrid_graph']['kernel_ms']:.2f}x" if both else "-"
        lines.append(f"{row_head(record)} " + " | ".join(cells) + f" | {ratio} |")
    return lines


def twin_text(twin: dict | None) -> str:
    """Where a variant's greedy tokens part from its eager twin's (``agreement``): 'identical' or 'parts at t'."""
    if twin is None:
        return ""
    firsts, rows = [t for t in twin["first_mismatch"] if t is not None], len(twin["first_mismatch"])
    if not firsts:
        return "identical"
    return f"parts at {min(firsts)}" + (f" ({twin['rows_identical']}/{rows} rows identical)" if rows > 1 else "")


def reference_text(check: dict | None, twin_check: dict | None = None) -> tuple[str, str]:
    """The summary's teacher-forced cells of a ``reference_gaps`` result: mean / max gap and consistent tokens
    (and, where some are not, whether the eager twin's max gap bounds them); step-1 difference."""
    if check is None:
        return "", ""
    if "failed" in check:
        return f"check {check['failed']}", ""
    total = check["rows"] * check["checked_tokens"]
    counted = f"{check['consistent']}/{total}"
    if check["consistent"] < total:
        bound = twin_gap(check, twin_check)
        counted = (f"{counted} (from step {check['first_inconsistent']}), all <= eager twin's max {bound:.2g}" if bound is not None
                   else f"**{counted}** (from step {check['first_inconsistent']})")
    return f"{check['mean_gap']:.2g} / {check['max_gap']:.2g}; {counted} <= {check['tolerance']:g}", f"{check['first_step_max_abs_diff']:.2g}"


def row_head(record: dict) -> str:
    """The first cells of a row file's line in every table: ``| model | context | batch | prompt |``; a trained hybrid's
    rows (``--hybrid``) name it in the model cell (the last two parts of its path), apart from the built hybrid's."""
    model, context, batch = record["row"].split(":")
    trained = record.get("hybrid_id", "").partition(" trained ")[2].partition(" weights ")[0]
    if trained:
        model += f" (trained hybrid {'/'.join(Path(trained).parts[-2:])})"
    return f"| {model} | {context} | {batch[1:]} | {record.get('prompt', RANDOM_PROMPT).split(' (')[0]} |"


def row_order(record: dict) -> tuple:
    """Summary order of a row file's record: model (the Qwen3 shape first), context, batch, prompt."""
    model, context, batch = record["row"].split(":")
    return model != "qwen3-1.7b", model, int(context), int(batch[1:]), record.get("prompt", RANDOM_PROMPT)


def row_settings(rows: dict) -> dict:
    """The settings the rows were measured with (``SETTINGS`` of each record), values of different rows joined by ' / '."""
    values = {key: sorted({str(record.get(key, "?")) for record in rows.values()}) for key in SETTINGS}
    values["device"] = sorted(set(values["device"]) | {variant_device(r, record) for record in rows.values()
                                                       for r in record.get("variants", {}).values()})  # (a rerun on another GPU)
    return {key: " / ".join(v) for key, v in values.items()}


def side(variants: dict, names: tuple[str, ...]) -> tuple[float | None, str, dict | None]:
    """The fastest per-token latency among a row's variants ``names`` whose checks hold, its cell and that
    variant's result (its ``run`` and ``device``); without one, '-' and why (each variant's failed check
    with its time, skip or failure, or 'not run'). A variant that fails its checks gives no ratio: its speed is
    not that of the model it stands for."""
    timed = {name: variants[name] for name in names if "per_token_ms" in variants.get(name, {})}
    failed = {name: failed_check(r, variants.get(TWIN.get(name))) for name, r in timed.items()}
    passed = [r for name, r in timed.items() if failed[name] is None]
    if passed:
        best = min(passed, key=lambda r: r["per_token_ms"])
        return best["per_token_ms"], f"{best['per_token_ms']:.2f}", best
    why = [f"{name}: {r['per_token_ms']:.2f} ms, **{failed[name]}**" for name, r in timed.items()]
    why += [f"{name}: {variants[name]['skipped']}" for name in names if "skipped" in variants.get(name, {})]
    return None, f"- ({'; '.join(why) if why else 'not run'})", None


def pair_note(result: dict, hybrid: dict, record: dict) -> str:
    """' (not side by side)' when two times come from different runs of the benchmark (a rerun of some variants of
    a row keeps the others'; at batch 1 the per-token time moves with the host's speed, which drifts between runs),
    naming both GPUs when the runs were on different ones."""
    gpus = [short_device(variant_device(r, record)) for r in (result, hybrid)]
    if gpus[0] != gpus[1]:
        return f" (not side by side: {gpus[0]} / {gpus[1]})"
    return "" if result.get("run") == hybrid.get("run") else " (not side by side)"


def ratio_line(record: dict) -> str:
    """One row of the per-token table: both baselines and the hybrid at the row's batch, their ratios, the goal."""
    model, context, batch = record["row"].split(":")
    ms, runs, cells = {}, {}, []
    for name, names in SIDES:
        ms[name], cell, runs[name] = side(record.get("variants", {}), names)
        cells.append(cell)
    ratios = {name: ms[name] / ms["hybrid"] if ms[name] and ms["hybrid"] else None for name in ("as shipped", "same kernels")}
    cells += [f"{r:.2f}x{pair_note(runs[name], runs['hybrid'], record)}" if r else "-" for name, r in ratios.items()]
    goal = GOALS.get(int(context)) if model == "qwen3-1.7b" and batch == "b32" else None
    if goal:
        verdicts = [f"{'met' if r >= goal else 'not met'} vs {name}" for name, r in ratios.items() if r]
        cells.append(f">= {goal:g}x: {', '.join(verdicts) if verdicts else 'no pair at this batch'}")
    else:
        cells.append("")
    return f"{row_head(record)} " + " | ".join(cells) + " |"


def summary_lines(rows: dict) -> list[str]:
    """The summary's markdown lines; ``rows``: row-file name -> record (each with its ``row`` and ``variants``)."""
    settings = row_settings(rows)
    lines = ["# generate() speed: original vs 7:1 head-wise hybrid", "",
             f"{settings['device']}, {settings['dtype']}, torch {settings['torch']}, transformers {settings['transformers']}. "
             f"Greedy, {settings['new_tokens']} new tokens after a prompt of `context` tokens (`prompt`: random ids, or a text file's "
             "tokens tiled to the context); `prefill`: in one pass or in chunks (transformers' prefill_chunk_size). TTFT = generate() "
             "entered -> first logits; per-token = mean of the later steps; tokens/s = batch x new tokens / total. Variants of one row "
             "ran in one process, except those a rerun added (a per-token ratio between two runs says 'not side by side'; variants timed before 2026-12-04 carry no run stamp and get no such note). `peak GB` includes the weights of every model the process holds (original and hybrid: 7.1 GB at the "
             "Qwen3-1.7B shape; original_graph shares the original's tensors).", "",
             "Two baselines. As shipped: `original` (transformers' DynamicCache, eager) and `original_compiled` (its StaticCache + "
             "torch.compile, reduce-overhead), whose sdpa attention gets a mask over the static length and so repeats every KV head to "
             "its query heads (`repeat_kv`) before the kernel, at each layer and step. Same kernels: `original_graph`, the original's "
             "own weights as an all-full-attention HybridForCausalLM (`build_full_attention`), decoded exactly as `hybrid_graph` "
             "(static cache, one CUDA graph per step, the `kernels/fa_decode` step that reads each KV head once for its query heads): "
             "the ratio against it is the one the attention change alone earns.", "",
             "Correctness, on the first --check-tokens new tokens. `greedy vs twin`: where the variant's greedy tokens part from its "
             "eager twin's (hybrid_graph vs hybrid_eager; original_compiled and original_graph vs original); in bf16 two kernel paths "
             "part at the first near-tie, so this alone says little. `ref gap`: teacher-forced against a plain forward with float32 "
             "weights (the hybrid's for the hybrid variants, the original's for all original variants; no cache, the prompt in one pass "
             "up to 4096 tokens, longer ones in chunks through a float32 cache) over the variant's own tokens, first --check-rows rows: "
             "mean / max over steps of "
             "log(p_best / p_chosen) in nats under that exact model, and how many tokens are within the tolerance; a fast path is "
             "fine when its gaps look like its eager twin's (bugs planted in the static path gave means of 1.6-10 nats on the CPU). "
             "`step-1 dlogit`: the largest |variant - reference| logit at the first step (the prefill). `graph = static eager`: the "
             "graph path's tokens equal the same static path's run eagerly with the same prefill (must hold exactly).", "",
             "| model | context | batch | prompt | prefill | variant | TTFT ms | per-token ms | tokens/s | peak GB | greedy vs twin | "
             "ref gap mean / max (nats); consistent | step-1 dlogit | graph = static eager | GPU |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|---|---|---:|---|---|"]
    for record in rows.values():
        head = row_head(record)
        for variant in VARIANTS:
            r = record.get("variants", {}).get(variant)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"{head} | {variant} | - | - | - | - | skipped: {r['skipped']} | | | | {short_device(variant_device(r, record))} |")
                continue
            chunk = r.get("prefill_chunk", record.get("prefill_chunk"))
            gap, first = reference_text(r.get("reference_check"), record.get("variants", {}).get(TWIN.get(variant), {}).get("reference_check"))
            graph = r.get("graph_equals_static_eager")
            check = f"check {graph['failed']}" if isinstance(graph, dict) else {True: "yes", False: "**NO**", None: ""}[graph]
            check += " (**capture failed: decoded eagerly**)" if r.get("graph_captured") is False else ""
            lines.append(f"{head} {f'chunks of {chunk}' if chunk else 'one pass'} | {variant} | {ttft_text(r)} | {r['per_token_ms']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {'%.1f' % r['peak_gb'] if 'peak_gb' in r else '-'} | "
                         f"{twin_text(r.get(f'vs_{TWIN.get(variant)}'))} | {gap} | {first} | {check} | {short_device(variant_device(r, record))} |")
    lines += ["", "## Per-token latency at the same batch: the original (as shipped; on the same kernels) / the hybrid", "",
              "Fastest variant of each side within one row (one batch); '-' says why a side has no time (skipped by the "
              "memory guard with its estimate, failed, or not run).", "",
              "| model | context | batch | prompt | original as shipped ms | original same kernels ms | hybrid ms | "
              "as shipped / hybrid | same kernels / hybrid | goal (Qwen3-1.7B shape, batch 32) |",
              "|---|---:|---:|---|---|---|---|---:|---:|---|"]
    lines += [ratio_line(record) for record in rows.values()]
    lines += per_token_rounds_table(rows)
    lines += ttft_table(rows)
    lines += ttft_gpu_table(rows)
    backends = {json.dumps(r["sdpa_backends"], sort_keys=True): r["sdpa_backends"] for r in rows.values() if "sdpa_backends" in r}
    if backends:
        lines += ["", "SDPA backend torch picks for the attention calls (`torch._fused_sdp_choice` on the rows' device; `generate_speed."
                  "sdpa_backends`): " + "; ".join(", ".join(f"{k} {v}" for k, v in b.items()) for b in backends.values()) + "."]
    return lines
