"""Hybrid quality: head-wise 7:1 from headscope's fused mask vs random head-wise 7:1 and layer-wise 3:1 / 7:1.

Arms, in the order they run, so that the comparisons that matter most exist first if time runs out:

* ``teacher``: the original model, no training (RoPE extrapolated past its training length);
* ``headwise_fused_7to1``: the ``headscope.demo`` recipe: built-in probes (all seven, 256 tokens, 8 pairs,
  seed 0), ``direct`` scores (receivers) and ``path`` scores through each probe's top-3 receivers (senders),
  ``fuse`` with its defaults (z-scored |score|, mean with equal weight per capability), ``select_mask(ratio="7:1")``; or ``--mask FILE``;
* ``layerwise_3to1`` and ``layerwise_7to1``: whole FA layers. ``n = max(1, round(L b / (a + b)))`` layers,
  layer ``floor((k + 1) L / n) - 1`` for ``k < n`` (the last layer of each of ``n`` equal blocks). When
  ``a + b`` divides ``L`` this is ``headscope.mask.layerwise_mask`` (the Qwen3-Next layout, layers 3, 7,
  ...); the demo model's 6 layers get layers {2, 5} for 3:1 and {5} for 7:1 (``layerwise_mask("7:1")``
  has no FA layer in 6 layers, and "every 4th layer" would give 3:1 one layer, the same as 7:1);
* ``headwise_random_7to1_s<seed>``: ``headscope.mask.random_mask`` (same budget as the fused mask);
* ``headwise_randomkv_7to1_s<seed>`` (``--kv-matched`` or ``--random-kind kv``; ``plain,kv`` runs both):
  ``headscope.mask.kv_matched_random_mask`` of the fused mask: as many FA heads AND KV groups touched (the
  same KV cache), the fair baseline of a selection that concentrates its heads in few groups;
* ``--arm NAME=MASK.json`` (repeatable): any mask file, e.g. ``rope_aware=benchmarks/results/rope_aware_mask.json``.

Transfer seeds: ``--transfer-seeds 0,1,2`` repeats the ``--seeded-arms`` (default: the fused arm and the
``--arm`` arms; an arm or a family such as ``headwise_randomkv_7to1_s0``) once per seed, named
``<arm>_t<seed>``; the teacher is evaluated once. The transfer seed is the run's ``seed``: it seeds the
student's initialisation (``torch.manual_seed`` before ``build_student``) and the training data (the
corpus row streams of the demo corpus; the shuffle of the packed sequences of data files). The other
arms run with ``--seed``. Arms run in rounds so that every family has its first seeds if time runs out:
round ``k`` holds the ``k``-th transfer seed of the seeded arms and the ``k``-th mask seed of the random arms.

Every hybrid arm: ``headscope.transfer.build_student`` (``build_hybrid`` defaults: NoPE + log-scaled FA
heads with the output gate, MHA-style GDN heads with RoPE, scale-normalised fusion; all-FA layers of the
layer-wise arms stay the pretrained attention, RoPE kept), then ``TransferTrainer`` with the same three
stages and token budget: align (1x length, ``--batch`` rows), distill (1x, KL + 0.1 CE), long_context (2x
length, ``--batch // 2`` rows: equal tokens per step). Data: the demo corpus (``data.source:
demo_corpus``), or with ``--data FILE_OR_DIR`` (a real model: e.g. the .jsonl of
``benchmarks/real_transfer_data.py``) data files (``data.source: files``), hash-split with
``--heldout-fraction`` held out. The teacher is loaded once and shared; the corpus rows, a pure function
of (seed, stream, index), are generated once for all arms of a seed by ``--workers`` forked processes
(``RowStore``); files are read and split once (``FileRows``).

Budget: ``--steps A,D,L`` fixes the steps. Otherwise they are calibrated once: two short runs of the
three stages on the fused arm's hybrid (the first compiles kernels, the second is timed), then the steps
are split 1:2:1 over the stages so that all pending arms fit ``--minutes`` (total, everything
included), clamped to ``[--min-steps, --max-steps]``. The budget is stored in the results and reused on
resume, so every arm trains on the same tokens. An arm that would end after ``--deadline-minutes`` is
recorded as skipped (rerun the same command to resume it).

Evaluation (every arm, bf16 autocast on CUDA): argmax / beats-wrong accuracy of the
``--retrieval-probes`` (default needle_single, needle_multikey, kv_recall) and ``--reasoning-probes``
(default multihop, ioi, comparison) (``--pairs`` each, seed ``--eval-seed``) at ``--length-multiples``
(default 1, 2, 4, 8) x the teacher length (``--teacher-length``, default its max_position_embeddings);
held-out CE on ``--heldout-rows`` held-out rows (demo corpus: its held-out stream; files: held-out
documents, packed) at 1x and 2x; FA-head share; KV groups and KV-cache bytes per token (bf16); GDN
state bytes. The summary (``headscope.seeds``) gives per arm family the mean +- sd over mask seeds and
the transfer-seed sd, and checks the selection goals (selected 7:1 vs the KV-matched random mean at 1x
and 4x against twice the transfer sd; selected vs layer-wise 3:1 within 2 points at half the KV cache).

Outputs in ``--out`` (default ``$OUT`` or benchmarks/results; with ``--smoke`` ``WORK/results``), rewritten after every arm:
``hybrid_quality.json`` (settings, budget, one record per arm, ``summary``: families and goals),
``hybrid_quality.md`` (arm x metric tables, then the seed summary and the goals), ``hybrid_quality.html``
(accuracy vs length, plotly from its CDN), ``.png`` when kaleido is installed, ``hybrid_quality_mask.json``
(the fused mask), ``hybrid_quality_logs/<arm>.jsonl`` (training logs). A rerun resumes: arms marked done are kept, the others run again (``--fresh`` starts over).

    python benchmarks/hybrid_quality.py                 # GPU: ~8 minutes on one H100
    python benchmarks/hybrid_quality.py --smoke         # CPU: tiny run of everything, < 60 s
    python benchmarks/hybrid_quality.py --model /tmp/smol --data smol_transfer.jsonl --teacher-length 1024 \
        --length-multiples 1,2,4 --mask smollm2/mask.json --arm rope_aware=smollm2/rope_aware_mask.json \
        --kv-matched --random-seeds 0,1,2,3,4 --transfer-seeds 0,1 \
        --seeded-arms headwise_fused_7to1,headwise_randomkv_7to1_s0 \
        --retrieval-probes needle_single,needle_multikey,kv_recall,induction --reasoning-probes ioi
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if __name__ == "__main__" and not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # captured output: one line per phase instead of progress bars (read at tqdm import)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # not headscope.zoo.REPO_ROOT: on the GPU box headscope is installed elsewhere
DEMO_MODEL = REPO / "data" / "models" / "headscope-demo"
ARM_ORDER = ("teacher", "headwise_fused_7to1", "layerwise_3to1", "layerwise_7to1")
RANDOM_KINDS = {"plain": ("random", "headwise_random_7to1"), "kv": ("randomkv", "headwise_randomkv_7to1")}  # kind, name prefix
QUALITY_RETRIEVAL = ("needle_single", "needle_multikey", "kv_recall")  # headscope.quality's defaults (not imported before argparse)
QUALITY_REASONING = ("multihop", "ioi", "comparison")
STAGE_SHARES = (0.25, 0.5, 0.25)  # align, distill, long_context share of the steps
FALLBACK_STEPS = (100, 200, 100)  # used only when calibration fails
SMOKE_LENGTH = 48  # the shortest length every evaluated probe fits with the demo tokenizer
SMOKE_DEFAULTS = dict(teacher_length=SMOKE_LENGTH, batch=2, pairs=2, heldout_rows=2, eval_sequences=2, score_length=SMOKE_LENGTH,
                      score_pairs=2, receivers=2, min_steps=2, max_steps=2, minutes=1.0, deadline_minutes=30.0, workers=1)


# --- arguments, model ---------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="teacher directory (default: data/models/headscope-demo)")
    p.add_argument("--out", default=None, help="results directory (default: $OUT or benchmarks/results)")
    p.add_argument("--work", default=None, help="scratch directory for runs and caches (default: /tmp/headscope-hybrid-quality)")
    p.add_argument("--mask", default=None, help="fused mask file to use instead of scoring (headscope mask JSON)")
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--random-kind", default="plain", help="random arms: plain (same head budget), kv (KV-matched) or plain,kv")
    p.add_argument("--kv-matched", action="store_true", help="random arms are KV-matched to the fused mask (= --random-kind kv)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=MASK.json", help="an extra arm with this mask file (repeatable)")
    p.add_argument("--transfer-seeds", default=None, help="repeat the --seeded-arms once per transfer seed, e.g. 0,1,2")
    p.add_argument("--seeded-arms", default=None, help="arms or families repeated per transfer seed (default: the fused and --arm arms)")
    p.add_argument("--arms", default=None, help="comma-separated subset of arms (names or families) to run (default: all)")
    p.add_argument("--data", action="append", default=None, metavar="FILE_OR_DIR",
                   help="transfer data files (.jsonl/.txt/.bin, repeatable) instead of the demo corpus")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="with --data: share of documents held out (hash split)")
    p.add_argument("--retrieval-probes", default=",".join(QUALITY_RETRIEVAL), help="probes averaged as retrieval")
    p.add_argument("--reasoning-probes", default=",".join(QUALITY_REASONING), help="probes averaged as reasoning")
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
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out rows of the trainer's stage-end evaluation")
    p.add_argument("--teacher-length", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--score-length", type=int, default=256)
    p.add_argument("--score-pairs", type=int, default=8)
    p.add_argument("--receivers", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="row-generation processes (default: CPUs - 2 on CUDA, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="discard earlier results and runs")
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
    args.random_kind = ["kv"] if args.kv_matched else names(args.random_kind)
    args.retrieval_probes, args.reasoning_probes = names(args.retrieval_probes), names(args.reasoning_probes)
    args.length_multiples = ints(args.length_multiples)
    args.extra_masks = {}
    for spec in args.arm:
        name, _, path = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_[st]\d+$", name) or name in ARM_ORDER or not path:
            p.error(f"--arm {spec!r}: expected NAME=MASK.json, NAME of letters, digits and _ not ending in _s<k>/_t<k>, not a built-in arm")
        args.extra_masks[name] = path
    if args.seeded_arms is None:
        args.seeded_arms = ["headwise_fused_7to1", *args.extra_masks]
    else:
        args.seeded_arms = names(args.seeded_arms)
    if len(set(args.transfer_seeds)) != len(args.transfer_seeds) or "teacher" in args.seeded_arms:
        p.error("--transfer-seeds must be distinct seeds; the teacher is evaluated once (not a seeded arm)")
    if not set(args.random_kind) <= set(RANDOM_KINDS) or not args.random_kind:
        p.error(f"--random-kind takes {' or '.join(RANDOM_KINDS)} (comma-separated)")
    if not args.retrieval_probes or not args.length_multiples or min(args.length_multiples) < 1 or 1 not in args.length_multiples:
        p.error("--retrieval-probes needs a probe and --length-multiples positive integers including 1")
    if not 0 < args.heldout_fraction < 1:
        p.error("--heldout-fraction must be in (0, 1)")
    args.lr = [float(x) for x in args.lr.split(",")]
    if args.steps is not None:
        args.steps = [int(x) for x in args.steps.split(",")]
        if len(args.steps) != 3 or min(args.steps) < 1:
            p.error("--steps takes three positive integers ALIGN,DISTILL,LONG")
    if len(args.lr) != 3 or args.batch < 2 or len(args.random_seeds) < 1:
        p.error("--lr takes three numbers, --batch at least 2, --random-seeds at least one seed")
    return args


def build_tiny_model(path: Path, length: int) -> Path:
    """A random-weight Qwen3 with the demo model's head layout (6 layers, 8 heads, 4 KV heads), tiny width."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from headscope.probes import TASK_NAMES, sample_task_text, task_vocabulary
    from headscope.zoo.tokenizer import build_demo_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary(), model_max_length=length)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=16, max_position_embeddings=length, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def resolve_model(args) -> tuple[Path, str | None]:
    """The teacher directory and a note when it is a stand-in."""
    from headscope.heads import HeadscopeError

    if args.model is not None:
        return Path(args.model), None
    if (DEMO_MODEL / "model.safetensors").is_file() and not args.tiny_model:
        return DEMO_MODEL, None
    if not args.smoke:
        raise HeadscopeError(f"the demo model is missing ({DEMO_MODEL}); train it first or pass --model DIR")
    return build_tiny_model(args.work / "tiny-model", SMOKE_LENGTH), "tiny random-weight Qwen3 (6 layers x 8 heads, 4 KV heads): smoke numbers are noise"


