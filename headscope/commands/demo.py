"""``headscope demo``: the whole pipeline on the bundled demo model (or ``--model DIR``).

``--out`` must be new, empty or the output of an earlier demo (whose matching score files are reused);
``--force`` writes into any other directory. It is never the model directory or inside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope.outputs import check_output_dir, visible_entries, write_dir
from headscope.heads import HeadscopeError


def register(subparsers) -> None:
    """Add the ``demo`` subcommand.

    Args:
        subparsers: the ``headscope`` parser's subparsers.
    Returns:
        None.
    """
    parser = subparsers.add_parser("demo", help="run probes, scoring, fusion, mask, report and hybrid on the demo model", description=__doc__)
    parser.add_argument("--model", default=None, help="local HF model directory (default: the bundled demo model)")
    parser.add_argument("--out", default="demo_out", help="output directory (default demo_out): new, empty or an earlier demo's")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out that holds other files than a demo's")
    parser.add_argument("--length", type=int, default=256, help="probe length in tokens (default 256)")
    parser.add_argument("--pairs", type=int, default=8, help="prompt pairs per probe (default 8)")
    parser.add_argument("--ratio", default="7:1", help="linear:full head budget (default 7:1)")
    parser.add_argument("--probes", default=None,
                        help="comma-separated built-in probes (default: every retrieval and reasoning probe)")
    parser.add_argument("--align-steps", type=int, default=60, help="stage-1 alignment steps of the hybrid (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--no-hybrid", action="store_true", help="stop after the mask and report")
    parser.add_argument("--no-rope-aware", action="store_true",
                        help="do not keep RoPE-dependent heads off full attention (skips the rope scores)")
    parser.set_defaults(func=run, interrupted="interrupted; rerun the same command to reuse the finished score files")


def fallback_model(out: Path) -> Path:
    """A random-init model with the demo model's shape and tokenizer, for when none is bundled.

    Args:
        out: the demo output directory; the model goes to ``out/untrained-model`` (reused when present).
    Returns:
        The model directory.
    """
    from headscope.probes import TASK_NAMES, sample_task_text, task_vocabulary
    from headscope.zoo.tokenizer import build_demo_tokenizer
    from headscope.zoo.train_demo import model_config

    from transformers import Qwen3ForCausalLM
    import torch

    path = out / "untrained-model"
    if not (path / "config.json").is_file():
        tokenizer = build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary())
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(model_config("demo", tokenizer, 1024))

        def save(folder: Path) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        write_dir(path, save)
    return path


def is_demo_dir(path: Path) -> bool:
    """Whether ``path`` holds only what ``headscope demo`` writes (``headscope.demo.OUTPUTS``)."""
    from headscope.demo import OUTPUTS

    return all(entry.name in OUTPUTS for entry in visible_entries(path))


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``headscope demo`` arguments.

    Args:
        args: the parsed command line (see ``register``).
    Returns:
        The exit code (0).
    Raises:
        HeadscopeError: bad arguments or a model the demo cannot use.
    """
    from headscope.demo import DemoSettings, run_demo
    from headscope.zoo import demo_model_path

    if args.pairs < 1 or args.length < 1 or args.align_steps < 1:
        raise HeadscopeError("--pairs, --length and --align-steps must be positive")
    probes = DemoSettings.probes if args.probes is None else tuple(p.strip() for p in args.probes.split(",") if p.strip())
    if not probes:
        raise HeadscopeError("--probes names no probe")
    missing = None
    if args.model is not None:
        model_dir = Path(args.model)
    else:
        try:
            model_dir = demo_model_path()
        except HeadscopeError as err:
            missing, model_dir = err, None
    out = check_output_dir(args.out, "output of `headscope demo`", [model_dir], is_demo_dir, args.force)
    if missing is not None:
        print(f"note: {missing}")
        print("note: running on an UNTRAINED model of the same shape built locally; its scores show no real head specialisation")
        model_dir = fallback_model(out)
    settings = DemoSettings(length=args.length, n_pairs=args.pairs, ratio=args.ratio, align_steps=args.align_steps,
                            rope_aware=not args.no_rope_aware,
                            probes=probes, build_hybrid=not args.no_hybrid, progress=not args.no_progress)
    run_demo(model_dir, out, settings)
    return 0
