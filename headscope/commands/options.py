"""Arguments shared by several subcommands: which model to load and how, which probe to run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from headscope.heads import HeadscopeError
from headscope.models import LoadedModel, load_model
from headscope.probes.base import CAPABILITIES, Probe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_PAIRS = 16  # pairs of a built-in probe when --pairs is not given


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model DIR`` plus device, dtype and attention implementation."""
    parser.add_argument("--model", required=required, help="local Hugging Face model directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation (default sdpa)")


def load_from_args(args: argparse.Namespace, device: str | None = None) -> LoadedModel:
    """The model of ``--model`` with ``--dtype`` and ``--attn``, on ``device`` (default ``--device``)."""
    device = device or args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeadscopeError(f"--device {device} asked for, but no CUDA device is available")
    return load_model(args.model, dtype=DTYPES[args.dtype], device=device, attn_implementation=args.attn)


def add_probe_args(parser: argparse.ArgumentParser, seed_help: str = "seed of the probe generator (default 0)", seed_default: int | None = 0) -> None:
    parser.add_argument("--probe", required=True, action="append", help="built-in probe name or a .jsonl file (repeatable)")
    parser.add_argument("--length", type=int, default=256, help="prompt length in tokens for built-in probes (default 256)")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"prompt pairs per probe (default: {BUILTIN_PAIRS} for a built-in probe, every pair of a .jsonl file; caps a file)")
    parser.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    parser.add_argument("--capability", choices=CAPABILITIES, default="retrieval",
                        help="capability of the .jsonl probes (default retrieval; built-in probes have their own): "
                             "`fuse` weights the two capabilities equally")


def is_probe_file(spec: str) -> bool:
    """Whether a ``--probe`` names a JSONL probe file (else a built-in probe); the probe is then named after it."""
    return spec.endswith(".jsonl") or Path(spec).is_file()


def resolve_probe(lm: LoadedModel, spec: str, length: int, n_pairs: int | None, seed: int, capability: str = "retrieval") -> Probe:
    """A built-in probe by name (``n_pairs`` pairs, default ``BUILTIN_PAIRS``), or a JSONL probe file (every
    pair, or its first ``n_pairs``; of ``capability``)."""
    from headscope.probes import load_probe_jsonl, make_probe

    if n_pairs is not None and n_pairs < 1:
        raise HeadscopeError(f"--pairs must be at least 1, got {n_pairs}")
    if is_probe_file(spec):
        probe = load_probe_jsonl(spec, tokenizer=lm.tokenizer, capability=capability)
        probe = probe.subset(n_pairs) if n_pairs is not None else probe
    else:
        if lm.tokenizer is None:
            raise HeadscopeError(f"built-in probe {spec!r} needs a tokenizer, but {lm.fingerprint.name} has none")
        probe = make_probe(spec, lm.tokenizer, length=length, n_pairs=n_pairs or BUILTIN_PAIRS, seed=seed)
    probe.check_fits(lm.max_context, getattr(lm.model.config, "vocab_size", None))
    return probe
