"""``headscope probes``: list the built-in probes, or show one decoded clean/corrupt pair for a model.

    headscope probes                                   # name, capability, description of each built-in
    headscope probes show NAME --model DIR [--length N] [--seed S] [--pair I]

``show`` only loads the model's tokenizer and config (no weights); NAME may also be a ``.jsonl`` probe.
Tokens where clean and corrupt differ are shown in [[double brackets]].
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from headscope.heads import HeadscopeError


def register(subparsers) -> None:
    parser = subparsers.add_parser("probes", help="list built-in probes or show an example pair", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run_list)
    actions = parser.add_subparsers(dest="probes_action", metavar="ACTION")
    actions.add_parser("list", help="list the built-in probes (the default)").set_defaults(func=run_list)
    show = actions.add_parser("show", help="print one decoded clean/corrupt pair")
    show.add_argument("name", help="built-in probe name or a .jsonl probe file")
    show.add_argument("--model", required=True, help="local Hugging Face model directory or .gguf file (its tokenizer is used)")
    show.add_argument("--length", type=int, default=256, help="prompt length in tokens (default 256)")
    show.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    show.add_argument("--pair", type=int, default=0, help="which pair to show (default 0)")
    show.add_argument("--pairs", type=int, default=None,
                      help="pairs the probe is made with, as `score --pairs` (default: score's); a built-in probe's "
                           "pairs depend on it (pair 0 of 4 is not pair 0 of 16)")
    show.set_defaults(func=run_show)


def run_list(args: argparse.Namespace) -> int:
    from headscope.probes import BUILTIN_PROBES

    width = max(len(name) for name in BUILTIN_PROBES)
    for name, entry in BUILTIN_PROBES.items():
        print(f"{name:<{width}}  {entry.capability:<9}  {entry.description}")
    return 0


def _load_tokenizer_and_limits(model_dir: str) -> tuple[Any, int | None, int | None]:
    """The directory's tokenizer, max context and vocabulary size (weights are not loaded)."""
    from transformers import AutoTokenizer

    from headscope.models import arch_spec, read_config

    path = Path(model_dir)
    where: dict[str, Any] = {"local_files_only": True}
    if path.suffix == ".gguf" and path.is_file():  # a GGUF file: read its metadata, not its weights
        from transformers import AutoConfig

        from headscope.checkpoints import GGUF_READ_ERRORS, require_gguf, unreadable_gguf

        require_gguf()
        gguf, (path, where["gguf_file"]) = path, (path.parent, path.name)
        try:
            config = AutoConfig.from_pretrained(path, **where)
        except GGUF_READ_ERRORS as err:
            raise unreadable_gguf(gguf, err) from None
    else:
        config = read_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **where)
    except (OSError, ValueError) as err:
        raise HeadscopeError(f"cannot load a tokenizer from {path}: {str(err).strip().splitlines()[0]}") from None
    max_context = getattr(config, arch_spec(config.model_type).max_positions, None)
    return tokenizer, max_context, getattr(config, "vocab_size", None)


def _marked(tokenizer: Any, ids: tuple[int, ...], other: tuple[int, ...]) -> str:
    """Decode ``ids``, wrapping runs of tokens that differ from ``other`` in [[ ]].

    Runs are decoded separately; for a word-level tokenizer (whose decode drops the spaces between runs)
    a space joins two runs when neither brings its own whitespace, so words do not fuse.
    """
    from headscope.probes.surface import PLAIN, surface_for

    word_level = surface_for(tokenizer) is PLAIN
    text = ""
    start = 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or (ids[index] != other[index]) != (ids[start] != other[start]):
            run = tokenizer.decode(list(ids[start:index]))
            if word_level and text and not text[-1].isspace() and not run[:1].isspace():
                text += " "
            text += f"[[{run}]]" if ids[start] != other[start] else run
            start = index
    return text


def run_show(args: argparse.Namespace) -> int:
    from headscope.commands.options import BUILTIN_PAIRS, is_probe_file
    from headscope.probes import BUILTIN_PROBES, load_probe_jsonl, make_probe

    if args.pair < 0:
        raise HeadscopeError(f"--pair must be >= 0, got {args.pair}")
    tokenizer, max_context, vocab_size = _load_tokenizer_and_limits(args.model)
    if args.name in BUILTIN_PROBES:
        n_pairs = args.pairs or BUILTIN_PAIRS  # the probe `score` makes with the same --pairs, --length and --seed
        if args.pair >= n_pairs:
            raise HeadscopeError(f"--pair {args.pair}: a probe of {n_pairs} pairs (--pairs) has pairs 0 to {n_pairs - 1}")
        probe = make_probe(args.name, tokenizer, length=args.length, n_pairs=n_pairs, seed=args.seed)
    elif is_probe_file(args.name):
        probe = load_probe_jsonl(args.name, tokenizer=tokenizer)
        if args.pair >= len(probe):
            raise HeadscopeError(f"--pair {args.pair}: {args.name} has only {len(probe)} pairs")
    else:
        raise HeadscopeError(f"unknown probe {args.name!r}; built-in probes: {', '.join(BUILTIN_PROBES)} (or a .jsonl file)")
    probe.check_fits(max_context, vocab_size)
    pair = probe.pairs[args.pair]
    print(f"{probe.name} ({probe.capability}), {probe.length} tokens, pair {args.pair}; differing tokens in [[ ]]")
    print(f"clean:   {_marked(tokenizer, pair.clean_ids, pair.corrupt_ids)}")
    print(f"corrupt: {_marked(tokenizer, pair.corrupt_ids, pair.clean_ids)}")
    print(f"answer:  {tokenizer.decode([pair.answer_id])!r} (id {pair.answer_id})")
    print(f"wrong:   {tokenizer.decode([pair.wrong_id])!r} (id {pair.wrong_id})")
    return 0
