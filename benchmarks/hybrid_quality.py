"""Hybrid quality: head-wise 7:1 from headscope's fused mask vs random head-wise 7:1 and layer-wise 3:1 / 7:1.

Arms, in the order they run, so that the comparisons that matter most exist first if time runs out:

* ``teacher``: the original model, no training (RoPE extrapolated past its training length);
* ``headwise_fused_7to1``: the ``headscope.demo`` recipe without its RoPE-aware step: built-in probes (all seven, 256 tokens, 8 pairs,
  seed 0), ``direct`` scores (receivers) and ``path`` scores through each probe's top-3 receivers (senders),
  ``fuse`` with its defaults (z-scored |score|, mean with equal weight per capability), ``select_mask(ratio="7:1")``; or ``--mask FILE``;
* ``layerwise_3to1`` and ``layerwise_7to1``: whole FA layers (``headscope.arms.layerwise_arm_mask``: the
  Qwen3-Next layout, layers 3, 7, ..., when ``a + b`` divides the depth; else ``n = max(1, round(L b / (a + b)))``
  evenly spaced layers: the demo model's 6 layers get layers {2, 5} for 3:1 and {5} for 7:1);
* ``headwise_random_7to1_s<seed>``: ``headscope.mask.random_mask`` (same budget as the fused mask);
* ``headwise_randomkv_7to1_s<seed>`` (``--kv-matched`` or ``--random-kind kv``; ``plain,kv`` runs both):
  ``headscope.mask.kv_matched_random_mask`` of the fused mask: as many FA heads AND KV groups touched (the
  same KV cache), the fair baseline of a selection that concentrates its heads in few groups;
* ``headwise_randomlayer_7to1_s<seed>`` (``--layer-matched`` or ``--random-kind layer``; ``kv,layer`` runs both):
  ``headscope.mask.layer_matched_random_mask`` of the fused mask: the same FA heads and KV groups in every
  layer, drawn within the layer: "these heads" against "these layers";
* ``--arm NAME=MASK.json`` (repeatable): any mask file, e.g. ``rope_aware=benchmarks/results/rope_aware_mask.json``
  (with ``--arm-option NAME:KEY=VALUE``: built with other ``build_hybrid`` switches, see Switches below).

Transfer seeds: ``--transfer-seeds 0,1,2`` repeats the ``--seeded-arms`` (default: the fused arm and the
``--arm`` arms; an arm or a family such as ``headwise_randomkv_7to1_s0``) once per seed, named
``<arm>_t<seed>``; the teacher is evaluated once. The transfer seed is the run's ``seed``: it seeds the
student's initialisation (``torch.manual_seed`` before ``build_student``) and the training data (the
corpus row streams of the demo corpus; the shuffle of the packed sequences of data files). The other
arms run with ``--seed``. Arms run in rounds so that every family has its first seeds if time runs out:
round ``k`` holds the ``k``-th transfer seed of the seeded arms and the ``k``-th mask seed of the random arms.

Every hybrid arm: ``headscope.transfer.build_student`` (``build_hybrid`` defaults: NoPE + log-scaled FA
heads with the output gate, MHA-style GDN heads with RoPE, scale-normalised fusion; all-FA layers of the
layer-wise arms stay the pretrained attention, RoPE kept; every fused head starts at its
pretrained output RMS, measured on the arm's first ``--calibrate-gamma`` training rows), then ``TransferTrainer`` with the same three
stages and token budget: align (1x length, ``--batch`` rows), distill (1x, KL + 0.1 CE), long_context (2x
length, ``--batch // 2`` rows: equal tokens per step). Data: the demo corpus (``data.source:
demo_corpus``), or with ``--data FILE_OR_DIR`` (a real model: e.g. the .jsonl of
``benchmarks/real_transfer_data.py``) data files (``data.source: files``), hash-split with
``--heldout-fraction`` held out. The teacher is loaded once and shared; the corpus rows, a pure function
of (seed, stream, index), are generated once for all arms of a seed by ``--workers`` forked processes
(``RowStore``); files are read and split once (``FileRows``).

Switches (``headscope.hybrid.builder.SWITCHES``, JSON values): ``--hybrid-option KEY=VALUE`` changes one for
every hybrid arm and is part of the settings (a run with another one does not resume); ``--arm-option
FAMILY:KEY=VALUE`` changes one for one arm family (an ``--arm`` name or a built-in family such as
``headwise_fused_7to1``, ``layerwise_3to1``, ``headwise_randomkv_7to1``), every mask and transfer seed of it,
over ``--hybrid-option`` (the arm's wins). A family, not one seed, so that the seed statistics pool like runs;
compare switched and plain on one mask with a second name: ``--arm kv_aware_rope=kv_aware_mask.json
--arm-option kv_aware_rope:fa_rope=true`` beside ``--arm kv_aware=kv_aware_mask.json`` (``fa_rope=true``: the
head-wise FA heads keep RoPE; the log scaling is 1 below ``floor_scale`` positions). Arm options live in the
arm's record (``hybrid_options``), not in the settings: adding such an arm to existing results resumes them,
like adding an ``--arm``. A done run of a planned arm's family (resumed or not: the seed summary pools them) whose
recorded options differ from the command's is an error (the options, a new name, ``--fresh`` or another ``--out``);
``--merge`` refuses one arm, or one family, done with different options. The table's ``options`` column shows each arm's switches beyond the defaults.

A second transfer seed for an arm first run unseeded (``layerwise_scored``, recorded with transfer seed
``--seed``, 0): ``--seeded-arms ...,layerwise_scored --transfer-seeds 0,1 --arms layerwise_scored_t1``; the
old record counts as the mask's seed-0 run (the seed summary reads its recorded ``transfer_seed``). Planning
``layerwise_scored_t0`` beside it would train the same run again: an error.

``--dry-run`` loads the teacher, runs the resume checks (settings, mask files, options) and
prints every arm this command (and ``--shard``) would keep or run with its switches; the results stay untouched.

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
and 4x against twice the transfer sd, and the same against the layer-matched random mean when it ran;
selected vs layer-wise 3:1 within 2 points at half the KV cache).

Held-out CE per document kind (``--heldout-kinds sampled,essay,tasks``, files only): the same CE, rows and
packing on the held-out documents of each listed kind alone (the .jsonl ``kind``), stored per arm as
``heldout_loss_by_kind`` and shown as extra columns. In ``real_transfer_data.py``'s data ``sampled`` is the
teacher's own samples, while ``essay`` and ``tasks`` are synthetic text that the students learn during
transfer and the teacher never saw: the all-documents CE of a student falls below the teacher's for that
reason, and only the ``sampled`` CE compares a student with the teacher. Held-out CE on evaluation-only
text (``--eval-data FILE[,FILE...]``, .txt / .jsonl, never trained on; with or without ``--data``): the same
CE on the first ``--heldout-rows`` rows of each file packed in order, stored as ``eval:<file stem>`` in
``heldout_loss_by_kind``: real text that neither the teacher's samples nor the synthetic data stand for
(``benchmarks/python_docs_text.py`` writes one from the Python documentation, offline).

Outputs in ``--out`` (default ``$OUT`` or benchmarks/results; with ``--smoke`` ``WORK/results``), rewritten after every arm:
``hybrid_quality.json`` (settings, budget, one record per arm, ``summary``: families and goals),
``hybrid_quality.md`` (arm x metric tables, then the seed summary and the goals), ``hybrid_quality.html``
(accuracy vs length, plotly from its CDN), ``.png`` when kaleido is installed, ``hybrid_quality_mask.json``
(the fused mask), ``hybrid_quality_logs/<arm>.jsonl`` (training logs). A rerun resumes: arms marked done are kept, the others run again (``--fresh`` starts over).

Sharing one GPU: a 135M-parameter model does not fill an H200, so ``--shard I/N`` (with fixed ``--steps``)
runs every N-th hybrid arm from the I-th (shard 0 also the teacher), N processes side by side, each with its
own ``--out`` and ``--work``; ``--merge OUT0,OUT1,... --out OUT`` then checks that their settings and
budgets are identical and writes the combined results (tables, seed summary, goals) into ``OUT``.

Code: arm names, rounds and masks in ``headscope.arms``; the evaluation of a model in
``headscope.quality.evaluate_quality``; the command line in ``hybrid_quality_args.py``, training and budget in
``hybrid_quality_training.py`` and the results file in ``hybrid_quality_results.py`` (helper modules next to this script).

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
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if __name__ == "__main__" and not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # captured output: one line per phase instead of progress bars (read at tqdm import)
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # the helper modules next to this script, also when it is loaded by path (the tests)

import torch  # noqa: E402

from headscope.arms import MATCHED_KINDS, arm_mask, arm_seed, fused_mask  # noqa: E402
from headscope.cli import script_main  # noqa: E402
from headscope.heads import HeadscopeError  # noqa: E402
from headscope.quality import evaluate_quality, format_switches, probe_grid  # noqa: E402
from headscope.transfer.data import text_rows  # noqa: E402
import hybrid_quality_args  # noqa: E402
from hybrid_quality_args import REPO, SMOKE_LENGTH, arm_options, check_arm_options, planned_arms  # noqa: E402
from hybrid_quality_results import Results, failure, merge_results, settings_of  # noqa: E402
from hybrid_quality_training import Bench, build_tiny_model, decide_budget, projected_arm_seconds, stage_records  # noqa: E402

DEMO_MODEL = REPO / "data" / "models" / "headscope-demo"


# --- arguments, model ---------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``hybrid_quality_args.parse_args``), with this script's summary as its description."""
    return hybrid_quality_args.parse_args(argv, __doc__.split("\n\n")[0])


