"""The command line of ``benchmarks/hybrid_quality.py`` (a helper module of that script, not a script).

``parse_args`` parses and checks every flag (the script's docstring says what they do): seeds, probes and
lengths as lists, ``--arm NAME=MASK.json`` as ``extra_masks``, ``--hybrid-option KEY=VALUE`` as
``hybrid_options`` (every hybrid arm) and ``--arm-option FAMILY:KEY=VALUE`` as ``arm_options`` (``{family:
{switch: value}}``; a family of this run's plan, not the teacher), with ``--smoke`` defaults under the flags
given. ``planned_arms`` is the arms one invocation runs (the plan, ``--arms``, ``--shard``);
``arm_options`` each hybrid arm's own switches, those of its family; ``check_arm_options`` refuses an
``--arm-option`` that changes nothing in its family's mask where that mask is known before the run (layer-wise,
``--arm`` files, the fused arm with ``--mask``), e.g. ``fa_rope`` on whole FA layers, which keep their RoPE anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from headscope.arms import BUILTIN_ARMS, RANDOM_KINDS, plan_arms
from headscope.quality import REASONING_PROBES, RETRIEVAL_PROBES
from headscope.seeds import arm_family

REPO = Path(__file__).resolve().parents[1]  # not headscope.zoo.REPO_ROOT: on the GPU box headscope is installed elsewhere
SMOKE_LENGTH = 48  # the shortest length every evaluated probe fits with the demo tokenizer
SMOKE_DEFAULTS = dict(teacher_length=SMOKE_LENGTH, batch=2, pairs=2, heldout_rows=2, eval_sequences=2, score_length=SMOKE_LENGTH,
                      score_pairs=2, receivers=2, min_steps=2, max_steps=2, minutes=1.0, deadline_minutes=30.0, workers=1)


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The parsed and checked command line (a bad flag: one ``argparse`` error line, exit 2)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="teacher directory (default: data/models/headscope-demo)")
    p.add_argument("--out", default=None, help="results directory (default: $OUT or benchmarks/results)")
    p.add_argument("--work", default=None, help="scratch directory for runs and caches (default: /tmp/headscope-hybrid-quality)")
    p.add_argument("--mask", default=None, help="fused mask file to use instead of scoring (headscope mask JSON)")
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--random-kind", default="plain",
                   help="random arms: plain (same head budget), kv (KV-matched), layer (layer-matched), or several comma-separated")
    p.add_argument("--kv-matched", action="store_true", help="random arms are KV-matched to the fused mask (= --random-kind kv)")
    p.add_argument("--layer-matched", action="store_true",
                   help="random arms are layer-matched to the fused mask (= --random-kind layer; with --kv-matched: kv,layer)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=MASK.json", help="an extra arm with this mask file (repeatable)")
    p.add_argument("--calibrate-gamma", type=int, default=8, metavar="ROWS",
                   help="training rows that set each head's fusion scale to its pretrained output RMS (0: scales stay 1, the recipe before 2026-12-03)")
    p.add_argument("--hybrid-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a build_hybrid switch for every hybrid arm (repeatable; headscope.hybrid.builder.SWITCHES), e.g. fa_rope=true")
    p.add_argument("--arm-option", action="append", default=[], metavar="FAMILY:KEY=VALUE",
                   help="a build_hybrid switch for one arm family, all its mask and transfer seeds (repeatable; wins over "
                        "--hybrid-option; stored in the arms' records, not the settings), e.g. kv_aware_rope:fa_rope=true")
    p.add_argument("--transfer-seeds", default=None, help="repeat the --seeded-arms once per transfer seed, e.g. 0,1,2")
    p.add_argument("--seeded-arms", default=None, help="arms or families repeated per transfer seed (default: the fused and --arm arms)")
    p.add_argument("--arms", default=None, help="comma-separated subset of arms (names or families) to run (default: all)")
    p.add_argument("--data", action="append", default=None, metavar="FILE_OR_DIR",
                   help="transfer data files (.jsonl/.txt/.bin, repeatable) instead of the demo corpus")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="with --data: share of documents held out (hash split)")
    p.add_argument("--retrieval-probes", default=",".join(RETRIEVAL_PROBES), help="probes averaged as retrieval")
    p.add_argument("--reasoning-probes", default=",".join(REASONING_PROBES), help="probes averaged as reasoning")
    p.add_argument("--length-multiples", default="1,2,4,8", help="evaluated lengths, in multiples of the teacher length")
    p.add_argument("--minutes", type=float, default=7.5, help="total run time the calibrated steps aim at (from the start)")
    p.add_argument("--deadline-minutes", type=float, default=8.5, help="skip an arm that would end later than this")
    p.add_argument("--steps", default=None, help="fixed steps per stage, ALIGN,DISTILL,LONG (no calibration)")
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="rows per step in stages 1-2 (stage 3: half, at 2x length)")
    p.add_argument("--lr", default="1e-3,3e-4,1e-4", help="peak learning rates ALIGN,DISTILL,LONG")
    p.add_argument("--pairs", type=int, default=32, help="prompts per probe and length")
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--heldout-rows", type=int, default=32)
    p.add_argument("--heldout-kinds", default=None, metavar="KIND[,KIND...]",
                   help="with --data: held-out CE also on the held-out documents of each kind alone (.jsonl 'kind', e.g. sampled,essay,tasks)")
    p.add_argument("--eval-data", default=None, metavar="FILE[,FILE...]",
                   help="held-out CE also on each of these .txt/.jsonl files, never trained on (e.g. benchmarks/python_docs_text.py's output)")
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out rows of the trainer's stage-end evaluation")
    p.add_argument("--teacher-length", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--score-length", type=int, default=256)
    p.add_argument("--score-pairs", type=int, default=8)
    p.add_argument("--receivers", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="row-generation processes (default: CPUs - 2 on CUDA, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the I-th of N interleaved shares of the hybrid arms (shard 0 also evaluates the teacher); "
                        "needs --steps; run N processes side by side on one GPU, then --merge their --out folders")
    p.add_argument("--merge", default=None, metavar="DIR,DIR,...",
                   help="combine the results of shards (same settings and budget) into --out, then stop")
    p.add_argument("--fresh", action="store_true", help="discard earlier results and runs")
    p.add_argument("--dry-run", action="store_true",
                   help="load the teacher, check the results to resume and print what each arm would do (kept or run, its switches); the results stay untouched")
    p.add_argument("--smoke", action="store_true", help="everything tiny on the CPU (< 60 s)")
    p.add_argument("--tiny-model", action="store_true", help="use a tiny random Qwen3 even when the demo model exists")
    if p.parse_args(argv).smoke:  # smoke defaults; flags given on the command line still win
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args(argv)
    args.work = Path(args.work or "/tmp/headscope-hybrid-quality" + ("-smoke" if args.smoke else ""))
    default_out = args.work / "results" if args.smoke else Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    args.out = Path(args.out) if args.out else default_out  # smoke results never land in benchmarks/results
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    names = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    args.random_seeds = ints(args.random_seeds)
    args.transfer_seeds = ints(args.transfer_seeds) if args.transfer_seeds else []
    flagged = [kind for kind, flag in (("kv", args.kv_matched), ("layer", args.layer_matched)) if flag]
    args.random_kind = flagged or names(args.random_kind)
    args.retrieval_probes, args.reasoning_probes = names(args.retrieval_probes), names(args.reasoning_probes)
    args.length_multiples = ints(args.length_multiples)
    if args.heldout_kinds is not None:
        kinds = names(args.heldout_kinds)
        if not args.data:
            p.error("--heldout-kinds needs --data (the demo corpus has no document kinds)")
        if not kinds or len(set(kinds)) != len(kinds) or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in kinds):
            p.error(f"--heldout-kinds {args.heldout_kinds!r}: expected distinct kinds KIND[,KIND...] (letters, digits, _ . -)")
    args.heldout_kinds = names(args.heldout_kinds or "")
    args.eval_data = [Path(x) for x in names(args.eval_data or "")]
    for path in args.eval_data:
        if not path.is_file():
            p.error(f"--eval-data {path}: no such file")
        if path.suffix not in (".txt", ".jsonl"):
            p.error(f"--eval-data {path}: not a .txt or .jsonl file")
    if len({path.stem for path in args.eval_data}) != len(args.eval_data):
        p.error("--eval-data: the files need distinct names (their stems name the columns)")
    args.extra_masks = {}
    for spec in args.arm:
        name, _, path = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_[st]\d+$", name) or name in BUILTIN_ARMS or not path:
            p.error(f"--arm {spec!r}: expected NAME=MASK.json, NAME of letters, digits and _ not ending in _s<k>/_t<k>, not a built-in arm")
        args.extra_masks[name] = path
    from headscope.hybrid import HybridConfig
    from headscope.hybrid.builder import SWITCHES

    def switch(flag: str, spec: str, text: str) -> tuple[str, object]:
        key, sep, value = text.partition("=")
        if key not in SWITCHES or not sep:
            p.error(f"{flag} {spec!r}: expected KEY=VALUE with KEY one of {', '.join(SWITCHES)}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"{flag} {spec!r}: VALUE must be JSON (true, false, a number)")
        default = getattr(HybridConfig, key)  # the switch's type: HybridConfig does not check it, build_hybrid would fail late
        kind = bool if isinstance(default, bool) else int if isinstance(default, int) else float
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, int if kind is int else (int, float)):
            p.error(f"{flag} {spec!r}: {key} takes {'true or false' if kind is bool else 'an integer' if kind is int else 'a number'}")
        return key, value

    args.hybrid_options = dict(switch("--hybrid-option", spec, spec) for spec in args.hybrid_option)
    args.arm_options = {}
    for spec in args.arm_option:
        family, sep, text = spec.partition(":")
        if not sep:
            p.error(f"--arm-option {spec!r}: expected FAMILY:KEY=VALUE")
        key, value = switch("--arm-option", spec, text)
        args.arm_options.setdefault(family, {})[key] = value
    if args.calibrate_gamma < 0:
        p.error("--calibrate-gamma must be >= 0")
    if args.seeded_arms is None:
        args.seeded_arms = ["headwise_fused_7to1", *args.extra_masks]
    else:
        args.seeded_arms = names(args.seeded_arms)
    if len(set(args.transfer_seeds)) != len(args.transfer_seeds) or "teacher" in args.seeded_arms:
        p.error("--transfer-seeds must be distinct seeds; the teacher is evaluated once (not a seeded arm)")
    if not set(args.random_kind) <= set(RANDOM_KINDS) or not args.random_kind:
        p.error(f"--random-kind takes {' or '.join(RANDOM_KINDS)} (comma-separated)")
    families = {arm_family(name) for name, kind in plan_arms(args.extra_masks, args.random_seeds, args.random_kind) if kind != "teacher"}
    for family in args.arm_options:
        if family not in families:
            p.error(f"--arm-option {family}:...: {family!r} is not a hybrid arm family of this run (one of {', '.join(sorted(families))}); "
                    "an option holds for a whole family, every mask and transfer seed of it")
    if not args.retrieval_probes or not args.length_multiples or min(args.length_multiples) < 1 or 1 not in args.length_multiples:
        p.error("--retrieval-probes needs a probe and --length-multiples positive integers including 1")
    if not 0 < args.heldout_fraction < 1:
        p.error("--heldout-fraction must be in (0, 1)")
    args.lr = [float(x) for x in args.lr.split(",")]
    if args.steps is not None:
        args.steps = [int(x) for x in args.steps.split(",")]
        if len(args.steps) != 3 or min(args.steps) < 1:
            p.error("--steps takes three positive integers ALIGN,DISTILL,LONG")
    args.merge = [Path(x) for x in args.merge.split(",") if x.strip()] if args.merge else None
    if args.shard is not None:
        match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
        if not match or not int(match[1]) < int(match[2]):
            p.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N")
        if args.steps is None:
            p.error("--shard needs --steps (every shard must train the same budget; calibration would differ)")
        args.shard = (int(match[1]), int(match[2]))
    if len(args.lr) != 3 or args.batch < 2 or len(args.random_seeds) < 1:
        p.error("--lr takes three numbers, --batch at least 2, --random-seeds at least one seed")
    return args


def planned_arms(args) -> list[tuple[str, str]]:
    """(name, kind) of the arms this command runs: the plan (``headscope.arms.plan_arms``), ``--arms``, then ``--shard``."""
    arms = plan_arms(args.extra_masks, args.random_seeds, args.random_kind, args.transfer_seeds, args.seeded_arms,
                     {a.strip() for a in args.arms.split(",")} if args.arms else None)
    if args.shard is None:
        return arms
    index, count = args.shard
    hybrid = [arm for arm in arms if arm[1] != "teacher"]
    return [arm for arm in arms if arm[1] == "teacher" and index == 0] + hybrid[index::count]


def arm_options(args, arms: list[tuple[str, str]]) -> dict[str, dict]:
    """Per hybrid arm, its ``--arm-option`` switches (those of its family; the record's ``hybrid_options``)."""
    return {name: dict(args.arm_options.get(arm_family(name), {})) for name, kind in arms if kind != "teacher"}


def check_arm_options(args, fingerprint, extra: dict) -> None:
    """Raise HeadscopeError when an ``--arm-option`` changes nothing in its family's mask (``inert_switches``), for the
    families whose mask is known before the run; ``extra``: the ``--arm`` masks by name."""
    from headscope.arms import layerwise_arm_mask
    from headscope.heads import HeadscopeError
    from headscope.hybrid.builder import inert_switches
    from headscope.mask import load_mask

    for family, switches in args.arm_options.items():
        if family in extra:
            mask = extra[family]
        elif family in ("layerwise_3to1", "layerwise_7to1"):
            mask = layerwise_arm_mask(fingerprint, family.removeprefix("layerwise_").replace("to", ":"))
        elif family == "headwise_fused_7to1" and args.mask:
            mask = load_mask(args.mask, expect=fingerprint)
        else:  # a random family (or the fused arm scored during the run): its masks are made during the run, head-wise
            continue
        inert = inert_switches(mask, {**args.hybrid_options, **switches})
        inert = [name for name in inert if name in switches]
        if inert:
            raise HeadscopeError(f"--arm-option {family}:{inert[0]}={json.dumps(switches[inert[0]])} changes nothing in that arm's mask "
                                 "(whole FA layers stay the pretrained attention, RoPE kept; the FA switches act on head-wise FA "
                                 "heads, conv_size and init_seed on GDN heads)")
