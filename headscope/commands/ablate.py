"""``headscope ablate``: mean-ablate the selected heads and as many random heads; compare the probe's accuracy.

    headscope ablate --model DIR --scores scores/needle_single.direct.json --probe needle_single --k 5,10,20
    headscope ablate --model DIR --mask mask.json --probe kv_recall --random 8 --out ablate.json

The selected heads are the top k of a scores file (by score) or the full-attention heads of a mask (all of
them, or the top k of the mask's fused ranking with --k). Each random set holds k heads drawn outside the
selected ones (--random sets per k, seeded). The evaluation pairs use --seed; the head means are taken over
other pairs of the same probe (seed + 1; a .jsonl probe's own pairs). Method: ``headscope.ablation``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope.commands.options import add_model_args, add_probe_args, load_from_args, resolve_probe
from headscope.heads import HeadScores, HeadscopeError, write_json_atomic
from headscope.outputs import check_output_file


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="mean-ablate selected vs random heads and compare a probe's accuracy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_probe_args(parser)
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--scores", help="a HeadScores JSON file: ablate its top k heads")
    chosen.add_argument("--mask", help="a mask JSON file: ablate its full-attention heads")
    parser.add_argument("--k", default=None, help="comma-separated set sizes (default 5,10,20 with --scores; the mask's FA count with --mask)")
    parser.add_argument("--random", type=int, default=5, help="random head sets per k (default 5)")
    parser.add_argument("--out", default=None, help="also write the rows and summary as JSON here")
    parser.set_defaults(func=run)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HeadscopeError(f"--k {text}: expected comma-separated integers, e.g. 5,10,20") from None
    if not ks or min(ks) < 1:
        raise HeadscopeError(f"--k {text}: sizes must be at least 1")
    return ks


def _selection(args: argparse.Namespace, lm, ks: list[int] | None) -> tuple[list, list[int], str]:
    """(heads best first, set sizes, description) from --scores or --mask."""
    if args.scores:
        scores = HeadScores.load(args.scores)
        problem = scores.fingerprint.mismatch(lm.fingerprint)
        if problem:
            raise HeadscopeError(f"--scores {args.scores} belongs to another model: {problem}")
        ks = ks or [5, 10, 20]
        return scores.top(max(ks), by_magnitude=False), ks, f"top heads of {Path(args.scores).name} ({scores.probe}/{scores.method})"
    from headscope.maskfile import load_mask, ranking_from_mask

    mask = load_mask(args.mask, expect=lm.fingerprint)
    if ks is None:
        return mask.heads(), [mask.n_full], f"full-attention heads of {Path(args.mask).name}"
    ranked = [head for head in ranking_from_mask(mask).order if head in mask]
    return ranked, ks, f"top full-attention heads of {Path(args.mask).name} by its fused ranking"


def run(args: argparse.Namespace) -> int:
    from headscope.ablation import ablation_check

    if args.random < 1:
        raise HeadscopeError(f"--random must be at least 1, got {args.random}")
    if len(args.probe) != 1:
        raise HeadscopeError("ablate takes one --probe")
    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix != ".json" or not out.parent.is_dir()):
        raise HeadscopeError(f"--out {args.out}: expected a .json file in an existing directory")
    if out is not None:
        check_output_file(out, [args.model])  # before the ablation runs
    ks = _parse_ks(args.k) if args.k is not None else None
    lm = load_from_args(args)
    ranked, ks, source = _selection(args, lm, ks)
    if max(ks) > len(ranked):
        raise HeadscopeError(f"--k {max(ks)} is more than the {len(ranked)} selected heads")
    probe = resolve_probe(lm, args.probe[0], args.length, args.pairs, args.seed)
    reference = resolve_probe(lm, args.probe[0], args.length, args.pairs, args.seed + 1)
    result = ablation_check(lm, probe, reference, ranked, ks, n_random=args.random, seed=args.seed, source=source)
    print(f"{probe.name}: {len(probe)} pairs x {probe.length} tokens; ablating {source}")
    print(f"{'k':>4}  {'none':>13}  {'selected':>13}  {'random mean +- sd':>25}   (argmax accuracy / logit diff)")
    for row in result.summary():
        print(f"{row['k']:>4}  {row['base_argmax']:5.2f} {row['base_logit_diff']:+7.2f}  "
              f"{row['selected_argmax']:5.2f} {row['selected_logit_diff']:+7.2f}  "
              f"{row['random_argmax_mean']:5.2f}+-{row['random_argmax_sd']:.2f} {row['random_logit_diff_mean']:+6.2f}+-{row['random_logit_diff_sd']:.2f}")
    if out is not None:
        write_json_atomic(out, result.to_dict())
    return 0