def resolve_model(args, tiny: Path | None = None) -> tuple[Path, str | None]:
    """The teacher directory and a note when it is a stand-in (built in ``tiny``, default ``--work``/tiny-model)."""
    if args.model is not None:
        return Path(args.model), None
    if (DEMO_MODEL / "model.safetensors").is_file() and not args.tiny_model:
        return DEMO_MODEL, None
    if not args.smoke:
        raise HeadscopeError(f"the demo model is missing ({DEMO_MODEL}); train it first or pass --model DIR")
    return build_tiny_model(tiny or args.work / "tiny-model", SMOKE_LENGTH), "tiny random-weight Qwen3 (6 layers x 8 heads, 4 KV heads): smoke numbers are noise"


# --- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Set up (model, corpus rows, device, results) and run the arms; returns the exit code."""
    started = time.perf_counter()
    args = parse_args(argv)
    if args.merge:
        merged = merge_results(args.merge, args.out, args.work)
        print((args.out / "hybrid_quality.md").read_text())
        print(f"merged {len(args.merge)} result files: {merged} arms done")
        return 0
    from transformers import AutoTokenizer

    from headscope.distributed import init_distributed
    from headscope.mask import load_mask
    from headscope.models import load_model
    from headscope.transfer import DataConfig
    from headscope.transfer.rowstore import FileRows, RowStore

    if args.dry_run:
        return dry_run(args)
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
        held_kinds = rows.kinds("heldout")
        absent = [kind for kind in args.heldout_kinds if kind not in held_kinds]
        if absent:
            found = ", ".join(f"{kind} ({n})" for kind, n in held_kinds.items()) or "none"
            raise HeadscopeError(f"--heldout-kinds: no held-out document of kind {', '.join(absent)} "
                                 f"(kinds of the held-out documents, with their counts: {found})")
    else:
        rows = RowStore(DataConfig(source="demo_corpus"), args.seed, tokenizer, args.workers)  # forks before CUDA starts
    try:
        env = init_distributed("cpu" if args.smoke else "auto")
        lm = load_model(model_dir, device=env.device)
        lm.model.requires_grad_(False)
        extra = {name: load_mask(path, expect=lm.fingerprint) for name, path in args.extra_masks.items()}
        check_arm_options(args, lm.fingerprint, extra)
        base = args.teacher_length or lm.max_context
        bench = Bench(args, model_dir, lm, env, rows, base, started)
        arms = planned_arms(args)
        results = Results(args.out, args.work, settings_of(args, model_dir, lm.fingerprint, base), arms, args.fresh, arm_options(args, arms))
        return run_arms(bench, results, arms, tokenizer, stand_in, extra)
    finally:
        rows.close()


