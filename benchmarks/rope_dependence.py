"""Which heads of the demo model need RoPE, and did the hybrid-quality masks put them on the NoPE FA branch?

For every built-in probe: ``rope`` scores of all heads (``headscope.patching.rope``: the share of the
clean/corrupt logit-difference gap lost when that one head attends without RoPE). Then, for every arm of
``benchmarks/results/hybrid_quality.json``, the RoPE-dependent heads (score >= ``--threshold`` on some
probe) that its mask turns into NoPE full-attention heads, next to the arm's retrieval accuracy after
transfer: a head whose job is positional cannot do it on the NoPE FA branch.

Usage (CPU): ``python benchmarks/rope_dependence.py [--length 256 --pairs 24]``; writes
``$OUT/rope_dependence.{json,md}`` (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    from headscope.heads import write_json_atomic
    from headscope.models import load_model
    from headscope.patching import score
    from headscope.probes import TASK_NAMES, make_probe
    from headscope.quality import capability_means
    from headscope.zoo import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--probes", default=",".join(TASK_NAMES), help="comma-separated built-in probes (default: all)")
    parser.add_argument("--threshold", type=float, default=0.25, help="a head is RoPE-dependent at this score on some probe")
    parser.add_argument("--quality", default=str(RESULTS / "hybrid_quality.json"), help="hybrid_quality results to cross-reference")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model(args.model or demo_model_path(), dtype=torch.float32)
    scores = {}
    for name in args.probes.split(","):
        probe = make_probe(name, lm.tokenizer, length=args.length, n_pairs=args.pairs, seed=0)
        scores[name] = score(lm, probe, "rope")
    worst = torch.stack([s.values for s in scores.values()]).max(dim=0).values  # (L, H)
    dependent = [(int(l), int(h)) for l, h in (worst >= args.threshold).nonzero().tolist()]

    arms = []
    quality = Path(args.quality)
    if quality.is_file():
        results = json.loads(quality.read_text())
        base = results["settings"]["lengths"][0]
        for name, arm in results["arms"].items():
            if not arm.get("mask") or not arm.get("accuracy"):
                continue
            full = {tuple(head) for head in arm["mask"]["full_attention_heads"]}
            layerwise = name.startswith("layerwise")  # whole FA layers keep their pretrained attention, RoPE included
            arms.append({"arm": name, "nope_fa_dependent_heads": [] if layerwise else sorted(h for h in dependent if h in full),
                         "retrieval_1x": capability_means(arm, base)["retrieval"],
                         "kv_recall_1x": arm["accuracy"]["kv_recall"][str(base)]["argmax"]})

    record = {"model": lm.fingerprint.name, "length": args.length, "pairs": args.pairs, "threshold": args.threshold,
              "scores": {name: s.values.tolist() for name, s in scores.items()},
              "ld_gap": {name: s.gap for name, s in scores.items()},
              "rope_dependent_heads": dependent, "arms": arms}
    write_json_atomic(out / "rope_dependence.json", record)
    lines = [f"# RoPE dependence of {lm.fingerprint.name} ({args.length} tokens x {args.pairs} pairs, CPU float32)", "",
             "Score: share of the clean/corrupt logit-difference gap lost when one head attends without RoPE.", "",
             "| probe | top heads (score) |", "|---|---|"]
    for name, s in scores.items():
        flat = s.values.flatten()
        top = flat.argsort(descending=True)[:4].tolist()
        n_heads = s.values.shape[1]
        lines.append(f"| {name} | " + ", ".join(f"L{i // n_heads}H{i % n_heads} ({flat[i]:.2f})" for i in top) + " |")
    lines += ["", f"RoPE-dependent heads (score >= {args.threshold:g} on some probe): "
              + (", ".join(f"L{l}H{h}" for l, h in dependent) or "none"), ""]
    if arms:
        lines += ["| hybrid_quality arm | RoPE-dependent heads it makes NoPE FA | retrieval 1x | kv_recall 1x |", "|---|---|---:|---:|"]
        lines += [f"| {a['arm']} | {', '.join(f'L{l}H{h}' for l, h in a['nope_fa_dependent_heads']) or '-'} | "
                  f"{a['retrieval_1x']:.2f} | {a['kv_recall_1x']:.2f} |" for a in arms]
    text = "\n".join(lines) + "\n"
    (out / "rope_dependence.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
