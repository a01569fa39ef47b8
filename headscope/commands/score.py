"""``headscope score``: score every head of a model on one or more probes and write HeadScores JSON.

A ``.jsonl`` probe file is scored on every pair it holds (``--pairs`` caps it); a built-in probe is
generated with ``--pairs`` pairs (default 16) of ``--length`` tokens. ``--out`` is a ``.json`` file for
one probe, or a directory (one ``PROBE.METHOD.json`` per probe): new, empty or holding earlier scores
(``--force`` writes into any other directory), never inside the model directory; an existing ``.json``
``--out`` is replaced only when it holds scores (``--force``: whatever it holds). Two probes of one name (a
``.jsonl`` probe is named after its file) are refused. Where it can be written is checked before any scoring;
``--resume`` skips probes already scored there on the same pairs, method, dtype and weights.

On several GPUs of one host start the same command through torchrun:
``torchrun --nproc-per-node N -m headscope score --model DIR --probe P --out scores/``. torchrun's
environment (``WORLD_SIZE > 1``) is the switch, there is no flag to forget: every process loads the whole
model on the GPU of its ``LOCAL_RANK`` (NCCL; gloo with ``--device cpu``), the patched runs are split over
the processes by head (``headscope.patching.sharding``), and rank 0 writes the one scores file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from headscope.commands.options import add_model_args, add_probe_args, is_probe_file, load_from_args, resolve_probe
from headscope.outputs import check_output_dir, check_output_file, visible_entries
from headscope.heads import HeadScores, HeadscopeError, clean_corrupt_gap, read_json
from headscope.probes.jsonl import SPACE_SPLIT

if TYPE_CHECKING:
    from headscope.distributed import DistEnv


def register(subparsers) -> None:
    from headscope.patching import SCORERS

    parser = subparsers.add_parser("score", help=f"score heads ({', '.join(SCORERS)})", description=__doc__)
    add_model_args(parser)
    add_probe_args(parser)
    parser.add_argument("--method", default="activation", choices=sorted(SCORERS), help="scoring method (default activation)")
    parser.add_argument("--noising", action="store_true", help="patch corrupt into clean (default: clean into corrupt)")
    parser.add_argument("--batch-size", type=int, default=None, help="patched sequences per forward (default: largest that fits)")
    parser.add_argument("--out", required=True, help="output JSON file, or a directory when several probes are given")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out directory that holds other files than scores, or over an --out file that is not a scores file")
    parser.add_argument("--resume", action="store_true", help="skip probes whose scores file already exists for this model and method")
    parser.add_argument("--receivers", default=None, help="--method path: receiver heads, e.g. L1H3:k,L2H5 or 1.3:k,2.5 (LxHy or LAYER.HEAD, then :q, :k or :v; "
                        "default inputs q,k,v); "
                        "default: the top-4 heads by |direct score| outside layer 0")
    parser.add_argument("--top-k", type=int, default=None, help="--method screen: heads to verify with exact patching (default a quarter of all heads)")
    parser.set_defaults(func=run, interrupted="interrupted; rerun with --resume to keep finished probes")


def _is_directory_out(out: str, several: bool) -> bool:
    return several or Path(out).is_dir() or out.endswith("/")


def _output_path(out: str, probe_name: str, method: str, several: bool) -> Path:
    path = Path(out)
    if _is_directory_out(out, several):
        return path / f"{probe_name}.{method}.json"
    if path.suffix != ".json":
        raise HeadscopeError(f"--out {out}: expected a .json file (or a directory for several probes)")
    return path


def is_scores_file(path: Path) -> bool:
    """Whether ``path`` is a headscope scores JSON."""
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        data = read_json(path, "scores")
    except HeadscopeError:
        return False
    return isinstance(data, dict) and data.get("kind") == "headscope.scores"


def is_scores_dir(path: Path) -> bool:
    """Whether every file a user sees in ``path`` is a headscope scores JSON (a previous ``--out``)."""
    return all(is_scores_file(entry) for entry in visible_entries(path))


def check_out(args: argparse.Namespace) -> None:
    """Refuse a bad ``--out`` before the model is loaded (see the module docstring)."""
    several = len(args.probe) > 1
    names = [Path(spec).stem if is_probe_file(spec) else spec for spec in args.probe]  # (as the probes are named)
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise HeadscopeError(f"two probes are named {', '.join(twice)} (a .jsonl probe is named after its file): their scores "
                             "would overwrite each other; rename a file")
    if _is_directory_out(args.out, several):
        check_output_dir(args.out, "headscope scores", [args.model], is_scores_dir, args.force)
    else:
        path = check_output_file(_output_path(args.out, "", args.method, several), [args.model])
        if path.exists() and not is_scores_file(path) and not args.force:
            raise HeadscopeError(f"--out {args.out} exists and is not a headscope scores file; choose another name, or --force to replace it")


def gap_note(meta: dict) -> str | None:
    """A warning when the model does not solve the probe (the scores are fractions of its clean - corrupt gap, so
    with a gap below ``SOLVED_GAP`` logits, or on pairs it gets wrong, they are mostly noise), else None."""
    from headscope.patching.rope import MIN_GAP as SOLVED_GAP

    gap = clean_corrupt_gap(meta)
    wins, positive = meta.get("clean_answer_wins"), meta.get("pairs_gap_positive")
    counts = f" (answer above wrong on {wins:.0%} of the clean prompts; clean above corrupt on {positive:.0%} of the pairs)" \
        if wins is not None and positive is not None else ""
    if gap <= 0:
        return f"the clean - corrupt gap is {gap:+.3f}: the model does not tell clean from corrupt this way round{counts}; " \
               "check answer/wrong (swapped?): the scores' signs are flipped and they are noise"
    if gap < SOLVED_GAP or (wins is not None and wins < 0.5):
        return f"the clean - corrupt gap is only {gap:+.3f} logits{counts}: the model barely solves this probe, and its scores " \
               "(fractions of that gap) are mostly noise"
    return None


def _method_options(args: argparse.Namespace) -> dict:
    """Scorer options from ``--receivers`` / ``--top-k``, each only with the method that takes it."""
    from headscope.patching import parse_receivers

    options: dict = {}
    if args.receivers is not None:
        if args.method != "path":
            raise HeadscopeError(f"--receivers applies to --method path, not {args.method}")
        options["receivers"] = parse_receivers(args.receivers)
    if args.top_k is not None:
        if args.method != "screen":
            raise HeadscopeError(f"--top-k applies to --method screen, not {args.method}")
        options["top_k"] = args.top_k
    return options


def _already_scored(path: Path, lm, probe, method: str, noising: bool, options: dict) -> bool:
    """True when ``path`` holds scores of this model and dtype, method, direction, the very same pairs (their hash:
    another seed, length, count or edited probe file differs) and receivers / top-k."""
    from headscope.models import weights_digest

    if not path.is_file():
        return False
    meta = (previous := HeadScores.load(path)).meta
    direction = "clean" if method == "rope" else "noising" if noising else "denoising"
    given = "receivers" in options
    return (
        previous.fingerprint.mismatch(lm.fingerprint) is None
        and previous.method == method
        and meta.get("pairs_sha256") == probe.digest()
        and meta.get("dtype") == str(lm.dtype)
        and meta.get("weights_digest") == weights_digest(lm.model)  # (another checkpoint of the same shape: score again)
        and meta.get("direction") == direction
        and (method != "path" or (meta.get("receivers_chosen_by") == "given") == given)
        and (not given or meta.get("receivers") == [str(r) for r in options["receivers"]])
        and ("top_k" not in options or meta.get("top_k") == options["top_k"])
    )


def _device(args: argparse.Namespace, env: DistEnv) -> str:
    """``--device``, or under torchrun the device of this process (``cuda`` means the GPU of its LOCAL_RANK)."""
    if not env.distributed:
        return args.device
    if args.device not in ("cpu", "cuda"):
        raise HeadscopeError(f"--device {args.device}: under torchrun every process uses the GPU of its LOCAL_RANK; pass --device cuda or cpu")
    return str(env.device)


def run(args: argparse.Namespace) -> int:
    from headscope.distributed import barrier, broadcast_object, init_distributed, shutdown
    from headscope.patching import score
    from headscope.patching.sharding import sharded

    if args.batch_size is not None and args.batch_size < 1:
        raise HeadscopeError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = _method_options(args)
    check_out(args)
    env = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        lm = load_from_args(args, _device(args, env))
        probes = [resolve_probe(lm, spec, args.length, args.pairs, args.seed, args.capability) for spec in args.probe]
        for spec, probe in zip(args.probe, probes):
            if env.is_main and args.pairs is not None and len(probe) < args.pairs:
                print(f"note: {spec} holds {len(probe)} pairs; --pairs {args.pairs} scores all of them")
            if env.is_main and SPACE_SPLIT in probe.meta.get("answer_forms", ""):
                print(f"note: {spec}: with this tokenizer ' ANSWER' is a space token and then ANSWER, so the answer is read "
                      "right after the prompt; if the model writes the space first, end the prompts with a space")
        processes = f" on {env.world_size} processes" if env.distributed else ""
        with sharded(env):
            for probe in probes:
                path = _output_path(args.out, probe.name, args.method, len(probes) > 1)
                # Rank 0 decides (it alone writes), so that every process skips the same probes.
                if broadcast_object(args.resume and _already_scored(path, lm, probe, args.method, args.noising, options), env):
                    if env.is_main:
                        print(f"{probe.name} [{args.method}] already scored in {path}; skipped (--resume)")
                    continue
                started = time.perf_counter()
                scores = score(lm, probe, args.method, noising=args.noising, batch_size=args.batch_size, progress=env.is_main, **options)
                if not env.is_main:
                    continue
                seconds = time.perf_counter() - started
                scores.save(path)
                top = ", ".join(f"{h}={scores[h]:+.3f}" for h in scores.top(5))
                via = f" into receivers {','.join(scores.meta['receivers'])}" if "receivers" in scores.meta else ""
                print(f"{probe.name} [{args.method}{via}] {len(probe)} pairs x {probe.length} tokens, clean-corrupt gap "
                      f"{scores.gap:+.3f}; top heads {top}; {seconds:.2f} s{processes} -> {path}")
                if note := gap_note(scores.meta):
                    print(f"note: {probe.name}: {note}")
        barrier(env)  # leave together: tearing the group down while a peer still receives the last gather can abort (gloo)
    finally:
        shutdown(env)
    return 0
