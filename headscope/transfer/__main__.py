"""``python -m headscope.transfer --config run.yaml --out RUN_DIR [--resume]``: the entry point torchrun starts.

Same arguments and behaviour as ``headscope transfer``; under ``torchrun --nproc-per-node N`` every
process runs it and ``run_transfer`` joins them into one process group.
"""

import argparse
import sys

from headscope.commands.transfer import __doc__ as DESCRIPTION
from headscope.commands.transfer import add_arguments, run
from headscope.heads import HeadscopeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headscope.transfer", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except HeadscopeError as err:
        print(f"headscope transfer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
