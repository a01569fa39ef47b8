"""Screen vs exhaustive exact scoring: the K / speed / overlap trade-off curve of ``screen``.

``screen`` scores every head with attribution patching (AtP) and re-scores the top ``K`` by |estimate|
with exact activation patching. Per probe this benchmark computes, once each, the exhaustive exact
``activation`` scores of all heads and the AtP estimates; the screen at any ``K`` is then AtP with the
exact values of its top ``K`` heads (``screen_order``), so the overlap curve over ``--top-ks`` costs no
further scoring. Speed is measured on real ``screen_scores`` runs at the smallest and largest ``K``
(every ``K`` with ``--time-all``), which also check that composition: their values must equal the
composed ones. A ``K`` between two timed ones gets its time by linear interpolation (the measured cost
per extra verified head); the output marks those times *derived*.

Reported per probe and ``K``: the overlap ``|A ∩ B| / budget`` of the 7:1 head sets (top |score|) of
screen and exhaustive exact, and speed-up = exhaustive exact time / screen time (each includes its
clean/corrupt set-up runs). Over the probes: the fused 7:1 masks (``fuse`` defaults, over the chosen
probes) from exact scores vs from screen scores at each ``K``, and the total speed-up. ``K = 0`` is AtP
alone. The teacher's clean-minus-corrupt logit-difference gap is reported per probe: where the model
does not solve a probe (gap near 0) its normalised scores are noise, and so is any overlap on them.

Resumable: every finished stage (exact, AtP, each timed screen) of a probe is kept in
``--work``/``<probe>.json`` (written atomically, with the settings; other settings there are refused),
and the summary ``--out``/``--name``.{json,md} is rebuilt after each stage, listing what is missing.

Usage (CPU)::

    python benchmarks/screen_overlap.py                       # bundled demo model, all built-in probes
    python benchmarks/screen_overlap.py --model /work/cache/models/smollm2-135m --length 256 --pairs 8 \\
        --probes needle_single,needle_multikey,kv_recall,induction,ioi --name screen_overlap_smollm2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadscopeError, clean_corrupt_gap, read_json, write_json_atomic, write_text_atomic
from headscope.cli import script_main

SOURCE_RUN, SOURCE_COMPOSED = "screen run", "AtP + exhaustive exact"


def top_set(values: torch.Tensor, k: int) -> set[int]:
    """Flat indices of the ``k`` largest |values|."""
    return set(values.abs().flatten().topk(k).indices.tolist())


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of the top-``k`` (by |value|) heads of ``a`` that are also top-``k`` of ``b``."""
    return len(top_set(a, k) & top_set(b, k)) / k


def composed_screen(estimate: torch.Tensor, exact: torch.Tensor, k: int) -> torch.Tensor:
    """What ``screen_scores(top_k=k)`` returns given its AtP estimate and exact values: ``(L, H)``."""
    from headscope.patching import screen_order

    order = screen_order(estimate, k)
    values = estimate.clone()
    values.view(-1)[order] = exact.flatten()[order]
    return values


def timed(fn):
    """``(fn(), wall seconds, CPU seconds of this process)``; CPU time is less sensitive to other load on the box."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started, time.process_time() - cpu_started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from headscope.probes.tasks import TASK_NAMES, get_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--probes", default=",".join(TASK_NAMES), help="comma list of built-in probes (default: all)")
    parser.add_argument("--top-ks", default=None, help="comma list of K (default: 1, 1.5, 2 and 3 times the budget)")
    parser.add_argument("--time-all", action="store_true", help="run screen for every K, not only the smallest and largest")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--ratio", default="7:1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="summary directory (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="screen_overlap", help="summary file stem (default: screen_overlap)")
    parser.add_argument("--work", default=None, help="per-probe partial results (default: <out>/<name>_work)")
    args = parser.parse_args(argv)
    args.probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    for name in args.probes:
        get_task(name)
    if not args.probes or len(set(args.probes)) != len(args.probes):
        raise HeadscopeError(f"--probes needs distinct probe names, got {args.probes}")
    if args.top_ks is not None:
        try:
            args.top_ks = [int(k) for k in args.top_ks.split(",")]
        except ValueError:
            raise HeadscopeError(f"--top-ks must be a comma list of integers, got {args.top_ks!r}") from None
    return args


def curve_ks(top_ks: list[int] | None, budget: int, n_total: int) -> list[int]:
    ks = top_ks if top_ks is not None else [min(n_total, round(f * budget)) for f in (1, 1.5, 2, 3)]
    bad = [k for k in ks if not 1 <= k <= n_total]
    if bad:
        raise HeadscopeError(f"--top-ks must lie between 1 and the model's {n_total} heads, got {bad}")
    return sorted(set(ks))


class Work:
    """One probe's finished stages in ``<work>/<probe>.json``, written atomically after each stage."""

    def __init__(self, work: Path, probe: str, settings: dict) -> None:
        self.path = work / f"{probe}.json"
        self.data = read_json(self.path, "partial results") if self.path.is_file() else {"settings": settings, "stages": {}}
        if self.data.get("settings") != settings:
            changed = sorted(k for k in settings if self.data.get("settings", {}).get(k) != settings[k])
            raise HeadscopeError(f"{self.path} was made with other settings ({', '.join(changed)}); pass another --work")
        self.stages: dict = self.data["stages"]

    def save(self, stage: str, record: dict) -> None:
        self.stages[stage] = {**record, "load_avg_1min": os.getloadavg()[0]}
        write_json_atomic(self.path, self.data)


