"""``headscope transfer``: train a head-wise hybrid from its teacher in three stages (align, distill, long context).

Run ``headscope transfer --config run.yaml --out RUN_DIR``; add ``--resume`` to continue an interrupted
run exactly. For several GPUs start the same command through torchrun:
``torchrun --nproc-per-node N -m headscope.transfer --config run.yaml --out RUN_DIR``. The config
schema is documented in ``headscope/transfer/example.yaml``.
"""

from __future__ import annotations

import argparse
import os

INTERRUPTED = "interrupted; rerun with --resume to continue from the latest checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (.yaml, .yml or .toml)")
    parser.add_argument("--out", required=True, help="run directory (log, checkpoints, loss curves, final model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def register(subparsers) -> None:
    parser = subparsers.add_parser("transfer", help="train the hybrid from its teacher (align, distill, long context)", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run, interrupted=INTERRUPTED)


def run(args: argparse.Namespace) -> int:
    from headscope.transfer import load_config, run_transfer

    result = run_transfer(load_config(args.config), args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        for index, stage in enumerate(result.stages, start=1):
            heldout = stage.heldout.get("heldout_loss")
            heldout_text = f", held-out {heldout:.4g}" if heldout is not None else ""
            loss_text = f"{stage.final_loss:.4g}" if stage.final_loss is not None else "n/a"
            print(f"{index}. {stage.name} [{stage.kind}]: {stage.steps} steps, {stage.tokens} tokens, loss {loss_text}{heldout_text}")
        print(f"final model -> {result.final_model_dir}; log {result.log_path}; curves {result.curves_path}")
    return 0
