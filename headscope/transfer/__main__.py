"""``python -m headscope.transfer --config run.yaml --out RUN_DIR [--resume]``: the entry point torchrun starts.

Same arguments and behaviour as ``headscope transfer``; under ``torchrun --nproc-per-node N`` every
process runs it and ``run_transfer`` joins them into one process group.
"""

import argparse

from headscope.cli import run_command
from headscope.commands.transfer import __doc__ as DESCRIPTION
from headscope.commands.transfer import INTERRUPTED, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headscope.transfer", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run, interrupted=INTERRUPTED)
    return run_command(parser.parse_args(argv), prog="headscope transfer")


if __name__ == "__main__":
    from headscope.distributed import exit_process

    exit_process(main())