def run_stage(lm, probe, stage: str) -> dict:
    from headscope.patching import attribution_scores, score, screen_scores

    if stage == "exact":
        result, seconds, cpu_seconds = timed(lambda: score(lm, probe, "activation", progress=False))
    elif stage == "attribution":
        result, seconds, cpu_seconds = timed(lambda: attribution_scores(lm, probe, progress=False))
    else:
        result, seconds, cpu_seconds = timed(lambda: screen_scores(lm, probe, top_k=int(stage.split("_")[1]), progress=False))
    return {"values": result.values.tolist(), "seconds": seconds, "cpu_seconds": cpu_seconds, "capability": result.capability,
            "ld_clean": result.meta["ld_clean"], "ld_corrupt": result.meta["ld_corrupt"]}


def screen_time(stages: dict, k: int, timed_ks: list[int], clock: str) -> float:
    """Screen's ``clock`` (``seconds`` or ``cpu_seconds``) at ``k``: measured, or interpolated between the nearest timed K."""
    if k in timed_ks:
        return stages[f"screen_{k}"][clock]
    lo, hi = max(t for t in timed_ks if t < k), min(t for t in timed_ks if t > k)
    t_lo, t_hi = stages[f"screen_{lo}"][clock], stages[f"screen_{hi}"][clock]
    return t_lo + (k - lo) * (t_hi - t_lo) / (hi - lo)


