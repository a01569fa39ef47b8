"""``headscope ablate``: mean-ablate the selected heads and as many random heads; compare the probe's accuracy.

    headscope ablate --model DIR --scores scores/needle_single.direct.json --probe needle_single --k 5,10,20
    headscope ablate --model DIR --mask mask.json --probe kv_recall --random 8 --out ablate.json

    headscope ablate --model DIR --mask mask.json --probe needle_single --baseline layer-matched --random 19

The selected heads are the top k of a scores file (by score) or the full-attention heads of a mask (all of
them, or the top k of the mask's fused ranking with --k). Each random set holds k heads (--random sets per k,
seeded): drawn outside the selected ones (--baseline uniform), or matched to them in KV groups (kv-matched)
or in heads and groups per layer (layer-matched: do these heads beat others of the same layers?). Per k it
prints the random sets' mean +- sample sd and the selected set's empirical p-value on the logit difference
((1 + random sets at or below it) / (n + 1): 19 sets for p = 0.05), and in brackets the 5th-95th percentile of
that p over bootstrap resamples of the evaluation pairs (a wide one: the verdict rests on a few prompts; --pairs
more). The evaluation pairs use --seed (default
1000: prompts the heads were not scored on; a --seed equal to the scores file's own is refused); the head
means are taken over other pairs of the same probe (seed + 1; a .jsonl probe's own pairs, which are also its
scored ones). ``--out`` also records ``selected_from``: where the heads came from (``scores``, ``mask`` or
``mask_ranking``), the file's name and the sha256 of its bytes. Method: ``headscope.ablation``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from headscope.ablation import BASELINES
from headscope.commands.options import add_model_args, add_probe_args, load_from_args, resolve_probe
from headscope.heads import HeadScores, HeadscopeError, write_json_atomic
from headscope.outputs import check_output_file

EVAL_SEED = 1000  # the default evaluation seed: away from the seeds probes are usually scored with (0, 1, ...)


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="mean-ablate selected vs random heads and compare a probe's accuracy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_probe_args(parser, f"seed of the evaluation pairs (default {EVAL_SEED}: not the scored ones); the head means use seed + 1", None)
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--scores", help="a HeadScores JSON file: ablate its top k heads")
    chosen.add_argument("--mask", help="a mask JSON file: ablate its full-attention heads")
    parser.add_argument("--k", default=None, help="comma-separated set sizes (default 5,10,20 with --scores; the mask's FA count with --mask)")
    parser.add_argument("--random", type=int, default=5, help="random head sets per k (default 5; 19 for p = 0.05)")
    parser.add_argument("--baseline", default="uniform", choices=BASELINES,
                        help="how the random sets are drawn (default uniform, outside the selected heads)")
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


def _file_record(path: str, kind: str) -> dict:
    """``selected_from``: the heads' source kind, the file's name and the sha256 of its bytes (16 hex digits)."""
    return {"kind": kind, "file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}


def _selection(args: argparse.Namespace, lm, ks: list[int] | None, scores: HeadScores | None) -> tuple[list, list[int], str, dict]:
    """(heads best first, set sizes, description, structured description) from --scores (loaded: ``scores``) or --mask."""
    if scores is not None:
        problem = scores.fingerprint.mismatch(lm.fingerprint)
        if problem:
            raise HeadscopeError(f"--scores {args.scores} belongs to another model: {problem}")
        ks = ks or [5, 10, 20]
        return (scores.top(max(ks), by_magnitude=False), ks, f"top heads of {Path(args.scores).name} ({scores.probe}/{scores.method})",
                {**_file_record(args.scores, "scores"), "probe": scores.probe, "method": scores.method})
    from headscope.maskfile import load_mask, ranking_from_mask

    mask = load_mask(args.mask, expect=lm.fingerprint)
    if ks is None:
        return mask.heads(), [mask.n_full], f"full-attention heads of {Path(args.mask).name}", _file_record(args.mask, "mask")
    ranked = [head for head in ranking_from_mask(mask).order if head in mask]
    return ranked, ks, f"top full-attention heads of {Path(args.mask).name} by its fused ranking", _file_record(args.mask, "mask_ranking")


def run(args: argparse.Namespace) -> int:
    from headscope.ablation import ablation_check
    from headscope.models import weights_digest

    if args.random < 1:
        raise HeadscopeError(f"--random must be at least 1, got {args.random}")
    if len(args.probe) != 1:
        raise HeadscopeError("ablate takes one --probe")
    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix != ".json" or not out.parent.is_dir()):
        raise HeadscopeError(f"--out {args.out}: expected a .json file in an existing directory")
    if out is not None:
        check_output_file(out, [args.model], inputs=[args.scores, args.mask])  # before the ablation runs
    args.seed = EVAL_SEED if args.seed is None else args.seed
    ks = _parse_ks(args.k) if args.k is not None else None
    scores = HeadScores.load(args.scores) if args.scores else None
    if scores is not None and (scores.meta.get("generator"), scores.meta.get("seed")) == (args.probe[0], args.seed):
        raise HeadscopeError(f"--seed {args.seed}: {args.scores} was scored on {args.probe[0]} prompts of seed {args.seed}; "
                             "evaluate on others (another --seed, e.g. the default)")
    lm = load_from_args(args)
    ranked, ks, source, selected_from = _selection(args, lm, ks, scores)
    if max(ks) > len(ranked):
        raise HeadscopeError(f"--k {max(ks)} is more than the {len(ranked)} selected heads")
    probe = resolve_probe(lm, args.probe[0], args.length, args.pairs, args.seed, args.capability)
    if scores is not None and scores.meta.get("pairs_sha256") == probe.digest():  # (a .jsonl probe: its pairs are fixed)
        raise HeadscopeError(f"the evaluation pairs are the ones {args.scores} was scored on; evaluate on other pairs of the "
                             "task (another .jsonl file of it)")
    if scores is not None and scores.meta.get("weights_digest") not in (None, weights_digest(lm.model)):
        print(f"note: {args.scores} was scored on other weights of this shape (another checkpoint)")
    reference = resolve_probe(lm, args.probe[0], args.length, args.pairs, args.seed + 1, args.capability)
    result = ablation_check(lm, probe, reference, ranked, ks, n_random=args.random, seed=args.seed, source=source,
                            baseline=args.baseline, selected_from=selected_from)
    print(f"{probe.name}: {len(probe)} pairs x {probe.length} tokens (seed {args.seed}); ablating {source}; "
          f"{args.random} {args.baseline} random sets per k")
    print(f"{'k':>4}  {'none':>13}  {'selected':>13}  {'random mean +- sd':>27}  {'p':>6}  (argmax accuracy / logit diff; "
          "p: selected logit diff against the random sets'; in brackets its 5-95th percentile over resampled pairs)")
    sd = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
    spread = lambda p: "" if p is None else f" [{p[0]:.3f}-{p[2]:.3f}]"  # noqa: E731
    for row in result.summary():
        shared = f"  shares {row['random_overlap_mean']:.1f} heads with the selected" if row["random_overlap_mean"] else ""
        print(f"{row['k']:>4}  {row['base_argmax']:5.2f} {row['base_logit_diff']:+7.2f}  "
              f"{row['selected_argmax']:5.2f} {row['selected_logit_diff']:+7.2f}  "
              f"{row['random_argmax_mean']:5.2f}+-{sd(row['random_argmax_sd'])} {row['random_logit_diff_mean']:+6.2f}+-{sd(row['random_logit_diff_sd'])}  "
              f"{row['p_logit_diff']:6.3f}{spread(row['p_resampled'])}{shared}")
    if out is not None:
        write_json_atomic(out, result.to_dict())
    return 0
