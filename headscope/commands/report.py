"""``headscope report``: one self-contained HTML page of head scores, the fused ranking and a mask."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write an HTML report of scores and a mask", description=__doc__)
    parser.add_argument("scores", nargs="*", metavar="SCORES.json", help="HeadScores files")
    parser.add_argument("--mask", help="mask JSON (from `headscope fuse` or `headscope mask`)")
    parser.add_argument("--title", default="headscope report", help="page title")
    parser.add_argument("--out", required=True, help="output HTML file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from headscope.commands.fuse import load_scores
    from headscope.heads import write_text_atomic
    from headscope.mask import load_mask
    from headscope.reports import build_report_html

    scores = load_scores(args.scores)
    mask = load_mask(args.mask, expect=scores[0].fingerprint if scores else None) if args.mask else None
    path = write_text_atomic(args.out, build_report_html(scores, mask, title=args.title))
    print(f"report of {len(scores)} score files{' and a mask' if mask else ''} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
