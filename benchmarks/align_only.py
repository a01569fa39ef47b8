"""Align-only transfer on the CPU: selected masks against KV-matched random masks, after stage 1 alone.

A cheap proxy of ``benchmarks/hybrid_quality.py`` for a real model when no GPU is at hand: every arm is the
hybrid of ``--model`` under one mask, its fusion scales calibrated on ``--calibrate-rows`` training rows
(``headscope.hybrid.calibrate_gamma``), then ``--steps`` steps of teacher-forced layer alignment
(``headscope.transfer.align_hybrid``: attention modules only, AdamW at a constant ``--lr``) on
``--batch`` x ``--length`` token rows of ``--data`` (a ``.jsonl`` of ``{"text": ...}``, packed from consecutive
documents: first ``--heldout-rows`` rows of ``--eval-length`` held out, then the calibration rows, then the
training rows, disjoint). Then ``headscope.quality.evaluate_quality``:
argmax accuracy of the ``--probes`` (``--pairs`` each, seed ``--eval-seed``) at ``--eval-length`` and the
held-out CE. Arms: the teacher, each ``--mask NAME=FILE``, and ``--random-seeds`` KV-matched random masks of
the first mask (``headscope.mask.kv_matched_random_mask``: as many FA heads and KV groups).

What it can and cannot say: no distillation and no long-context stage, a few thousand tokens of
training and few prompts, so it ranks masks by how well the *aligned* hybrid keeps each ability, not by what
full transfer reaches; differences of one or two prompts are noise. Results (``--out``, default
``benchmarks/results``): ``align_only.json`` (settings, one record per arm, rewritten atomically after each
arm; a rerun with the same settings skips finished arms) and ``align_only.md``.

    python benchmarks/align_only.py --model SMOLLM2_DIR --data smollm2.jsonl \\
        --mask selected=benchmarks/results/smollm2/rope_kv_aware_mask.json --random-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".jsonl with a 'text' field per line")
    p.add_argument("--mask", action="append", required=True, metavar="NAME=FILE", help="a mask arm (repeatable; the first is the one random masks match)")
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--probes", default="needle_single,needle_multikey,kv_recall,induction,ioi")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calibrate-rows", type=int, default=8)
    p.add_argument("--heldout-rows", type=int, default=4)
    p.add_argument("--eval-length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data!r}: no such file")
    args.masks = []
    for spec in args.mask:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            p.error(f"--mask {spec!r}: expected NAME=FILE with an existing file")
        args.masks.append((name, path))
    args.random_seeds = [int(x) for x in args.random_seeds.split(",") if x.strip()]
    args.probes = [x.strip() for x in args.probes.split(",") if x.strip()]
    args.out = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    return args


def read_tokens(path: str, tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` ids of the documents of ``path`` in file order (EOS between them), ``(n_tokens,)``."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            ids += tokenizer(json.loads(line)["text"]).input_ids + [tokenizer.eos_token_id]
            if len(ids) >= n_tokens:
                return torch.tensor(ids[:n_tokens])
    raise SystemExit(f"headscope: error: {path} holds fewer than the {n_tokens} tokens this run needs")


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"# Align-only transfer on {Path(s['model']).name} (CPU proxy of hybrid_quality)", "",
             f"{s['steps']} align steps of {s['batch']} x {s['length']} tokens (lr {s['lr']}, seed {s['seed']}), fusion scales "
             f"calibrated on {s['calibrate_rows']} rows; accuracy = argmax over {s['pairs']} prompts per probe at "
             f"{s['eval_length']} tokens (seed {s['eval_seed']}); held-out CE on {s['heldout_rows']} rows of {s['eval_length']}. "
             "No distillation or long-context stage: a ranking of aligned hybrids, not of fully transferred ones.", "",
             "Per probe: argmax accuracy / mean logit difference answer - wrong (the finer signal when accuracy is 0).", "",
             "| arm | FA heads | KV groups | held-out CE | " + " | ".join(s["probes"]) + " | mean accuracy | mean logit diff | minutes |",
             "|---|---|---|---|" + "---|" * (len(s["probes"]) + 3)]
    for name, arm in data["arms"].items():
        cells = [arm["accuracy"][p][str(s["eval_length"])] for p in s["probes"]]
        acc, diff = [c["argmax"] for c in cells], [c["logit_diff"] for c in cells]
        lines.append(f"| {name} | {arm['n_full']} | {arm['kv_groups']} | {arm['heldout_loss'][str(s['eval_length'])]:.3f} | "
                     + " | ".join(f"{a:.2f} / {d:+.2f}" for a, d in zip(acc, diff))
                     + f" | {sum(acc) / len(acc):.2f} | {sum(diff) / len(diff):+.2f} | {arm['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from headscope.heads import read_json, write_json_atomic, write_text_atomic
    from headscope.hybrid.builder import calibrate_gamma
    from headscope.mask import kv_matched_random_mask, load_mask
    from headscope.models import load_model
    from headscope.quality import evaluate_quality, probe_grid
    from headscope.transfer import align_hybrid, build_student

    torch.manual_seed(args.seed)
    lm = load_model(args.model, dtype=torch.float32)
    lm.model.requires_grad_(False)
    masks = {name: load_mask(path, expect=lm.fingerprint) for name, path in args.masks}
    first = next(iter(masks.values()))
    masks.update({f"randomkv_s{seed}": kv_matched_random_mask(first, seed) for seed in args.random_seeds})
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "mask", "masks")}
    settings["masks"] = [[name, path] for name, path in args.masks]  # as JSON reads it back, so a rerun matches
    path = args.out / "align_only.json"
    data = read_json(path, "results") if path.is_file() else None
    if data is None or data["settings"] != settings:
        data = {"schema": "headscope.align_only/1", "settings": settings, "arms": {}}
    n_heldout = args.heldout_rows * args.eval_length  # held out first, then calibration rows, then training rows
    tokens = read_tokens(args.data, lm.tokenizer, n_heldout + (args.calibrate_rows + args.steps * args.batch) * args.length)
    heldout = {args.eval_length: tokens[:n_heldout].view(args.heldout_rows, args.eval_length)}
    rows = tokens[n_heldout:].view(-1, args.length)  # (calibrate_rows + steps * batch, length)
    calib, batches = rows[: args.calibrate_rows], rows[args.calibrate_rows:].view(args.steps, args.batch, args.length)
    grid = probe_grid(lm.tokenizer, args.probes, [args.eval_length], args.pairs, args.eval_seed)
    for name, mask in [("teacher", None), *masks.items()]:
        if name in data["arms"]:
            continue
        started = time.perf_counter()
        model = lm.model
        if mask is not None:
            torch.manual_seed(args.seed)
            model = build_student(lm.model, mask, {})
            calibrate_gamma(model, lm, calib)
            losses = align_hybrid(model, lm.model, batches, args.steps, args.lr, progress=sys.stderr.isatty())
        model.eval()
        with torch.no_grad():
            record = evaluate_quality(model, lm.fingerprint, mask, grid, heldout, progress=sys.stderr.isatty())
        if mask is not None:
            record.update(heads=[str(h) for h in mask.heads()], align_first=losses[0], align_last=losses[-1])
        record["minutes"] = (time.perf_counter() - started) / 60
        data["arms"][name] = record
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
        write_text_atomic(args.out / "align_only.md", markdown(data))
        print(f"{name}: CE {record['heldout_loss'][str(args.eval_length)]:.3f}, {record['minutes']:.1f} min", flush=True)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    from headscope.cli import script_main

    script_main(main)