def dry_run(args) -> int:
    """``--dry-run``: the checks of a resume (settings, mask files, recorded options) and, per arm, whether it is
    kept (done) or runs and with which switches; nothing is trained or written."""
    from headscope.mask import load_mask
    from headscope.models import load_model

    tiny = args.work / "tiny-model"
    with tempfile.TemporaryDirectory() as scratch:  # a stand-in model not built yet is built there, not in --work
        model_dir, _ = resolve_model(args, tiny if (tiny / "config.json").is_file() else Path(scratch) / "tiny-model")
        lm = load_model(model_dir)
    check_arm_options(args, lm.fingerprint, {name: load_mask(path, expect=lm.fingerprint) for name, path in args.extra_masks.items()})
    arms = planned_arms(args)
    options = arm_options(args, arms)
    results = Results(args.out, args.work, settings_of(args, model_dir, lm.fingerprint, args.teacher_length or lm.max_context), arms,
                      args.fresh, options)
    for name, kind in arms:
        switches = "" if kind == "teacher" else format_switches({**args.hybrid_options, **options[name]}) or "defaults"
        action = "kept (done)" if results.arms[name]["status"] == "done" else "runs"
        print(f"{name:34} {kind:10} {action:12} {switches}")
    others = [name for name in results.arms if name not in dict(arms)]
    runs = sum(results.arms[name]["status"] != "done" for name, _ in arms)
    print(f"dry run: {len(arms)} arms planned, {runs} to run; {len(others)} other arms in the results stay as they are"
          + (f" ({', '.join(others)})" if others else "") + "; results untouched")
    return 0


