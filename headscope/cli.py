"""The ``headscope`` command line; each subcommand lives in ``headscope.commands.<name>``.

User mistakes (``HeadscopeError``) print one line and exit with code 2; Ctrl-C prints one line (what a
rerun keeps: each subcommand may set ``interrupted`` in its defaults) and exits with 130. Nothing else is
caught: any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NoReturn

from headscope.heads import HeadscopeError

# Subcommand modules, in the order `headscope --help` lists them.
COMMANDS = ("models", "probes", "score", "ablate", "fuse", "mask", "report", "transfer", "demo", "build")

DESCRIPTION = """\
Find the attention heads a causal LM needs at full attention, then build the head-wise hybrid
(full attention on those heads, Gated DeltaNet on the rest).

The usual order: `models` (fetch a real model, or bring your own directory) -> `probes` (see the
prompts) -> `score` (per-head scores; `ablate` checks them) -> `fuse` (a head mask) -> `report`
(HTML) -> `build` (the hybrid) -> `transfer` (train it). `demo` runs it all on the bundled model.
`headscope COMMAND --help` explains each command."""

INTERRUPTED = "interrupted; no file was left half-written"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows the docstrings' ``code`` markup as plain `code`.

    Subcommand parsers are made by ``add_subparsers``, which uses the parent's class, so every level
    of ``headscope ... --help`` is cleaned.
    """

    def format_help(self) -> str:
        return super().format_help().replace("``", "`")

    def format_usage(self) -> str:
        return super().format_usage().replace("``", "`")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headscope", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"headscope.commands.{name}").register(subparsers)
    return parser


def run_command(args: argparse.Namespace, prog: str = "headscope") -> int:
    """Run a parsed subcommand (``args.func``) with the error and Ctrl-C handling of the module docstring."""
    try:
        return int(args.func(args) or 0)
    except HeadscopeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {getattr(args, 'interrupted', INTERRUPTED)}", file=sys.stderr)
        return 130


def script_main(main: Callable[[], int | None], prog: str = "headscope") -> NoReturn:
    """Exit with ``main()``'s code, with the CLI's handling of ``HeadscopeError`` (one line, exit 2) and Ctrl-C
    (one line, exit 130): the ``__main__`` of the scripts under ``benchmarks/`` and of ``train_demo``."""
    try:
        code = int(main() or 0)
    except HeadscopeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
        code = 130
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # while the subcommands' modules load
        print(f"headscope: {INTERRUPTED}", file=sys.stderr)
        return 130
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
