"""Screen vs exhaustive exact scoring on the bundled demo model's probes: does the cheap path pick the same mask?

For every built-in probe: exact ``activation`` scores of all heads, ``attribution`` (AtP) estimates, and
``screen`` (AtP for all heads, exact patching of the top ``--top-k`` by |estimate|). Reported per probe:
wall times and their ratios, the Spearman correlation of AtP with the exact scores, and the overlap
(|A ∩ B| / budget) of the 7:1 head sets (top |score|) that screen and AtP select with the exact one.
Then the masks a researcher would actually use: the fused 7:1 mask over all probes (``fuse`` defaults)
from exact scores vs from screen scores.

The teacher's clean-minus-corrupt logit-difference gap is reported per probe: where the model does not
solve a probe (gap near 0) the normalised scores are noise, and so is any overlap measured on them.

Usage (CPU is enough for the demo model): ``python benchmarks/screen_overlap.py [--length 256 --pairs 16]``;
writes ``$OUT/screen_overlap.{json,md}`` (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def top_set(values: torch.Tensor, k: int) -> set[int]:
    """Flat indices of the ``k`` largest |values|."""
    return set(values.abs().flatten().topk(k).indices.tolist())


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from headscope import load_model
    from headscope.fusion import fuse
    from headscope.heads import write_json_atomic, write_text_atomic
    from headscope.mask import head_budget, select_mask
    from headscope.patching import attribution_scores, rank_correlation, score, screen_scores
    from headscope.probes import make_probe
    from headscope.probes.tasks import TASK_NAMES
    from headscope.zoo import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--ratio", default="7:1")
    parser.add_argument("--top-k", type=int, default=None, help="heads screen verifies (default: twice the budget)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    lm = load_model(args.model or demo_model_path(), dtype=torch.float32)
    fp = lm.fingerprint
    budget = head_budget(fp, args.ratio)
    top_k = args.top_k or 2 * budget
    rows, exact_all, screen_all = [], [], []
    warmup = make_probe(TASK_NAMES[0], lm.tokenizer, length=args.length, n_pairs=args.pairs, seed=args.seed + 1)
    for method in ("activation", "attribution"):  # first-call costs (allocator at the timed batch shape) stay out of the timings
        score(lm, warmup, method, progress=False)
    for name in TASK_NAMES:
        probe = make_probe(name, lm.tokenizer, length=args.length, n_pairs=args.pairs, seed=args.seed)
        exact, t_exact = timed(lambda: score(lm, probe, "activation", progress=False))
        estimate, t_attr = timed(lambda: attribution_scores(lm, probe, progress=False))
        screened, t_screen = timed(lambda: screen_scores(lm, probe, top_k=top_k, progress=False))
        gap = exact.meta["ld_clean"] - exact.meta["ld_corrupt"]
        exact_set = top_set(exact.values, budget)
        rows.append(dict(
            probe=name, logit_diff_gap=gap, exact_s=t_exact, attribution_s=t_attr, screen_s=t_screen,
            screen_speedup=t_exact / t_screen, attribution_speedup=t_exact / t_attr,
            spearman_attribution=rank_correlation(estimate.values, exact.values),
            overlap_screen=len(top_set(screened.values, budget) & exact_set) / budget,
            overlap_attribution=len(top_set(estimate.values, budget) & exact_set) / budget,
        ))
        exact_all.append(exact)
        screen_all.append(screened)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    mask_exact = select_mask(fuse(exact_all), ratio=args.ratio)
    mask_screen = select_mask(fuse(screen_all), ratio=args.ratio)
    fused_overlap = int((mask_exact.full & mask_screen.full).sum()) / budget
    totals = {key: sum(r[key] for r in rows) for key in ("exact_s", "attribution_s", "screen_s")}
    summary = dict(budget=budget, top_k=top_k, fused_mask_overlap=fused_overlap,
                   total_speedup_screen=totals["exact_s"] / totals["screen_s"], **totals,
                   mean_overlap_screen=sum(r["overlap_screen"] for r in rows) / len(rows))
    meta = dict(model=str(args.model or "bundled demo model"), fingerprint=str(fp),
                length=args.length, pairs=args.pairs, ratio=args.ratio, device="cpu", torch=torch.__version__,
                threads=torch.get_num_threads())
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "screen_overlap.json", dict(meta=meta, summary=summary, probes=rows))
    lines = [f"# Screen vs exact scoring on {meta['model']} ({args.length} tokens x {args.pairs} pairs, float32, CPU, "
             f"{meta['threads']} threads)", "",
             f"7:1 budget = {budget} of {fp.n_layers * fp.n_heads} heads; screen verifies the top {top_k} AtP estimates exactly.", "",
             "| probe | LD gap | exact s | AtP s | screen s | screen speed-up | Spearman(AtP, exact) | overlap screen | overlap AtP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['probe']} | {r['logit_diff_gap']:.2f} | {r['exact_s']:.2f} | {r['attribution_s']:.2f} | {r['screen_s']:.2f} | "
              f"{r['screen_speedup']:.2f}x | {r['spearman_attribution']:.3f} | {r['overlap_screen']:.2f} | {r['overlap_attribution']:.2f} |"
              for r in rows]
    lines += ["", f"Fused 7:1 mask over all probes (fuse defaults): screen vs exact overlap **{fused_overlap:.2f}**; "
              f"total time exact {totals['exact_s']:.1f} s, screen {totals['screen_s']:.1f} s "
              f"({summary['total_speedup_screen']:.2f}x)."]
    write_text_atomic(out / "screen_overlap.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