# --- masks --------------------------------------------------------------------------------------
def evenly_spaced_layers(n_layers: int, ratio: str) -> list[int]:
    """``n = max(1, round(L b / (a + b)))`` FA layers for ``ratio`` = a:b, layer ``floor((k + 1) L / n) - 1``."""
    from headscope.mask import parse_ratio

    linear, full = parse_ratio(ratio)
    n_fa = max(1, (2 * n_layers * full + linear + full) // (2 * (linear + full)))  # round half up
    return [(k + 1) * n_layers // n_fa - 1 for k in range(n_fa)]


def layerwise_arm_mask(fingerprint, ratio: str):
    """Whole FA layers for ``ratio`` = linear:full: ``layerwise_mask`` when ``a + b`` divides the layer
    count, else ``evenly_spaced_layers`` (see the module docstring)."""
    from headscope.heads import HeadMask
    from headscope.mask import layerwise_mask, parse_ratio

    linear, full = parse_ratio(ratio)
    if fingerprint.n_layers % (linear + full) == 0:
        return layerwise_mask(fingerprint, ratio)
    n_layers = fingerprint.n_layers
    layers = evenly_spaced_layers(n_layers, ratio)
    is_full = torch.zeros(n_layers, dtype=torch.bool)
    is_full[layers] = True
    heads = is_full[:, None].expand(fingerprint.shape).clone()
    selection = {"method": "layerwise_count", "n_full": int(heads.sum()), "full_layers": layers}
    return HeadMask(heads, fingerprint, {"ratio": ratio, "selection": selection, "probes": [], "methods": [], "fusion": None})


def fused_mask(lm, args, work: Path):
    """The fused 7:1 mask of the ``headscope.demo`` recipe (score files cached in ``work/scores``), or ``--mask``."""
    from headscope.demo import REASONING_PROBES, RETRIEVAL_PROBES, score_probes
    from headscope.fusion import fuse
    from headscope.mask import load_mask, select_mask
    from headscope.probes import make_probe

    if args.mask:
        return load_mask(args.mask, expect=lm.fingerprint)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    probes = [make_probe(n, lm.tokenizer, length=args.score_length, n_pairs=args.score_pairs, seed=0) for n in RETRIEVAL_PROBES + REASONING_PROBES]
    scores = score_probes(lm, probes, work, args.receivers)
    return select_mask(fuse(scores), lm.fingerprint, ratio="7:1")


def arm_list(args) -> list[tuple[str, str]]:
    """(arm name, kind) in run order (rounds, see the module docstring), filtered by ``--arms``."""
    from headscope.heads import HeadscopeError
    from headscope.seeds import arm_family, mask_name

    base = [("teacher", "teacher", 0), ("headwise_fused_7to1", "fused", 0)] + [(name, "file", 0) for name in args.extra_masks]
    base += [("layerwise_3to1", "layerwise", 0), ("layerwise_7to1", "layerwise", 0)]
    base += [(f"{RANDOM_KINDS[k][1]}_s{seed}", RANDOM_KINDS[k][0], index) for index, seed in enumerate(args.random_seeds) for k in args.random_kind]
    known = {n for n, _, _ in base} | {arm_family(n) for n, _, _ in base}
    unknown = sorted(set(args.seeded_arms if args.transfer_seeds else []) - known)
    if unknown:
        raise HeadscopeError(f"--seeded-arms: unknown arms {unknown}; known: {', '.join(sorted(known - {'teacher'}))}")
    arms = []
    for name, kind, round_ in base:
        if args.transfer_seeds and (name in args.seeded_arms or arm_family(name) in args.seeded_arms):
            arms += [(f"{name}_t{seed}", kind, max(round_, index)) for index, seed in enumerate(args.transfer_seeds)]
        else:
            arms.append((name, kind, round_))
    arms.sort(key=lambda arm: arm[2])  # stable: round by round, in the base order inside a round
    if args.arms:
        wanted = {a.strip() for a in args.arms.split(",")}
        labels = {n: {n, mask_name(n), arm_family(n)} for n, _, _ in arms}
        unknown = sorted(wanted - set().union(*labels.values()))
        if unknown:
            raise HeadscopeError(f"unknown arms {unknown}; known: {', '.join(n for n, _, _ in arms)}")
        arms = [a for a in arms if labels[a[0]] & wanted]
    return [(name, kind) for name, kind, _ in arms]


def arm_mask(name: str, kind: str, fingerprint, fused, extra: dict):
    """The mask of one hybrid arm (``fused``: the fused mask; ``extra``: the ``--arm`` masks by name)."""
    from headscope.heads import HeadscopeError
    from headscope.mask import kv_matched_random_mask, random_mask
    from headscope.seeds import arm_family, mask_name, mask_seed

    if kind in ("fused", "randomkv") and fused is None:
        raise HeadscopeError("the fused mask is missing (its computation failed)")
    if kind == "fused":
        return fused
    if kind == "file":
        return extra[mask_name(name)]
    if kind == "random":
        return random_mask(fingerprint, ratio="7:1", seed=mask_seed(name))
    if kind == "randomkv":
        return kv_matched_random_mask(fused, seed=mask_seed(name))
    return layerwise_arm_mask(fingerprint, arm_family(name).split("_")[1].replace("to", ":"))


def arm_seed(name: str, args) -> int:
    """The transfer seed of an arm: its ``_t<seed>``, else ``--seed``."""
    from headscope.seeds import transfer_seed

    seed = transfer_seed(name)
    return args.seed if seed is None else seed


# --- training -----------------------------------------------------------------------------------
class Bench:
    """What every arm shares: arguments, teacher, device, corpus rows, probe grid, held-out rows, results."""

    def __init__(self, args, model_dir: Path, lm, env, rows, base_length: int, started: float) -> None:
        self.args, self.model_dir, self.lm, self.env, self.rows = args, model_dir, lm, env, rows
        self.base = base_length
        self.lengths = [base_length * k for k in args.length_multiples]
        self.progress = sys.stderr.isatty()
        self.started = started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stages(self, steps) -> list[dict]:
        """The three stage configs for ``steps`` = (align, distill, long_context)."""
        a = self.args

        def stage(name, n, lr, rows, seq_len, **extra):
            return {"name": name, "kind": name, "steps": int(n), "lr": lr, "batch_size": rows, "seq_len": seq_len, "warmup": int(n) // 10, **extra}

        return [stage("align", steps[0], a.lr[0], a.batch, self.base),
                stage("distill", steps[1], a.lr[1], a.batch, self.base, ce_weight=0.1, weight_decay=0.01),
                stage("long_context", steps[2], a.lr[2], a.batch // 2, 2 * self.base, weight_decay=0.01)]

    def row_needs(self, steps) -> list[tuple[str, int, int, int]]:
        """Rows a run of ``steps`` reads: training rows per stage and the held-out evaluation rows."""
        needs = []
        for index, stage in enumerate(self.stages(steps)):
            needs.append(("train", index, stage["seq_len"], stage["steps"] * stage["batch_size"]))
            needs.append(("heldout", index, stage["seq_len"], self.args.eval_sequences))
        return needs

    def data_config(self) -> dict:
        """The run config's data section: the demo corpus or the ``--data`` files."""
        a = self.args
        if not a.data:
            return {"source": "demo_corpus", "eval_sequences": a.eval_sequences}
        return {"source": "files", "paths": [str(Path(p).resolve()) for p in a.data], "heldout_fraction": a.heldout_fraction,
                "eval_sequences": a.eval_sequences}

    def train(self, name: str, mask, steps, seed: int, on_step=None):
        """``build_student`` + ``TransferTrainer`` on ``mask`` with transfer seed ``seed``; returns (student, log records, stage configs)."""
        from headscope.mask import save_mask
        from headscope.transfer import build_student, config_from_dict
        from headscope.transfer.trainer import TransferTrainer

        run_dir = self.args.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        save_mask(mask, run_dir / "mask.json")
        config = config_from_dict({
            "model": str(self.model_dir), "hybrid": {"mask": str(run_dir / "mask.json")},
            "data": self.data_config(),
            "stages": self.stages(steps), "seed": seed, "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
            "keep_checkpoints": 1, "device": self.env.device.type, "precision": "auto", "progress": self.progress,
        })
        torch.manual_seed(seed)
        student = build_student(self.lm.model, mask, {}).to(self.env.device)
        trainer = TransferTrainer(config, run_dir, self.env, self.lm.model, student, self.rows.source(seed), on_step=on_step)
        trainer.run()
        records = trainer.log.records()
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return student, records, config


def stage_summaries(records: list[dict], config) -> list[dict]:
    """Per stage: steps, tokens, last training loss (and parts), last held-out evaluation."""
    out = []
    for index, stage in enumerate(config.stages):
        train = [r for r in records if r["stage_index"] == index and r["event"] == "train"]
        evals = [r for r in records if r["stage_index"] == index and r["event"] == "eval"]
        last = train[-1] if train else {}
        out.append({"name": stage.name, "steps": last.get("step", 0), "tokens": last.get("tokens", 0), "lr": stage.lr,
                    "batch_size": stage.batch_size, "seq_len": stage.seq_len, "final_train_loss": last.get("loss"),
                    "heldout": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("heldout_") or k == "teacher_ce"}})
    return out


def sync(env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()


def calibrate(bench: Bench, mask) -> dict:
    """Step time per stage and per-arm fixed cost, from two short runs (compile, then timed)."""
    warm, timed = (1, 2) if bench.args.smoke else (2, 6)
    fill_seconds, fill_tokens = bench.rows.fill(bench.row_needs((timed + 1,) * 3), seed=bench.args.seed)
    stamps: dict[tuple[int, int], float] = {}

    def on_step(info):
        sync(bench.env)
        stamps[(info.stage_index, info.step)] = time.perf_counter()

    started = time.perf_counter()
    bench.train("calibration_warmup", mask, (warm,) * 3, bench.args.seed)
    warm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bench.train("calibration_timed", mask, (timed + 1,) * 3, bench.args.seed, on_step=on_step)
    wall = time.perf_counter() - started
    step_seconds = [statistics.median(stamps[(s, k + 1)] - stamps[(s, k)] for k in range(1, timed + 1)) for s in range(3)]
    shutil.rmtree(bench.args.work / "runs", ignore_errors=True)
    return {
        "warmup_run_seconds": round(warm_seconds, 2), "timed_run_seconds": round(wall, 2),
        "step_seconds": [round(t, 4) for t in step_seconds],
        "overhead_seconds_per_arm": round(max(0.0, wall - sum((timed + 1) * t for t in step_seconds)), 2),
        "row_seconds_1x": fill_seconds * max(bench.args.workers, 1) * bench.base / fill_tokens if fill_tokens else 0.0,
    }


def plan_budget(bench: Bench, calibration: dict, n_arms: int, eval_estimate: float, n_streams: int = 1) -> dict:
    """Steps per stage so that ``n_arms`` arms fit what is left of ``--minutes`` (clamped to the step bounds);
    the corpus rows of each of ``n_streams`` transfer seeds are generated once for the arms of that seed."""
    a = bench.args
    workers = max(a.workers, 1)
    stages = bench.stages((1, 1, 1))
    per_step = [t + stage["batch_size"] * stage["seq_len"] / bench.base * calibration["row_seconds_1x"] / workers * n_streams / max(n_arms, 1)
                for t, stage in zip(calibration["step_seconds"], stages)]
    reserve = 10.0 + 0.05 * a.minutes * 60
    available = a.minutes * 60 - bench.elapsed() - reserve - n_arms * (calibration["overhead_seconds_per_arm"] + eval_estimate)
    per_arm = max(available, 0.0) / max(n_arms, 1)
    unit = per_arm / sum(share * t for share, t in zip(STAGE_SHARES, per_step))
    steps = [min(a.max_steps, max(a.min_steps, int(unit * share))) for share in STAGE_SHARES]
    return {"steps": steps, "how": f"calibrated: {n_arms} arms in what was left of {a.minutes:g} minutes at {bench.elapsed():.0f} s",
            "per_arm_training_seconds_planned": round(per_arm, 1), "eval_seconds_estimate": round(eval_estimate, 1),
            "clamped": steps != [int(unit * share) for share in STAGE_SHARES], "calibration": calibration}


def describe_budget(bench: Bench, budget: dict) -> str:
    stages = bench.stages(budget["steps"])
    tokens = sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in stages)
    parts = ", ".join(f"{s['name']} {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens" for s in stages)
    return f"training budget per hybrid arm: {parts} = {tokens:,} tokens ({budget['how']})"


# --- evaluation and results ---------------------------------------------------------------------
def evaluate(bench: Bench, model, mask, grid, heldout: dict[int, torch.Tensor]) -> dict:
    """Accuracy grid, held-out CE, FA share and cache sizes of one model (``mask`` None: the teacher)."""
    from headscope.quality import grid_accuracy, heldout_loss, kv_cache_bytes_per_token, recurrent_state_bytes

    fp = bench.lm.fingerprint
    started = time.perf_counter()
    record = {
        "n_full": fp.n_layers * fp.n_heads if mask is None else mask.n_full,
        "fa_head_share": 1.0 if mask is None else mask.head_fraction,
        "kv_fraction": 1.0 if mask is None else mask.kv_fraction,
        "kv_groups": fp.n_layers * fp.n_kv_heads if mask is None else int(mask.kv_groups_full().sum()),
        "kv_bytes_per_token": kv_cache_bytes_per_token(fp, mask),
        "gdn_state_bytes_per_sequence": recurrent_state_bytes(fp, mask),
        "heldout_loss": {str(length): heldout_loss(model, rows) for length, rows in heldout.items()},
        "accuracy": grid_accuracy(model, grid, progress=bench.progress),
    }
    sync(bench.env)
    record["eval_seconds"] = round(time.perf_counter() - started, 2)
    return record


class Results:
    """The results file: settings (checked on resume), budget, fused mask and one record per arm.

    A copy is kept in the work directory too, so a rerun resumes even when ``--out`` starts empty (the
    device tool's ``$OUT``); the file in ``--out`` wins when both exist.
    """

    def __init__(self, out: Path, work: Path, settings: dict, arms: list[tuple[str, str]], fresh: bool) -> None:
        from headscope.heads import HeadscopeError, read_json

        self.out, self.path, self.copy = out, out / "hybrid_quality.json", work / "hybrid_quality.json"
        source = next((p for p in (self.path, self.copy) if p.is_file()), None) if not fresh else None
        data = read_json(source, "results") if source is not None else None
        if data is not None and data.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(data.get("settings", {})) if settings.get(k) != data["settings"].get(k))
            raise HeadscopeError(f"{source} was made with other settings ({', '.join(changed)}); pass --fresh or another --out")
        if source is not None:
            print(f"resuming from {source}", flush=True)
        self.data = data or {"schema": "headscope.hybrid_quality/1", "settings": settings, "budget": None, "fused_mask": None, "arms": {}, "notes": []}
        for name, kind in arms:
            self.data["arms"].setdefault(name, {"kind": kind, "status": "pending"})

    @property
    def arms(self) -> dict:
        return self.data["arms"]

    def write(self) -> None:
        """JSON (with the seed summary and goal checks), markdown tables and figure (png too when kaleido is
        installed), all atomically."""
        from headscope.heads import write_json_atomic, write_text_atomic
        from headscope.quality import accuracy_figure, results_markdown
        from headscope.seeds import family_stats, goal_checks, seeds_markdown

        self.out.mkdir(parents=True, exist_ok=True)
        families = family_stats(self.data)
        self.data["summary"] = {"families": families, "goals": goal_checks(self.data, families)}
        write_json_atomic(self.path, self.data)
        write_json_atomic(self.copy, self.data)
        try:
            table = results_markdown(self.data) + "\n" + seeds_markdown(self.data, families, self.data["summary"]["goals"])
            write_text_atomic(self.out / "hybrid_quality.md", table)
            figure = accuracy_figure(self.data)
            write_text_atomic(self.out / "hybrid_quality.html", figure.to_html(include_plotlyjs="cdn", full_html=True))
        except Exception as error:  # noqa: BLE001 - the JSON is written; the tables can be rebuilt from it
            print(f"writing the table/figure failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return
        try:
            import kaleido  # noqa: F401
        except ImportError:
            return
        try:
            figure.write_image(str(self.out / "hybrid_quality.png"), width=figure.layout.width, height=figure.layout.height)
        except Exception as error:  # noqa: BLE001 - kaleido needs a browser; the html has the same figure
            print(f"png not written: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def data_settings(args) -> dict:
    """What the training data is: the demo corpus, or the ``--data`` paths with a digest of their bytes."""
    import hashlib

    if not args.data:
        return {"source": "demo_corpus"}
    digest = hashlib.sha256()
    for entry in args.data:
        path = Path(entry)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.read_bytes())
    return {"source": "files", "paths": list(args.data), "sha256": digest.hexdigest()[:16], "heldout_fraction": args.heldout_fraction}


def settings_of(args, model_dir: Path, fingerprint, base: int) -> dict:
    return {
        "model": str(model_dir), "model_name": model_dir.name, "fingerprint": fingerprint.to_dict(), "teacher_length": base,
        "lengths": [base * k for k in args.length_multiples], "probes": list(dict.fromkeys(args.retrieval_probes + args.reasoning_probes)),
        "retrieval_probes": args.retrieval_probes, "reasoning_probes": args.reasoning_probes, "data": data_settings(args),
        "pairs": args.pairs, "eval_seed": args.eval_seed, "heldout_rows": args.heldout_rows, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "smoke": args.smoke, "fixed_steps": args.steps, "mask_file": args.mask, "eval_sequences": args.eval_sequences,
        "fused_recipe": {"length": args.score_length, "pairs": args.score_pairs, "receivers": args.receivers, "ratio": "7:1"},
    }


def note(results: Results, text: str) -> None:
    print(text, flush=True)
    if text not in results.data["notes"]:
        results.data["notes"].append(text)


def failure(error: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


def release(env) -> None:
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


# --- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Set up (model, corpus rows, device, results) and run the arms; returns the exit code."""
    started = time.perf_counter()
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from headscope.mask import load_mask
    from headscope.models import load_model
    from headscope.transfer import DataConfig
    from headscope.distributed import init_distributed
    from headscope.transfer.rowstore import FileRows, RowStore

    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, stand_in = resolve_model(args)
    if args.workers is None:
        args.workers = max(1, min(16, (os.cpu_count() or 2) - 2))  # no CUDA query: the pool forks first
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if args.data:
        rows = FileRows(DataConfig(source="files", paths=list(args.data), heldout_fraction=args.heldout_fraction), tokenizer,
                        vocab_size=len(tokenizer))
    else:
        rows = RowStore(DataConfig(source="demo_corpus"), args.seed, tokenizer, args.workers)  # forks before CUDA starts
    try:
        env = init_distributed("cpu" if args.smoke else "auto")
        lm = load_model(model_dir, device=env.device)
        lm.model.requires_grad_(False)
        base = args.teacher_length or lm.max_context
        bench = Bench(args, model_dir, lm, env, rows, base, started)
        arms = arm_list(args)
        extra = {name: load_mask(path, expect=lm.fingerprint) for name, path in args.extra_masks.items()}
        results = Results(args.out, args.work, settings_of(args, model_dir, lm.fingerprint, base), arms, args.fresh)
        return run_arms(bench, results, arms, tokenizer, stand_in, extra)
    finally:
        rows.close()


def heldout_rows(bench: Bench, results: Results, length: int) -> torch.Tensor:
    """The first ``--heldout-rows`` held-out rows at ``length`` (fewer, with a note, when the split holds fewer)."""
    from headscope.heads import HeadscopeError

    stream = bench.rows.stream("heldout", 0, length)
    n = min(bench.args.heldout_rows, len(stream))
    if n == 0:
        raise HeadscopeError(f"the held-out documents hold no sequence of {length} tokens; raise --heldout-fraction or give more --data")
    if n < bench.args.heldout_rows:
        note(results, f"held-out CE at {length} tokens over {n} rows (the held-out documents hold no more)")
    return torch.stack([stream[i] for i in range(n)])


def run_arms(bench: Bench, results: Results, arms: list[tuple[str, str]], tokenizer, stand_in: str | None, extra: dict) -> int:
    """Teacher evaluation, fused mask, budget, then every pending hybrid arm; results written after each."""
    from headscope.mask import save_mask
    from headscope.maskfile import mask_from_dict, mask_to_dict
    from headscope.quality import probe_grid

    args, lm, env, base = bench.args, bench.lm, bench.env, bench.base
    fp = lm.fingerprint
    print(f"teacher {bench.model_dir} ({fp.n_layers} layers x {fp.n_heads} heads, {fp.n_kv_heads} KV heads, head_dim {fp.head_dim}) "
          f"on {env.device}; lengths {bench.lengths}; arms {', '.join(a for a, _ in arms)}", flush=True)
    if stand_in:
        note(results, f"model: {stand_in}")
    if lm.max_context is not None and max(bench.lengths) > lm.max_context:
        note(results, f"the teacher was trained at {lm.max_context} tokens (max_position_embeddings); beyond it its RoPE extrapolates")
    note(results, "layer-wise arms: whole FA layers keep the pretrained attention (RoPE); head-wise FA heads are NoPE with log scaling")
    if importlib.util.find_spec("kaleido") is None:
        note(results, "hybrid_quality.png not written: kaleido is not installed (the .html has the figure)")
    grid = probe_grid(tokenizer, results.data["settings"]["probes"], bench.lengths, args.pairs, args.eval_seed)
    bench.rows.fill([("heldout", 0, length, args.heldout_rows) for length in (base, 2 * base)])
    heldout = {length: heldout_rows(bench, results, length) for length in (base, 2 * base)}
    print(f"[{bench.elapsed():6.0f}s] probes and held-out rows ready", flush=True)

    if "teacher" in results.arms and results.arms["teacher"]["status"] != "done":
        try:
            results.arms["teacher"] = {"kind": "teacher", "status": "done", "mask": None, **evaluate(bench, lm.model, None, grid, heldout)}
        except Exception as error:  # noqa: BLE001 - recorded, the other arms go on
            results.arms["teacher"] = {"kind": "teacher", **failure(error)}
        results.write()
        print(f"[{bench.elapsed():6.0f}s] teacher: {results.arms['teacher']['status']}", flush=True)
    teacher_eval = results.arms.get("teacher", {}).get("eval_seconds", 10.0)

    hybrid = [(name, kind) for name, kind in arms if kind != "teacher" and results.arms[name]["status"] != "done"]
    fused = None
    if any(kind in ("fused", "randomkv") for _, kind in hybrid) or (hybrid and results.data["budget"] is None):
        try:
            if results.data["fused_mask"] is None:
                results.data["fused_mask"] = mask_to_dict(fused_mask(lm, args, args.work))
                results.write()
            fused = mask_from_dict(results.data["fused_mask"], "fused mask", expect=fp)
            save_mask(fused, args.out / "hybrid_quality_mask.json")
            print(f"[{bench.elapsed():6.0f}s] fused 7:1 mask: {' '.join(str(h) for h in fused.heads())}", flush=True)
        except Exception as error:  # noqa: BLE001
            for name, kind in hybrid:
                if kind in ("fused", "randomkv"):
                    results.arms[name].update(failure(error), kind=kind)
            results.write()
            print(f"fused mask failed: {error}", file=sys.stderr, flush=True)
    hybrid = [(name, kind) for name, kind in hybrid if not (kind in ("fused", "randomkv") and fused is None)]
    if not hybrid:
        results.write()
        print((results.out / "hybrid_quality.md").read_text())
        return 0

    if results.data["budget"] is None:
        if args.steps is not None:
            results.data["budget"] = {"steps": list(args.steps), "how": "fixed by --steps", "calibration": None}
        else:
            calibration_mask = fused if fused is not None else arm_mask("headwise_random_7to1_s0", "random", fp, None, extra)
            try:
                calibration = calibrate(bench, calibration_mask)
                streams = len({arm_seed(name, args) for name, _ in hybrid})
                results.data["budget"] = plan_budget(bench, calibration, len(hybrid), 1.5 * teacher_eval + 2.0, streams)
                print(f"[{bench.elapsed():6.0f}s] calibrated: {calibration}", flush=True)
            except Exception as error:  # noqa: BLE001 - the arms still run (and record their own failures)
                steps = [max(args.min_steps, min(args.max_steps, n)) for n in FALLBACK_STEPS]
                results.data["budget"] = {"steps": steps, "how": f"calibration failed ({type(error).__name__}: {error}); fixed fallback",
                                          "calibration": None, "calibration_traceback": traceback.format_exc()[-3000:]}
                print(f"calibration failed: {error}", file=sys.stderr, flush=True)
        results.data["budget"]["description"] = describe_budget(bench, results.data["budget"])
        results.write()
    budget = results.data["budget"]
    note(results, budget["description"])
    try:
        fill_seconds = sum(bench.rows.fill(bench.row_needs(budget["steps"]), seed=seed)[0] for seed in sorted({arm_seed(n, args) for n, _ in hybrid}))
        print(f"[{bench.elapsed():6.0f}s] corpus rows ready ({fill_seconds:.1f} s, {args.workers} workers)", flush=True)
    except Exception as error:  # noqa: BLE001 - rows are then generated on demand during training
        note(results, f"parallel corpus generation failed ({type(error).__name__}: {error}); rows generated during training")
    calibration = budget.get("calibration") or {}
    projected = (sum(s * t for s, t in zip(budget["steps"], calibration.get("step_seconds", [0.0] * 3)))
                 + calibration.get("overhead_seconds_per_arm", 0.0) + 1.5 * teacher_eval)

    for name, kind in hybrid:
        if bench.elapsed() + projected > args.deadline_minutes * 60:
            results.arms[name] = {"kind": kind, "status": "skipped_out_of_time",
                                  "error": f"would end after --deadline-minutes {args.deadline_minutes:g} (projected {projected:.0f} s); rerun the same command to resume"}
            results.write()
            print(f"[{bench.elapsed():6.0f}s] {name}: skipped (out of time)", flush=True)
            continue
        started = time.perf_counter()
        student = None
        try:
            mask = arm_mask(name, kind, fp, fused, extra)
            student, records, config = bench.train(name, mask, budget["steps"], arm_seed(name, args))
            train_seconds = time.perf_counter() - started
            logs = args.out / "hybrid_quality_logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            record = {"kind": kind, "status": "done", "transfer_seed": arm_seed(name, args), "mask": mask_to_dict(mask),
                      **evaluate(bench, student, mask, grid, heldout),
                      "training": {"stages": stage_summaries(records, config), "seconds": round(train_seconds, 2)}}
            results.arms[name] = record
        except Exception as error:  # noqa: BLE001 - recorded, the other arms go on
            results.arms[name] = {"kind": kind, **failure(error)}
        finally:
            student = None
            release(env)
        projected = max(projected, time.perf_counter() - started)
        results.write()
        arm = results.arms[name]
        summary = arm.get("error", "") if arm["status"] != "done" else (
            f"held-out CE {arm['heldout_loss'][str(base)]:.3f}, KV {arm['kv_bytes_per_token']} B/token, "
            f"{time.perf_counter() - started:.0f} s")
        print(f"[{bench.elapsed():6.0f}s] {name}: {arm['status']} {summary}", flush=True)
    results.data["elapsed_seconds_last_run"] = round(bench.elapsed(), 1)
    results.write()
    print((results.out / "hybrid_quality.md").read_text())
    return 0


if __name__ == "__main__":
    from headscope.heads import HeadscopeError

    if "--smoke" in sys.argv:
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU are far faster single-threaded
    try:
        raise SystemExit(main())
    except HeadscopeError as error:
        print(f"headscope: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