def summarise(records: dict[str, dict], args, settings: dict, fp, budget: int, ks: list[int], timed_ks: list[int]) -> dict:
    """The summary record of every probe whose stages are all done, and what is missing."""
    from headscope.fusion import fuse
    from headscope.heads import HeadScores
    from headscope.mask import select_mask
    from headscope.patching import rank_correlation

    needed = ["exact", "attribution", *(f"screen_{k}" for k in timed_ks)]
    done = [p for p in args.probes if all(s in records[p] for s in needed)]
    missing = {p: [s for s in needed if s not in records[p]] for p in args.probes if p not in done}
    rows, screens, exacts = [], {k: [] for k in [0, *ks]}, []
    for name in done:
        stages = records[name]
        exact, estimate = torch.tensor(stages["exact"]["values"]), torch.tensor(stages["attribution"]["values"])
        as_scores = lambda values: HeadScores(values, name, "activation", fp, stages["exact"]["capability"])  # noqa: E731
        exacts.append(as_scores(exact))
        screens[0].append(as_scores(estimate))
        exact_s, attribution_s = stages["exact"]["seconds"], stages["attribution"]["seconds"]
        exact_cpu, attribution_cpu = stages["exact"]["cpu_seconds"], stages["attribution"]["cpu_seconds"]
        curve = [dict(top_k=0, overlap=overlap(estimate, exact, budget), screen_s=attribution_s, speedup=exact_s / attribution_s,
                      screen_cpu_s=attribution_cpu, speedup_cpu=exact_cpu / attribution_cpu, time_derived=False, scores_from="AtP only")]
        for k in ks:
            values = composed_screen(estimate, exact, k)
            point = dict(top_k=k, scores_from=SOURCE_COMPOSED)
            if k in timed_ks:
                run_values = torch.tensor(stages[f"screen_{k}"]["values"])
                point.update(scores_from=SOURCE_RUN, run_vs_composed_max_abs_diff=float((run_values - values).abs().max()))
                values = run_values
            seconds, cpu_seconds = screen_time(stages, k, timed_ks, "seconds"), screen_time(stages, k, timed_ks, "cpu_seconds")
            point.update(overlap=overlap(values, exact, budget), screen_s=seconds, speedup=exact_s / seconds, screen_cpu_s=cpu_seconds,
                         speedup_cpu=exact_cpu / cpu_seconds, time_derived=k not in timed_ks)
            curve.append(point)
            screens[k].append(as_scores(values))
        rows.append(dict(probe=name, logit_diff_gap=clean_corrupt_gap(stages["exact"]), exact_s=exact_s,
                         exact_cpu_s=exact_cpu, attribution_s=attribution_s, attribution_cpu_s=attribution_cpu,
                         spearman_attribution=rank_correlation(estimate, exact),
                         max_load_avg_1min=max(s["load_avg_1min"] for s in stages.values()), curve=curve,
                         exact_values=exact.tolist(), attribution_values=estimate.tolist()))
    totals = []
    if done:
        fused_exact = fuse(exacts)
        exact_heads = set(select_mask(fused_exact, ratio=args.ratio).heads())
        exact_rank = fused_exact.ranks()  # where the heads the masks disagree on sit in the exact ranking

        def ranked(heads: set[Head]) -> list[str]:
            return [f"{h} (#{int(exact_rank[h.layer, h.head])})" for h in sorted(heads)]

        total_exact, total_exact_cpu = sum(r["exact_s"] for r in rows), sum(r["exact_cpu_s"] for r in rows)
        for i, k in enumerate([0, *ks]):
            points = [r["curve"][i] for r in rows]
            heads = set(select_mask(fuse(screens[k]), ratio=args.ratio).heads())
            total_s, total_cpu = sum(p["screen_s"] for p in points), sum(p["screen_cpu_s"] for p in points)
            totals.append(dict(top_k=k, screen_s=total_s, speedup=total_exact / total_s, screen_cpu_s=total_cpu,
                               speedup_cpu=total_exact_cpu / total_cpu, time_derived=any(p["time_derived"] for p in points),
                               mean_overlap=sum(p["overlap"] for p in points) / len(points), min_overlap=min(p["overlap"] for p in points),
                               fused_mask_overlap=len(heads & exact_heads) / budget,
                               fused_only_exact=ranked(exact_heads - heads), fused_only_screen=ranked(heads - exact_heads)))
    at_budget = next((t for t in totals if t["top_k"] == budget), None)
    goals = None if at_budget is None or missing else dict(
        fused_mask_overlap=at_budget["fused_mask_overlap"], fused_overlap_goal_met=at_budget["fused_mask_overlap"] >= 0.9,
        speedup=at_budget["speedup"], speedup_goal_met=at_budget["speedup"] >= 5.0)
    return dict(meta=settings, summary=dict(budget=budget, n_heads=fp.n_layers * fp.n_heads, top_ks=ks, timed_top_ks=timed_ks,
                                            complete_probes=done, missing=missing, goals_at_budget=goals,
                                            exhaustive_exact_s=sum(r["exact_s"] for r in rows)),
                curve=totals, probes=rows)


