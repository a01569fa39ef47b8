"""``headscope score``: score every head of a model on one or more probes and write HeadScores JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope.commands.options import add_model_args, add_probe_args, load_from_args, resolve_probe
from headscope.heads import HeadScores, HeadscopeError


def register(subparsers) -> None:
    from headscope.patching import SCORERS

    parser = subparsers.add_parser("score", help="score heads with activation/direct patching", description=__doc__)
    add_model_args(parser)
    add_probe_args(parser)
    parser.add_argument("--method", default="activation", choices=sorted(SCORERS), help="scoring method (default activation)")
    parser.add_argument("--noising", action="store_true", help="patch corrupt into clean (default: clean into corrupt)")
    parser.add_argument("--batch-size", type=int, default=None, help="patched sequences per forward (default: largest that fits)")
    parser.add_argument("--out", required=True, help="output JSON file, or a directory when several probes are given")
    parser.add_argument("--resume", action="store_true", help="skip probes whose scores file already exists for this model and method")
    parser.set_defaults(func=run)


def _output_path(out: str, probe_name: str, method: str, several: bool) -> Path:
    path = Path(out)
    if several or path.is_dir() or out.endswith("/"):
        return path / f"{probe_name}.{method}.json"
    if path.suffix != ".json":
        raise HeadscopeError(f"--out {out}: expected a .json file (or a directory for several probes)")
    return path


def _already_scored(path: Path, fingerprint, method: str, n_pairs: int, length: int) -> bool:
    """True when ``path`` holds scores of this model, method, pair count and length."""
    if not path.is_file():
        return False
    previous = HeadScores.load(path)
    return (
        previous.fingerprint.mismatch(fingerprint) is None
        and previous.method == method
        and previous.meta.get("n_pairs") == n_pairs
        and previous.meta.get("length") == length
    )


def run(args: argparse.Namespace) -> int:
    from headscope.patching import score

    if args.batch_size is not None and args.batch_size < 1:
        raise HeadscopeError(f"--batch-size must be at least 1, got {args.batch_size}")
    lm = load_from_args(args)
    probes = [resolve_probe(lm, spec, args.length, args.pairs, args.seed) for spec in args.probe]
    for probe in probes:
        path = _output_path(args.out, probe.name, args.method, len(probes) > 1)
        if args.resume and _already_scored(path, lm.fingerprint, args.method, len(probe), probe.length):
            print(f"{probe.name} [{args.method}] already scored in {path}; skipped (--resume)")
            continue
        scores = score(lm, probe, args.method, noising=args.noising, batch_size=args.batch_size)
        scores.save(path)
        top = ", ".join(f"{h}={scores[h]:+.3f}" for h in scores.top(5))
        print(f"{probe.name} [{args.method}] clean-corrupt gap {scores.meta['ld_clean'] - scores.meta['ld_corrupt']:+.3f}; top heads {top} -> {path}")
    return 0