def heldout_rows(bench: Bench, results: Results, length: int, kind: str | None = None) -> torch.Tensor:
    """The first ``--heldout-rows`` held-out rows at ``length`` (fewer, with a note, when the split holds fewer);
    with ``kind`` (data files only), of the held-out documents of that kind alone, packed the same way."""
    stream = bench.rows.stream("heldout", 0, length) if kind is None else bench.rows.stream("heldout", 0, length, kind=kind)
    documents = "the held-out documents" + ("" if kind is None else f" of kind {kind}")
    n = min(bench.args.heldout_rows, len(stream))
    if n == 0:
        raise HeadscopeError(f"{documents} hold no sequence of {length} tokens; raise --heldout-fraction or give more --data")
    if n < bench.args.heldout_rows:
        results.note(f"held-out CE{'' if kind is None else ' ' + kind} at {length} tokens over {n} rows ({documents} hold no more)")
    return torch.stack([stream[i] for i in range(n)])


def prepare_fused(bench: Bench, results: Results, hybrid: list[tuple[str, str]]):
    """The fused mask (computed once, stored in the results, saved next to them); None, with the arms
    that need it marked failed, when it cannot be made."""
    from headscope.mask import load_mask, save_mask
    from headscope.maskfile import mask_from_dict, mask_to_dict

    args, lm = bench.args, bench.lm
    try:
        if results.data["fused_mask"] is None:
            mask = load_mask(args.mask, expect=lm.fingerprint) if args.mask else fused_mask(lm, args.work, args.score_length,
                                                                                           args.score_pairs, args.receivers)
            results.data["fused_mask"] = mask_to_dict(mask)
            results.write()
        fused = mask_from_dict(results.data["fused_mask"], "fused mask", expect=lm.fingerprint)
        save_mask(fused, args.out / "hybrid_quality_mask.json")
        print(f"[{bench.elapsed():6.0f}s] fused 7:1 mask: {' '.join(str(h) for h in fused.heads())}", flush=True)
        return fused
    except Exception as error:  # noqa: BLE001
        for name, kind in hybrid:
            if kind in MATCHED_KINDS:
                results.arms[name].update(failure(error), kind=kind)
        results.write()
        print(f"fused mask failed: {error}", file=sys.stderr, flush=True)
        return None


