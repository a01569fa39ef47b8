"""The ``headscope`` command line. Each subcommand lives in ``headscope.commands.<name>``.

User mistakes (``HeadscopeError``) print one line and exit with code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from headscope.heads import HeadscopeError

# Subcommand modules, in the order `headscope --help` lists them.
COMMANDS = ("models", "probes", "score", "ablate", "fuse", "mask", "report", "transfer", "demo", "build")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headscope", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"headscope.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HeadscopeError as err:
        print(f"headscope: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
