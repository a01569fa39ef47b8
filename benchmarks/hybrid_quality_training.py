"""Training of the hybrid arms of ``benchmarks/hybrid_quality.py`` and their shared token budget (a helper
module of that script, not a script).

Every hybrid arm: ``headscope.transfer.build_student`` (``build_hybrid`` defaults, or the ``--hybrid-option`` switches updated by the
arm family's ``--arm-option`` ones) on the shared teacher,
fusion scales calibrated on the arm's first ``--calibrate-gamma`` training rows (``calibrate_student``),
then ``TransferTrainer`` with the same three stages (``Bench.stages``): align (1x the teacher length,
``--batch`` rows), distill (1x, KL + 0.1 CE), long_context (2x length, ``--batch // 2`` rows: equal tokens
per step). The corpus rows come from the shared ``RowStore`` / ``FileRows`` (``Bench.row_needs`` says
which rows a run reads, so they are generated once for all arms of a transfer seed).

Budget (``decide_budget``): ``--steps A,D,L`` fixes the steps. Otherwise ``calibrate`` makes two short runs of
the three stages (the first compiles kernels, the second is timed per step) and ``plan_budget`` splits
the steps ``STAGE_SHARES`` (1:2:1) over the stages so that all pending arms fit what is left of
``--minutes``, clamped to ``[--min-steps, --max-steps]``; the corpus-row generation of each transfer seed
is charged to the arms of that seed. When calibration fails, ``FALLBACK_STEPS`` (clamped) are used.
``projected_arm_seconds`` is what one arm is expected to take, for the ``--deadline-minutes`` check.

``build_tiny_model`` is the ``--smoke`` teacher when the demo model is missing (or with ``--tiny-model``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

STAGE_SHARES = (0.25, 0.5, 0.25)  # align, distill, long_context share of the steps
FALLBACK_STEPS = (100, 200, 100)  # used only when calibration fails


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


class Bench:
    """What every arm shares: arguments, teacher, device, corpus rows, base length, start time."""

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

    def train(self, name: str, mask, steps, seed: int, options: dict, on_step=None):
        """``build_student`` with the ``build_hybrid`` switches ``options`` + ``TransferTrainer`` on ``mask`` with transfer seed
        ``seed``; returns (student, log records, stage configs)."""
        from headscope.mask import save_mask
        from headscope.transfer import build_student, config_from_dict
        from headscope.transfer.api import calibrate_student
        from headscope.transfer.trainer import TransferTrainer

        run_dir = self.args.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        save_mask(mask, run_dir / "mask.json")
        config = config_from_dict({
            "model": str(self.model_dir), "hybrid": {"mask": str(run_dir / "mask.json"), "options": options,
                       "calibrate_gamma": self.args.calibrate_gamma},
            "data": self.data_config(),
            "stages": self.stages(steps), "seed": seed, "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
            "keep_checkpoints": 1, "device": self.env.device.type, "precision": "auto", "progress": self.progress,
        })
        torch.manual_seed(seed)
        student = build_student(self.lm.model, mask, options).to(self.env.device)
        sequences = self.rows.source(seed)
        calibrate_student(student, self.lm.model, sequences, config.hybrid, config.stages[0].seq_len)
        trainer = TransferTrainer(config, run_dir, self.env, self.lm.model, student, sequences, on_step=on_step)
        trainer.run()
        records = trainer.log.records()
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return student, records, config


def stage_records(records: list[dict], config) -> list[dict]:
    """Per stage: steps, tokens, lr, rows, length, last training loss, last held-out evaluation."""
    from headscope.transfer.api import stage_summaries

    return [{"name": s.name, "steps": s.steps, "tokens": s.tokens, "lr": stage.lr, "batch_size": stage.batch_size, "seq_len": stage.seq_len,
             "final_train_loss": s.final_loss, "heldout": s.heldout} for s, stage in zip(stage_summaries(config, records), config.stages)]


def calibrate(bench: Bench, mask) -> dict:
    """Step time per stage and per-arm fixed cost, from two short runs (compile, then timed)."""
    warm, timed = (1, 2) if bench.args.smoke else (2, 6)
    fill_seconds, fill_tokens = bench.rows.fill(bench.row_needs((timed + 1,) * 3), seed=bench.args.seed)
    stamps: dict[tuple[int, int], float] = {}

    def on_step(info):
        if bench.env.device.type == "cuda":
            torch.cuda.synchronize()
        stamps[(info.stage_index, info.step)] = time.perf_counter()

    started = time.perf_counter()
    bench.train("calibration_warmup", mask, (warm,) * 3, bench.args.seed, bench.args.hybrid_options)
    warm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bench.train("calibration_timed", mask, (timed + 1,) * 3, bench.args.seed, bench.args.hybrid_options, on_step=on_step)
    wall = time.perf_counter() - started
    step_seconds = [statistics.median(stamps[(s, k + 1)] - stamps[(s, k)] for k in range(1, timed + 1)) for s in range(3)]
    shutil.rmtree(bench.args.work / "runs", ignore_errors=True)
    return {
        "warmup_run_seconds": round(warm_seconds, 2), "timed_run_seconds": round(wall, 2),
        "step_seconds": [round(t, 4) for t in step_seconds],
        "overhead_seconds_per_arm": round(max(0.0, wall - sum((timed + 1) * t for t in step_seconds)), 2),
        "row_seconds_1x": fill_seconds * max(bench.args.workers, 1) * bench.base / fill_tokens if fill_tokens else 0.0,
    }


def plan_budget(bench: Bench, calibration: dict, n_arms: int, eval_estimate: float, n_streams: int) -> dict:
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


def decide_budget(bench: Bench, mask, n_arms: int, n_streams: int, eval_estimate: float) -> dict:
    """The budget record: ``--steps``, else calibrated on ``mask`` (the fixed fallback when that fails), with its description."""
    a = bench.args
    if a.steps is not None:
        record = {"steps": list(a.steps), "how": "fixed by --steps", "calibration": None}
    else:
        try:
            calibration = calibrate(bench, mask)
            record = plan_budget(bench, calibration, n_arms, eval_estimate, n_streams)
            print(f"[{bench.elapsed():6.0f}s] calibrated: {calibration}", flush=True)
        except Exception as error:  # noqa: BLE001 - the arms still run (and record their own failures)
            steps = [max(a.min_steps, min(a.max_steps, n)) for n in FALLBACK_STEPS]
            record = {"steps": steps, "how": f"calibration failed ({type(error).__name__}: {error}); fixed fallback",
                      "calibration": None, "calibration_traceback": traceback.format_exc()[-3000:]}
            print(f"calibration failed: {error}", file=sys.stderr, flush=True)
    stages = bench.stages(record["steps"])
    tokens = sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in stages)
    parts = ", ".join(f"{s['name']} {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens" for s in stages)
    record["description"] = f"training budget per hybrid arm: {parts} = {tokens:,} tokens ({record['how']})"
    return record


def projected_arm_seconds(record: dict, eval_estimate: float) -> float:
    """Training, fixed cost and evaluation of one arm under the budget ``record`` (0 training time without calibration)."""
    calibration = record.get("calibration") or {}
    return (sum(s * t for s, t in zip(record["steps"], calibration.get("step_seconds", [0.0] * 3)))
            + calibration.get("overhead_seconds_per_arm", 0.0) + eval_estimate)