def run_arms(bench: Bench, results: Results, arms: list[tuple[str, str]], tokenizer, stand_in: str | None, extra: dict) -> int:
    """Teacher evaluation, fused mask, budget, then every pending hybrid arm; results written after each."""
    from headscope.maskfile import mask_to_dict

    args, lm, env, base = bench.args, bench.lm, bench.env, bench.base
    fp = lm.fingerprint
    print(f"teacher {bench.model_dir} ({fp.n_layers} layers x {fp.n_heads} heads, {fp.n_kv_heads} KV heads, head_dim {fp.head_dim}) "
          f"on {env.device}; lengths {bench.lengths}; arms {', '.join(a for a, _ in arms)}", flush=True)
    if stand_in:
        results.note(f"model: {stand_in}")
    if lm.max_context is not None and max(bench.lengths) > lm.max_context:
        results.note(f"the teacher was trained at {lm.max_context} tokens (max_position_embeddings); beyond it its RoPE extrapolates")
    results.note("layer-wise arms: whole FA layers keep the pretrained attention (RoPE); head-wise FA heads are NoPE with log scaling")
    if importlib.util.find_spec("kaleido") is None:
        results.note("hybrid_quality.png not written: kaleido is not installed (the .html has the figure)")
    grid = probe_grid(tokenizer, results.data["settings"]["probes"], bench.lengths, args.pairs, args.eval_seed)
    bench.rows.fill([("heldout", 0, length, args.heldout_rows) for length in (base, 2 * base)])
    heldout = {length: heldout_rows(bench, results, length) for length in (base, 2 * base)}
    by_kind = {kind: {length: heldout_rows(bench, results, length, kind) for length in (base, 2 * base)} for kind in args.heldout_kinds}
    for path in args.eval_data:
        by_kind[f"eval:{path.stem}"] = text_rows(path, tokenizer, (base, 2 * base), args.heldout_rows, len(tokenizer))
        short = [f"{len(rows)} rows at {length}" for length, rows in by_kind[f"eval:{path.stem}"].items() if len(rows) < args.heldout_rows]
        if short:
            results.note(f"held-out CE eval:{path.stem} over {', '.join(short)} tokens ({path.name} holds no more)")
    print(f"[{bench.elapsed():6.0f}s] probes and held-out rows ready", flush=True)

    if "teacher" in results.arms and results.arms["teacher"]["status"] != "done":
        try:
            results.arms["teacher"] = {"kind": "teacher", "status": "done", "mask": None,
                                       **evaluate_quality(lm.model, fp, None, grid, heldout, bench.progress, by_kind)}
        except Exception as error:  # noqa: BLE001 - recorded, the other arms go on
            results.arms["teacher"] = {"kind": "teacher", **failure(error)}
        results.write()
        print(f"[{bench.elapsed():6.0f}s] teacher: {results.arms['teacher']['status']}", flush=True)
    teacher_eval = results.arms.get("teacher", {}).get("eval_seconds", 10.0)

    hybrid = [(name, kind) for name, kind in arms if kind != "teacher" and results.arms[name]["status"] != "done"]
    fused = None
    if any(kind in MATCHED_KINDS for _, kind in hybrid) or (hybrid and results.data["budget"] is None):
        fused = prepare_fused(bench, results, hybrid)
    hybrid = [(name, kind) for name, kind in hybrid if not (kind in MATCHED_KINDS and fused is None)]
    if not hybrid:
        results.write()
        print((results.out / "hybrid_quality.md").read_text())
        return 0

    if results.data["budget"] is None:
        calibration_mask = None if args.steps is not None else (
            fused if fused is not None else arm_mask("headwise_random_7to1_s0", "random", fp, None, extra))
        streams = len({arm_seed(name, args.seed) for name, _ in hybrid})
        results.data["budget"] = decide_budget(bench, calibration_mask, len(hybrid), streams, 1.5 * teacher_eval + 2.0)
        results.write()
    budget = results.data["budget"]
    results.note(budget["description"])
    try:
        seeds = sorted({arm_seed(name, args.seed) for name, _ in hybrid})
        fill_seconds = sum(bench.rows.fill(bench.row_needs(budget["steps"]), seed=seed)[0] for seed in seeds)
        print(f"[{bench.elapsed():6.0f}s] corpus rows ready ({fill_seconds:.1f} s, {args.workers} workers)", flush=True)
    except Exception as error:  # noqa: BLE001 - rows are then generated on demand during training
        results.note(f"parallel corpus generation failed ({type(error).__name__}: {error}); rows generated during training")
    projected = projected_arm_seconds(budget, 1.5 * teacher_eval)
    options = arm_options(args, hybrid)

    for name, kind in hybrid:
        head = {"kind": kind, **({"hybrid_options": options[name]} if options[name] else {})}  # every record of the arm names its options
        if bench.elapsed() + projected > args.deadline_minutes * 60:
            results.arms[name] = {**head, "status": "skipped_out_of_time",
                                  "error": f"would end after --deadline-minutes {args.deadline_minutes:g} (projected {projected:.0f} s); rerun the same command to resume"}
            results.write()
            print(f"[{bench.elapsed():6.0f}s] {name}: skipped (out of time)", flush=True)
            continue
        started = time.perf_counter()
        student = None
        try:
            mask = arm_mask(name, kind, fp, fused, extra)
            student, records, config = bench.train(name, mask, budget["steps"], arm_seed(name, args.seed), {**args.hybrid_options, **options[name]})
            train_seconds = time.perf_counter() - started
            logs = args.out / "hybrid_quality_logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            record = {**head, "status": "done", "transfer_seed": arm_seed(name, args.seed), "mask": mask_to_dict(mask),
                      **evaluate_quality(student, fp, mask, grid, heldout, bench.progress, by_kind),
                      "training": {"stages": stage_records(records, config), "seconds": round(train_seconds, 2)}}
            results.arms[name] = record
        except Exception as error:  # noqa: BLE001 - recorded, the other arms go on
            results.arms[name] = {**head, **failure(error)}
        finally:
            student = None
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
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
    if "--smoke" in sys.argv:
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU are far faster single-threaded
    script_main(main)
