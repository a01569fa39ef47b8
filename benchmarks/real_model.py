"""The whole headscope path on a real pretrained model (SmolLM2-135M-Instruct), with the ablation check.

    python benchmarks/real_model.py --model DIR [--out benchmarks/results/smollm2] [--quick]

DIR is what ``headscope models get smollm2-135m`` prints (or any local model). Steps, each written to
``OUT`` as it finishes and skipped on a rerun when its file exists (a GPU call is 10 minutes at most):

1. ``probes.json``: the probe table: argmax accuracy, answer-vs-wrong accuracy, mean logit difference
   and clean-corrupt gap of every built-in probe at 512 and 2048 tokens (32 pairs, seed 1).
2. ``scores/``: receivers (``direct``) and senders (``path``, through each probe's top-3 receivers) on
   every probe at 1024 tokens (16 pairs, seed 0), as ``headscope demo`` scores, and ``rope`` (RoPE
   dependence) on the probes the model solves (step 1: argmax >= 0.5 at 512 tokens and gap >= 2).
3. ``mask.json``, ``rope_aware_mask.json``: the fused 7:1 mask over the solved probes, and the same
   ranking with the RoPE-dependent heads (rope score >= 0.25 on any of them) excluded.
4. ``ablation.json``: per probe, the top-k heads by ``direct`` score (k = 5, 10, 20) and the mask's FA
   heads mean-ablated against 5 random head sets of the same size drawn outside them (512 tokens,
   32 fresh pairs of seed 2; head means over seed 3).
5. ``report.html`` with ``activation`` (total effect) scores of the solved probes added (last: the
   slowest step that nothing else needs).

``summary.md`` collects the tables. ``--quick`` shrinks every size (a CPU smoke run for the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from headscope import load_model
from headscope.ablation import ablation_check
from headscope.demo import REASONING_PROBES, RETRIEVAL_PROBES, build_probes, score_probes
from headscope.fusion import fuse
from headscope.heads import HeadScores, write_json_atomic, write_text_atomic
from headscope.mask import select_mask
from headscope.maskfile import load_mask, save_mask
from headscope.patching import activation_scores, rope_dependence_scores
from headscope.patching.rope import rope_dependent_heads
from headscope.probes import make_probe
from headscope.reports import build_report_html
from headscope.zoo.evaluate import probe_accuracy

PROBES = RETRIEVAL_PROBES + REASONING_PROBES
FULL = dict(table_lengths=(512, 2048), table_pairs=32, score_length=1024, score_pairs=16, ablate_length=512, ablate_pairs=32,
            ks=(5, 10, 20), n_random=5)
QUICK = dict(table_lengths=(160,), table_pairs=4, score_length=160, score_pairs=2, ablate_length=160, ablate_pairs=4, ks=(1, 2),
             n_random=2)
SOLVED = dict(argmax=0.5, gap=2.0)  # a probe enters the mask when the model solves it this well at the first length


def probe_table(lm, sizes: dict, log) -> list[dict]:
    rows = []
    for name in PROBES:
        for length in sizes["table_lengths"]:
            probe = make_probe(name, lm.tokenizer, length=length, n_pairs=sizes["table_pairs"], seed=1)
            acc = probe_accuracy(lm.model, probe, batch_size=16, with_corrupt=True)
            rows.append({"probe": name, "length": length, "n_pairs": len(probe), "argmax": acc.argmax, "beats_wrong": acc.beats_wrong,
                         "logit_diff": acc.mean_logit_diff, "corrupt_logit_diff": acc.corrupt_logit_diff, "gap": acc.gap})
            log(f"  {name:16s} {length:5d}  argmax {acc.argmax:.2f}  logit diff {acc.mean_logit_diff:+6.2f}  gap {acc.gap:+6.2f}")
    return rows


def solved_probes(table: list[dict], length: int) -> list[str]:
    return [r["probe"] for r in table if r["length"] == length and r["argmax"] >= SOLVED["argmax"] and r["gap"] >= SOLVED["gap"]]


def extra_scores(lm, probes, method: str, out: Path, log) -> list[HeadScores]:
    """``activation`` or ``rope`` scores per probe (files reused when present)."""
    scorer = {"activation": activation_scores, "rope": rope_dependence_scores}[method]
    results = []
    for probe in probes:
        path = out / "scores" / f"{probe.name}.{method}.json"
        if path.is_file():
            results.append(HeadScores.load(path))
            continue
        start = time.perf_counter()
        scores = scorer(lm, probe)
        scores.meta["seconds"] = time.perf_counter() - start
        scores.save(path)
        results.append(scores)
        log(f"  {probe.name} {method}: {scores.meta['seconds']:.1f} s")
    return results


def sd_text(value: float | None) -> str:
    """A random-set standard deviation, 'n/a' for a single set."""
    return "n/a" if value is None else f"{value:.2f}"


def ablation_runs(lm, direct: dict[str, HeadScores], mask, sizes: dict, log) -> list[dict]:
    results = []
    for name, scores in direct.items():
        probe = make_probe(name, lm.tokenizer, length=sizes["ablate_length"], n_pairs=sizes["ablate_pairs"], seed=2)
        reference = make_probe(name, lm.tokenizer, length=sizes["ablate_length"], n_pairs=sizes["ablate_pairs"], seed=3)
        top = ablation_check(lm, probe, reference, scores.top(max(sizes["ks"]), by_magnitude=False), sizes["ks"],
                             n_random=sizes["n_random"], source=f"top direct heads of {name}")
        fa = ablation_check(lm, probe, reference, mask.heads(), [mask.n_full], n_random=sizes["n_random"],
                            source="full-attention heads of the fused 7:1 mask")
        for result in (top, fa):
            results.append(result.to_dict())
            for row in result.summary():
                log(f"  {name:16s} {result.source[:22]:22s} k={row['k']:3d}  none {row['base_argmax']:.2f}  selected {row['selected_argmax']:.2f} "
                    f"({row['selected_logit_diff']:+.2f})  random {row['random_argmax_mean']:.2f}+-{sd_text(row['random_argmax_sd'])} "
                    f"({row['random_logit_diff_mean']:+.2f})")
    return results


def summary_markdown(meta: dict, table: list[dict], ablation: list[dict], masks: dict) -> str:
    lines = [f"# headscope on {meta['model']} ({meta['device']})", "", "## Probe table (seed 1)", "",
             "| probe | length | pairs | argmax | answer > wrong | logit diff | clean-corrupt gap |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['length']} | {r['n_pairs']} | {r['argmax']:.2f} | {r['beats_wrong']:.2f} | {r['logit_diff']:+.2f} | {r['gap']:+.2f} |"
              for r in table]
    lines += ["", "## Masks", ""] + [f"- {name}: {info}" for name, info in masks.items()]
    lines += ["", "## Mean ablation: selected heads vs random heads outside them (argmax accuracy / logit diff)", "",
              "| probe | selection | k | unablated | selected ablated | random ablated (mean +- sd) |", "|---|---|---|---|---|---|"]
    for result in ablation:
        for row in result["summary"]:
            lines.append(f"| {result['probe']} | {result['source']} | {row['k']} | {row['base_argmax']:.2f} / {row['base_logit_diff']:+.2f} | "
                         f"{row['selected_argmax']:.2f} / {row['selected_logit_diff']:+.2f} | "
                         f"{row['random_argmax_mean']:.2f} +- {sd_text(row['random_argmax_sd'])} / {row['random_logit_diff_mean']:+.2f} +- "
                         f"{sd_text(row['random_logit_diff_sd'])} (n={row['n_random']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="benchmarks/results/smollm2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(args.model, dtype=torch.float32, device=device)
    meta = {"model": lm.fingerprint.name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "sizes": sizes}

    if not (out / "probes.json").is_file():
        log("probe table")
        write_json_atomic(out / "probes.json", {"meta": meta, "rows": probe_table(lm, sizes, log)})
    table = json.loads((out / "probes.json").read_text())["rows"]
    solved = solved_probes(table, sizes["table_lengths"][0]) or ["induction"]

    log(f"scores on {', '.join(PROBES)} ({sizes['score_length']} tokens x {sizes['score_pairs']} pairs)")
    probes = build_probes(lm, PROBES, sizes["score_length"], sizes["score_pairs"], seed=0, log=log)
    receivers_senders = score_probes(lm, probes, out, n_receivers=3, seed=0, log=log)
    for_mask = [s for s in receivers_senders if s.probe in solved]
    ranking = fuse(for_mask)
    rope = extra_scores(lm, [p for p in probes if p.name in solved], "rope", out, log)
    rope_heads = rope_dependent_heads(rope, min_gap=0.0)  # rope was scored on the solved probes only
    mask = select_mask(ranking, lm.fingerprint, ratio="7:1")
    rope_aware = select_mask(ranking, lm.fingerprint, ratio="7:1", exclude=rope_heads)
    save_mask(mask, out / "mask.json")
    save_mask(rope_aware, out / "rope_aware_mask.json")
    masks = {"fused 7:1 over " + ", ".join(solved): " ".join(str(h) for h in mask.heads()) + f" ({mask.n_full} heads, KV {mask.kv_fraction:.1%})",
             "RoPE-dependent heads excluded": " ".join(str(h) for h in rope_heads) or "none",
             "RoPE-aware fused 7:1": " ".join(str(h) for h in rope_aware.heads())}
    for name, info in masks.items():
        log(f"{name}: {info}")

    if not (out / "ablation.json").is_file():
        log("ablation")
        direct = {s.probe: s for s in receivers_senders if s.method == "direct"}
        write_json_atomic(out / "ablation.json", {"meta": meta, "results": ablation_runs(lm, direct, load_mask(out / "mask.json"), sizes, log)})
    ablation = json.loads((out / "ablation.json").read_text())["results"]
    write_text_atomic(out / "summary.md", summary_markdown(meta, table, ablation, masks))
    log("activation scores (total effect) of the solved probes, for the report")
    totals = extra_scores(lm, [p for p in probes if p.name in solved], "activation", out, log)
    write_text_atomic(out / "report.html", build_report_html(receivers_senders + rope + totals, mask, ranking))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
