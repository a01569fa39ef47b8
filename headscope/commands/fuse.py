"""``headscope fuse``: fuse HeadScores files into one ranking and write the full-attention head mask."""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope.fusion import DEFAULT_RRF_K, NORMALISATIONS, RULES
from headscope.heads import HeadscopeError, HeadScores
from headscope.outputs import check_output_file


def add_budget_args(parser: argparse.ArgumentParser, default_ratio: str = "7:1") -> None:
    """``--ratio LINEAR:FULL`` or ``--n-full N`` (exclusive) and ``--kv-aware``."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", default=None, help=f"linear:full head ratio (default {default_ratio})")
    budget.add_argument("--n-full", type=int, default=None, help="number of full-attention heads instead of a ratio")
    parser.add_argument("--kv-aware", action="store_true", help="choose whole KV groups (the KV cache is kept per group)")


def load_scores(paths: list[str]) -> list[HeadScores]:
    """Read score files; each remembers its path (``meta['source']``) so errors can name it."""
    scores, seen = [], {}
    for path in paths:
        if (resolved := Path(path).resolve()) in seen:
            raise HeadscopeError(f"{path} is given twice (also as {seen[resolved]}): each input counts once in the fusion")
        seen[resolved] = path
        item = HeadScores.load(path)
        item.meta["source"] = path
        scores.append(item)
    return scores


def weights_note(scores: list[HeadScores]) -> str | None:
    """A note when the score files were made on different weights of one shape (their ``weights_digest``: a base
    checkpoint and a fine-tune, say), which ``fuse`` accepts (the shapes match) but a user may not have meant."""
    digests: dict[str, list[str]] = {}
    for item in scores:
        if digest := item.meta.get("weights_digest"):
            digests.setdefault(digest, []).append(str(item.meta.get("source", item.probe)))
    if len(digests) < 2:
        return None
    groups = "; ".join(", ".join(sources) for sources in digests.values())
    return f"note: the score files come from {len(digests)} different checkpoints of this shape ({groups})"


def parse_weights(specs: list[str] | None) -> dict[str, float] | None:
    """``["retrieval=2", "reasoning=1"]`` -> ``{"retrieval": 2.0, "reasoning": 1.0}``."""
    if not specs:
        return None
    weights = {}
    for spec in specs:
        capability, _, value = spec.partition("=")
        try:
            weights[capability] = float(value)
        except ValueError:
            raise HeadscopeError(f"--weight {spec!r}: expected CAPABILITY=NUMBER, e.g. retrieval=2") from None
    return weights


def register(subparsers) -> None:
    parser = subparsers.add_parser("fuse", help="fuse head scores into a full-attention head mask", description=__doc__)
    parser.add_argument("scores", nargs="+", metavar="SCORES.json", help="HeadScores files (from `headscope score`)")
    add_budget_args(parser)
    parser.add_argument("--min-per-layer", type=int, default=0, help="full-attention heads every layer keeps (default 0)")
    parser.add_argument("--whole-layers", action="store_true",
                        help="choose whole layers by their heads' importance (a layer-wise hybrid chosen by the scores; not with --kv-aware, --exclude)")
    parser.add_argument("--group-score", choices=["max", "sum"], default="max",
                        help="KV group (--kv-aware) or layer (--whole-layers) importance from its heads' (default max)")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default=None, help="per-input normalisation of |score| (default: rank for --rule rrf, else zscore, which keeps heads that matter for one probe only)")
    parser.add_argument("--rule", choices=RULES, default="mean", help="combination rule (default mean)")
    parser.add_argument("--rrf-k", type=float, default=DEFAULT_RRF_K, help=f"reciprocal rank fusion constant (default {DEFAULT_RRF_K:g})")
    parser.add_argument("--weight", action="append", metavar="CAP=W", help="weight of a capability (repeatable; default equal)")
    parser.add_argument("--exclude", default="", metavar="HEADS",
                        help="heads kept off full attention, comma-separated, as LxHy or LAYER.HEAD (e.g. L2H6,1.3: heads that need RoPE, "
                             "see `headscope score --method rope`)")
    parser.add_argument("--rope-scores", nargs="+", default=[], metavar="ROPE.json",
                        help="`headscope score --method rope` files: heads that need RoPE for a solved probe (clean/corrupt gap >= 2) "
                             "are kept off the hybrid's NoPE full-attention heads, as with --exclude")
    parser.add_argument("--rope-threshold", type=float, default=None, help="rope score that marks a head as RoPE-dependent (default 0.25)")
    parser.add_argument("--out", required=True, help="output mask JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from headscope.fusion import fuse
    from headscope.heads import Head
    from headscope.mask import budget_note, save_mask, select_mask

    from headscope.patching.rope import ROPE_THRESHOLD, rope_dependent_heads

    check_output_file(args.out, inputs=[*args.scores, *args.rope_scores])
    scores = load_scores(args.scores)
    if rope := [item.meta["source"] for item in scores if item.method == "rope"]:
        raise HeadscopeError(f"{rope[0]} holds rope scores (RoPE dependence, not importance): pass it with --rope-scores")
    ranking = fuse(scores, normalise=args.normalise, rule=args.rule, weights=parse_weights(args.weight), rrf_k=args.rrf_k)
    if note := weights_note(scores):
        print(note)
    exclude = [Head.parse(text) for text in args.exclude.split(",") if text.strip()]
    if args.rope_scores:
        rope = load_scores(args.rope_scores)
        for item in rope:
            if problem := ranking.fingerprint.mismatch(item.fingerprint):
                raise HeadscopeError(f"{item.meta['source']} ({item.probe}/{item.method}) was scored on another model than the scores: {problem}")
        threshold = args.rope_threshold if args.rope_threshold is not None else ROPE_THRESHOLD
        if not 0.0 < threshold < float("inf"):
            raise HeadscopeError(f"--rope-threshold must be a positive number, got {threshold}")
        rope_heads = rope_dependent_heads(rope, threshold)
        print(f"RoPE-dependent heads kept off full attention: {' '.join(str(h) for h in rope_heads) or 'none'}")
        exclude = sorted(set(exclude) | set(rope_heads), key=lambda h: (h.layer, h.head))
    mask = select_mask(ranking, ratio=args.ratio, n_full=args.n_full, min_per_layer=args.min_per_layer,
                       kv_aware=args.kv_aware, group_score=args.group_score, exclude=exclude, whole_layers=args.whole_layers)
    path = save_mask(mask, args.out)
    if note := budget_note(mask):
        print(note)
    groups = mask.kv_groups_full()
    print(f"fused {len(scores)} inputs ({ranking.provenance['normalisation']}/{args.rule}); {mask.n_full} of {mask.full.numel()} heads at full attention "
          f"({mask.head_fraction:.1%}), KV cache {int(groups.sum())}/{groups.numel()} groups ({mask.kv_fraction:.1%}) -> {path}")
    print("top heads: " + " ".join(str(h) for h in ranking.top(10)))
    return 0