def markdown(record: dict) -> str:
    meta, summary, rows, curve = record["meta"], record["summary"], record["probes"], record["curve"]
    budget = summary["budget"]
    fmt_k = lambda k: "AtP only" if k == 0 else f"K={k}"  # noqa: E731
    lines = [f"# Screen vs exhaustive exact scoring on {meta['model']}", "",
             f"{meta['length']} tokens x {meta['pairs']} pairs (seed {meta['seed']}), {meta['dtype']}, {meta['device']}, "
             f"{meta['threads']} threads, torch {meta['torch']}. {meta['ratio']} budget = {budget} of {summary['n_heads']} heads; "
             f"screen verifies the top K AtP estimates exactly. Overlap = |top-{budget} of screen ∩ top-{budget} of exact| / {budget}; "
             "speed-up = exhaustive exact time / screen time (both include the clean/corrupt set-up runs).", ""]
    if summary["missing"]:
        lines += ["**Incomplete:** " + "; ".join(f"{p}: {', '.join(s)} not run" for p, s in summary["missing"].items())
                  + (f". Everything below covers {', '.join(summary['complete_probes'])} only." if rows else "."), ""]
    if not rows:
        return "\n".join(lines) + "\n"
    lines += ["| probe | LD gap | exact s | AtP s | Spearman(AtP, exact) | max load avg |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['probe']} | {r['logit_diff_gap']:.2f} | {r['exact_s']:.1f} | {r['attribution_s']:.1f} | {r['spearman_attribution']:.3f} | "
              f"{r['max_load_avg_1min']:.1f} |" for r in rows]
    lines += ["", "Per probe, overlap (speed-up) at each K; `~` marks a time derived by linear interpolation between the "
              f"timed K ({', '.join(map(str, summary['timed_top_ks']))}), the others are measured screen runs:", "",
              "| probe | " + " | ".join(fmt_k(c["top_k"]) for c in curve) + " |", "|---|" + "---:|" * len(curve)]
    lines += [f"| {r['probe']} | " + " | ".join(f"{p['overlap']:.2f} ({'~' if p['time_derived'] else ''}{p['speedup']:.1f}x)" for p in r["curve"]) + " |"
              for r in rows]
    lines += ["", f"Over the probes (fused = {meta['ratio']} mask of `fuse` defaults over the {len(rows)} probes, screen vs exact; "
              "a head the masks disagree on is shown with its rank in the exact fused ranking):", "",
              "| K | screen s (total) | speed-up | speed-up by CPU time | mean overlap | min overlap | fused-mask overlap | only in exact's mask "
              "| only in screen's |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {fmt_k(c['top_k'])} | {'~' if c['time_derived'] else ''}{c['screen_s']:.1f} | {'~' if c['time_derived'] else ''}{c['speedup']:.2f}x | "
              f"{'~' if c['time_derived'] else ''}{c['speedup_cpu']:.2f}x | "
              f"{c['mean_overlap']:.2f} | {c['min_overlap']:.2f} | {c['fused_mask_overlap']:.2f} | {' '.join(c['fused_only_exact'])} | "
              f"{' '.join(c['fused_only_screen'])} |" for c in curve]
    diffs = [p["run_vs_composed_max_abs_diff"] for r in rows for p in r["curve"] if "run_vs_composed_max_abs_diff" in p]
    lines += ["", f"Exhaustive exact total {summary['exhaustive_exact_s']:.1f} s. Speed-up by CPU time uses this process's CPU seconds "
              "(user + system) instead of wall time: other load on the box inflates it less. Timed screen runs vs AtP + exhaustive exact composed: "
              f"max |difference| {max(diffs):.2e}."]
    goals = summary["goals_at_budget"]
    if goals:
        lines += ["", f"Goals at K = budget ({budget}): fused-mask overlap {goals['fused_mask_overlap']:.2f} (>= 0.9: "
                  f"{'met' if goals['fused_overlap_goal_met'] else 'not met'}), speed-up {goals['speedup']:.2f}x (>= 5x: "
                  f"{'met' if goals['speedup_goal_met'] else 'not met'}) on this {meta['device']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from headscope import load_model
    from headscope.mask import head_budget
    from headscope.patching import screen_scores
    from headscope.probes import make_probe
    from headscope.zoo import demo_model_path

    args = parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    work = Path(args.work or out / f"{args.name}_work")
    torch.manual_seed(args.seed)
    lm = load_model(args.model or demo_model_path(), dtype=torch.float32, device=args.device)
    fp = lm.fingerprint
    budget = head_budget(fp, args.ratio)
    ks = curve_ks(args.top_ks, budget, fp.n_layers * fp.n_heads)
    timed_ks = ks if args.time_all else sorted({ks[0], ks[-1]})
    settings = dict(model=str(args.model or "bundled demo model"), fingerprint=str(fp), length=args.length, pairs=args.pairs, seed=args.seed,
                    ratio=args.ratio, top_ks=ks, timed_top_ks=timed_ks, dtype="float32", device=args.device, threads=torch.get_num_threads(),
                    torch=torch.__version__)
    work.mkdir(parents=True, exist_ok=True)
    partial = {name: Work(work, name, settings) for name in args.probes}
    stages = ["exact", "attribution", *(f"screen_{k}" for k in timed_ks)]
    pending = [(name, stage) for name in args.probes for stage in stages if stage not in partial[name].stages]
    print(f"{len(args.probes) * len(stages) - len(pending)} of {len(args.probes) * len(stages)} stages done in {work}", flush=True)

    def write_summary() -> dict:
        record = summarise({n: w.stages for n, w in partial.items()}, args, settings, fp, budget, ks, timed_ks)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / f"{args.name}.json", record)
        write_text_atomic(out / f"{args.name}.md", markdown(record))
        return record

    if pending:  # first-call costs (allocator, thread pools) stay out of the timings
        warmup = make_probe(args.probes[0], lm.tokenizer, length=args.length, n_pairs=2, seed=args.seed + 1)
        screen_scores(lm, warmup, top_k=fp.n_heads, progress=False)
    probes = {}
    for name, stage in tqdm(pending, desc="stages", unit="stage"):
        if name not in probes:
            probes[name] = make_probe(name, lm.tokenizer, length=args.length, n_pairs=args.pairs, seed=args.seed)
        result = run_stage(lm, probes[name], stage)
        partial[name].save(stage, result)
        tqdm.write(f"{name} {stage}: {result['seconds']:.1f} s", file=sys.stdout)
        write_summary()
    print(markdown(write_summary()), end="")
    return 0


if __name__ == "__main__":
    script_main(main)
