"""``headscope report``: one self-contained HTML page of head scores, the fused ranking and a mask.

The mask comes with ``--mask``, or as one of the positional files (a mask file is recognised by its kind).
"""

from __future__ import annotations

import argparse

from headscope.outputs import check_output_file


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write an HTML report of scores and a mask", description=__doc__)
    parser.add_argument("scores", nargs="*", metavar="SCORES.json", help="HeadScores files (a mask file among them is used as --mask)")
    parser.add_argument("--mask", help="mask JSON (from `headscope fuse` or `headscope mask`)")
    parser.add_argument("--title", default="headscope report", help="page title")
    parser.add_argument("--out", required=True, help="output HTML file")
    parser.set_defaults(func=run)


def split_mask(paths: list[str], mask: str | None) -> tuple[list[str], str | None]:
    """The score files among ``paths`` and the mask: ``mask``, or the one mask file given positionally."""
    from headscope.heads import HeadscopeError, read_json
    from headscope.maskfile import MASK_KIND

    scores = []
    for path in paths:
        data = read_json(path, "scores or mask")
        if isinstance(data, dict) and data.get("kind") == MASK_KIND:
            if mask is not None:
                raise HeadscopeError(f"{path} and {mask} are both masks; a report shows one mask")
            mask = path
        else:
            scores.append(path)
    return scores, mask


def run(args: argparse.Namespace) -> int:
    from headscope.commands.fuse import load_scores
    from headscope.heads import write_text_atomic
    from headscope.mask import load_mask
    from headscope.reports import build_report_html

    score_paths, mask_path = split_mask(args.scores, args.mask)
    check_output_file(args.out, inputs=[*score_paths, mask_path])
    scores = load_scores(score_paths)
    mask = load_mask(mask_path, expect=scores[0].fingerprint if scores else None) if mask_path else None
    path = write_text_atomic(args.out, build_report_html(scores, mask, title=args.title))
    print(f"report of {len(scores)} score files{f' and the mask {mask_path}' if mask else ''} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
