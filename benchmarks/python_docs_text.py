"""Evaluation-only real text, offline: the Python documentation's topics as a .jsonl of documents.

    python benchmarks/python_docs_text.py --out python_docs.jsonl
    python benchmarks/hybrid_quality.py ... --eval-data python_docs.jsonl

Every Python installation carries ``pydoc_data.topics``: the language reference's sections (assignment,
the data model, exceptions, ...) as help() shows them, written by people, about 465,000 characters in
Python 3.11 (PSF documentation license). Held-out CE on it is a language-modelling score on real prose
that neither a teacher's own samples nor synthetic transfer data stand for. One record per topic, in
sorted topic order: ``{"text": ..., "kind": "python_docs", "topic": ...}``; the first record also
names the Python version, since the topics change between versions (make the file on one machine and
carry it, so that every run scores the same text). Written atomically; an existing file is kept unless
``--force``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def documents() -> list[dict]:
    """The topics as records, sorted by topic name."""
    from pydoc_data.topics import topics

    version = f"Python {platform.python_version()}"
    return [{"text": topics[name], "kind": "python_docs", "topic": name, **({"source": f"pydoc_data.topics, {version}"} if i == 0 else {})}
            for i, name in enumerate(sorted(topics))]


def main(argv: list[str] | None = None) -> int:
    from headscope.heads import HeadscopeError, write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the .jsonl file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    if args.out.suffix != ".jsonl":
        raise HeadscopeError(f"--out {args.out}: the file must end in .jsonl")
    if args.out.exists() and not args.force:
        raise HeadscopeError(f"{args.out} exists; pass --force to overwrite it")
    records = documents()
    write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{args.out}: {len(records)} documents, {sum(len(r['text']) for r in records):,} characters ({records[0]['source']})")
    return 0


if __name__ == "__main__":
    from headscope.cli import script_main

    script_main(main)
