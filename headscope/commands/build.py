"""``headscope build``: turn a model and a head mask into a head-wise hybrid checkpoint (with its tokenizer).

The mask is a mask file (``--mask``, written by ``headscope fuse``, ``headscope mask random`` or
``headscope mask layerwise``) or a baseline made on the spot: ``--random 7:1 [--seed N]`` (random heads)
or ``--layerwise 3:1`` (whole layers; all-FA layers stay plain attention, the others become pure Gated
DeltaNet). A mask made for another model is refused with one line naming the mismatch.

``--out`` must be a new or empty directory, or a previous build (``--force`` writes into any other
directory); it is never the model directory or inside it. A build lists the files it wrote, with their sizes
and modification times, in ``BUILD_RECORD``: a directory is a previous build only while those files are as the
build left them (a hybrid trained or saved over it since is not one, and needs ``--force``), and a rebuild
removes the files of the previous build that it does not write again (weights in another shard layout, a chat
template the new tokenizer lacks). The output loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` after
``import headscope``, or with ``trust_remote_code=True`` and no import; the model's generation config (its stop
tokens and sampling defaults) comes along.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headscope.commands.options import add_model_args, load_from_args
from headscope.outputs import check_output_dir, write_dir
from headscope.heads import HeadMask
from headscope.models import LoadedModel


def register(subparsers) -> None:
    parser = subparsers.add_parser("build", help="build a head-wise hybrid (FA + Gated DeltaNet heads) from a mask", description=__doc__)
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mask", help="mask JSON file")
    source.add_argument("--random", metavar="LA:FA", help="random head mask at this linear:full ratio, e.g. 7:1")
    source.add_argument("--layerwise", metavar="LA:FA", help="layer-wise mask at this linear:full layer ratio, e.g. 3:1")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--out", required=True, help="output directory (config, weights, tokenizer): new, empty or a previous build")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a previous build")
    parser.add_argument("--fa-rope", action="store_true", help="keep RoPE on the FA heads (default: removed)")
    parser.add_argument("--no-log-scaling", action="store_true", help="no log-position query scale on FA heads")
    parser.add_argument("--no-gate", action="store_true", help="no output gate on FA heads")
    parser.add_argument("--no-fusion-norm", action="store_true", help="no per-head RMSNorm + gamma before o_proj")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the new parameters (default 0)")
    parser.set_defaults(func=run)


def resolve_mask(args: argparse.Namespace, lm: LoadedModel) -> HeadMask:
    """The mask file (checked against the model) or the requested baseline."""
    from headscope.mask import layerwise_mask, load_mask, random_mask

    if args.mask:
        return load_mask(args.mask, expect=lm.fingerprint)
    if args.random:
        return random_mask(lm.fingerprint, ratio=args.random, seed=args.seed)
    return layerwise_mask(lm.fingerprint, ratio=args.layerwise)


BUILD_RECORD = "headscope_build.json"


def _stats(folder: Path, names) -> dict[str, list[int]]:
    """``{name: [bytes, mtime_ns]}`` of the files ``names`` in ``folder``."""
    stats = {name: (folder / name).stat() for name in names}
    return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


def previous_build(path: Path) -> list[str] | None:
    """The files of an unchanged previous build in ``path`` (``BUILD_RECORD``: every listed file still has the size
    and modification time the build gave it), or None."""
    try:
        files = json.loads((path / BUILD_RECORD).read_text(encoding="utf-8"))["files"]
        return list(files) if _stats(path, files) == files else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_build(path: Path) -> bool:
    """Whether ``path`` holds an unchanged hybrid written by ``headscope build``."""
    return previous_build(path) is not None


def run(args: argparse.Namespace) -> int:
    from headscope.hybrid import HybridConfig, build_hybrid
    from headscope.mask import budget_note

    out = check_output_dir(args.out, "unchanged hybrid built by `headscope build`", [args.model], is_build, args.force)
    lm = load_from_args(args)
    mask = resolve_mask(args, lm)
    if note := budget_note(mask):
        print(note)
    switches = HybridConfig(
        fa_rope=args.fa_rope, log_scaling=not args.no_log_scaling, output_gate=not args.no_gate,
        fusion_norm=not args.no_fusion_norm, init_seed=args.init_seed,
    )
    hybrid = build_hybrid(lm, mask, switches)

    def save(folder: Path) -> None:
        hybrid.save_pretrained(folder)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(folder)
        files = _stats(folder, sorted(entry.name for entry in folder.iterdir()))
        (folder / BUILD_RECORD).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")

    write_dir(out, save, stale=previous_build(out) or ())
    kinds = [hybrid.config.layer_plan(l).kind for l in range(hybrid.config.num_hidden_layers)]
    print(
        f"built {lm.fingerprint.name or lm.fingerprint.architecture}: {mask.n_full}/{mask.full.numel()} FA heads "
        f"(KV kept {mask.kv_fraction:.1%}); layers {kinds.count('hybrid')} hybrid, {kinds.count('full')} full, "
        f"{kinds.count('linear')} linear -> {out}"
    )
    return 0
