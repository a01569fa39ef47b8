"""The training loop of the transfer stages: optimisation, held-out evaluation, checkpoints, exact resume.

Per stage: the stage's parameters are unfrozen (attention modules, or everything), a fresh AdamW and a
warmup + cosine schedule are built, and for each step the global batch (a pure function of seed, stage
and step, ``headscope.transfer.data``) is split over processes and micro-batches. The loss is averaged
over micro-batches and processes; a NaN/inf loss or gradient norm stops the run *before* the optimizer
step with ``TrainingDiverged`` (no checkpoint is written, the last good one stays ``latest``), and a
checkpoint is only written when every weight is finite. Under DDP every stage ends with a check that
all processes hold identical weights.

Exact resume: a checkpoint holds the full model, optimizer and scheduler state, each process's RNG
states and the step; the data position is the step. Restoring them and running the remaining steps
performs the same floating-point operations as an uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from headscope.distributed import DistEnv, all_reduce_mean, all_reduce_sum, barrier, gather_objects
from headscope.heads import HeadscopeError
from headscope.transfer.checkpoint import CheckpointState, checkpoint_dir, rng_state, save_checkpoint, set_rng_state
from headscope.transfer.config import StageConfig, TransferConfig
from headscope.transfer.data import SequenceSource, StageData
from headscope.transfer.distributed import full_state, load_model_state, load_optimizer_state, wrap_for_stage
from headscope.transfer.losses import next_token_loss
from headscope.transfer.objectives import make_objective, set_trainable
from headscope.transfer.runlog import RunLog, write_loss_curves


class TrainingDiverged(HeadscopeError):
    """The loss or the gradient norm became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class StepInfo:
    """What an ``on_step`` callback sees after each optimizer step (and any checkpoint of that step)."""

    stage_index: int
    stage: str
    step: int  # steps completed in the stage
    loss: float
    parts: dict[str, float]
    model: nn.Module = field(repr=False)  # the student (unwrapped)


def lr_factor(stage: StageConfig, step: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warmup, then cosine to ``min_lr_ratio``."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = min((step - stage.warmup) / max(stage.steps - stage.warmup, 1), 1.0)
    return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_context(env: DistEnv, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto``) or when asked (``bf16``); plain float32 otherwise."""
    if precision == "bf16" or (precision == "auto" and env.device.type == "cuda"):
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (no communication), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TransferTrainer:
    """Runs the stages of a ``TransferConfig`` on a built student.

    Args:
        config: the run config.
        run_dir: the run directory (log, checkpoints, figures).
        env: this process's distributed environment.
        teacher: the original model (frozen; FSDP-sharded under ``distributed: fsdp``).
        student: the hybrid (FSDP-sharded under ``fsdp``; never DDP-wrapped here).
        sequences: ``(split, stage_index, seq_len) -> sequences`` (``headscope.transfer.data.sequence_source``).
        on_step: optional callback receiving a ``StepInfo`` after every step.
    """

    def __init__(self, config: TransferConfig, run_dir: str | Path, env: DistEnv, teacher: nn.Module, student: nn.Module,
                 sequences: SequenceSource, on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.config, self.run_dir, self.env = config, Path(run_dir), env
        self.teacher, self.student = teacher, student
        self.sequences = sequences
        self.on_step = on_step
        self.log = RunLog(self.run_dir / "log.jsonl", enabled=env.is_main)
        self.last_checkpoint: Path | None = None
        self.teacher_ce: float | None = None  # the teacher's held-out cross-entropy, once per stage
        self.started = time.monotonic()

    # --- the run ---------------------------------------------------------------------------------
    def run(self, resume_from: CheckpointState | None = None, resume_path: Path | None = None) -> None:
        """Train every stage, starting after ``resume_from`` when given."""
        start_stage, start_step = 0, 0
        if resume_from is not None:
            load_model_state(self.student, resume_from.model, self.env, self.config.distributed)
            self.log.truncate(resume_from.stage_index, resume_from.step)
            self.last_checkpoint = resume_path
            start_stage, start_step = resume_from.stage_index, resume_from.step
            if resume_from.stage_done:
                start_stage, start_step = start_stage + 1, 0
                self._restore_rng(resume_from)
        else:
            self.log.truncate(0, -1)  # a fresh start (also a resumed run that wrote no checkpoint) keeps no earlier record
        for index in range(start_stage, len(self.config.stages)):
            mid_stage = resume_from if (resume_from is not None and index == resume_from.stage_index and not resume_from.stage_done) else None
            self.run_stage(index, start_step if index == start_stage else 0, mid_stage)

    def _restore_rng(self, state: CheckpointState) -> None:
        if len(state.rng) == self.env.world_size:
            set_rng_state(state.rng[self.env.rank])
        elif self.env.is_main:
            print(f"headscope transfer: the checkpoint was written by {len(state.rng)} processes, this run has "
                  f"{self.env.world_size}; random states are not restored (only dropout uses them)", file=sys.stderr)

    def stage_data(self, index: int, stage: StageConfig) -> StageData:
        train = self.sequences("train", index, stage.seq_len)
        heldout = self.sequences("heldout", index, stage.seq_len)
        data = StageData(train, heldout, seed=self.config.seed * 1000 + index, eval_sequences=self.config.data.eval_sequences)
        if self.config.data.eval_sequences and data.n_eval == 0 and self.env.is_main:
            print(f"headscope transfer: stage {stage.name!r}: the held-out split holds no sequence of {stage.seq_len} tokens; "
                  "no held-out loss for this stage", file=sys.stderr)
        return data

    def run_stage(self, index: int, start_step: int, resume_from: CheckpointState | None) -> None:
        """Train stage ``index`` from ``start_step`` (restoring optimizer state from ``resume_from``)."""
        cfg, env, stage = self.config, self.env, self.config.stages[index]
        if stage.batch_size % env.world_size:
            raise HeadscopeError(f"stages[{index}].batch_size {stage.batch_size} is not divisible by {env.world_size} processes")
        per_rank = stage.batch_size // env.world_size
        micro = min(stage.micro_batch or per_rank, per_rank)
        if per_rank % micro:
            raise HeadscopeError(f"stages[{index}]: {per_rank} sequences per process are not a multiple of micro_batch {micro}")
        set_trainable(self.student, stage.trainable)
        model = wrap_for_stage(self.student, env, cfg.distributed)
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, step))
        tokens = 0
        if resume_from is not None:
            load_optimizer_state(self.student, optimizer, resume_from.optimizer, env, cfg.distributed)
            scheduler.load_state_dict(resume_from.scheduler)
            tokens = resume_from.tokens
            self._restore_rng(resume_from)
        data = self.stage_data(index, stage)
        trained_length = getattr(self.teacher.config, "max_position_embeddings", None)
        if stage.kind == "long_context" and trained_length and stage.seq_len <= trained_length and env.is_main:
            print(f"headscope transfer: stage {stage.name!r} trains at {stage.seq_len} tokens, within the teacher's "
                  f"max_position_embeddings ({trained_length}); long-context training usually goes beyond it", file=sys.stderr)
        objective = make_objective(stage)
        teacher = self.teacher if objective.uses_teacher else None
        self.teacher_ce = None
        bar = tqdm(total=stage.steps, initial=start_step, desc=f"{index + 1}/{len(cfg.stages)} {stage.name}",
                   disable=not (env.is_main and cfg.progress), dynamic_ncols=True)
        try:
            for step in range(start_step, stage.steps):
                rows = data.batch(step, stage.batch_size, env.rank, env.world_size).to(env.device)  # (per_rank, T)
                loss, parts, grad_norm = self._train_step(stage, step, model, objective, teacher, optimizer, params, rows, micro)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                tokens += stage.batch_size * stage.seq_len
                done = step + 1
                if cfg.log_every and (done % cfg.log_every == 0 or done in (1, stage.steps)):
                    self.log.write({"event": "train", "stage": stage.name, "stage_index": index, "step": done, "loss": loss,
                                    **parts, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                                    "elapsed_s": round(time.monotonic() - self.started, 3)})
                if done < stage.steps:
                    if cfg.eval_every and done % cfg.eval_every == 0:
                        self.evaluate(index, stage, done, model, objective, teacher, data, micro)
                    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                        self.checkpoint(index, stage, done, False, tokens, optimizer, scheduler)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if self.on_step is not None:
                    self.on_step(StepInfo(index, stage.name, done, loss, parts, self.student))
            self.evaluate(index, stage, stage.steps, model, objective, teacher, data, micro)
            self.check_replicas(stage)
            self.checkpoint(index, stage, stage.steps, True, tokens, optimizer, scheduler)
        finally:
            bar.close()
        if env.is_main:
            write_loss_curves(self.log.records(), self.run_dir / "loss_curves.html")

    def _train_step(self, stage, step, model, objective, teacher, optimizer, params, rows, micro) -> tuple[float, dict, float]:
        """Forward/backward over the micro-batches of one step; returns (loss, parts, grad norm)."""
        env, cfg = self.env, self.config
        model.train()
        optimizer.zero_grad(set_to_none=True)
        chunks = rows.split(micro)
        totals: torch.Tensor | None = None
        names: list[str] = []
        for k, chunk in enumerate(chunks):
            sync = k == len(chunks) - 1
            if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
                context = model.no_sync()
            else:
                context = contextlib.nullcontext()
                if env.distributed and cfg.distributed == "fsdp":
                    self.student.set_requires_gradient_sync(sync)
            with context:
                with autocast_context(env, cfg.precision):
                    out = objective(model, teacher, chunk)
                (out.loss / len(chunks)).backward()
            names = list(out.parts)
            values = torch.stack([out.loss.detach().float(), *[v.float() for v in out.parts.values()]]) / len(chunks)
            totals = values if totals is None else totals + values
        reduced = all_reduce_mean(totals, env).tolist()
        loss, parts = reduced[0], dict(zip(names, reduced[1:]))
        if not math.isfinite(loss):
            self._diverged(stage, step + 1, f"the loss is {loss} ({', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); "
                                            "the optimizer step was not taken")
        norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip if stage.grad_clip > 0 else float("inf"))
        grad_norm = float(_full(norm))
        if not math.isfinite(grad_norm):
            self._diverged(stage, step + 1, f"the gradient norm is {grad_norm} (loss {loss:.4g}); the optimizer step was not taken")
        return loss, parts, grad_norm

    def _diverged(self, stage: StageConfig, step: int, what: str) -> None:
        """Stop the run at (1-based) ``step``: no checkpoint is written, the last good one stays latest."""
        last = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        raise TrainingDiverged(
            f"stage {stage.name!r} step {step}: {what}. The run stopped without writing a checkpoint; last good "
            f"checkpoint: {last}. Start a new run (another --out) with a lower learning rate or checked data; --resume "
            "continues only with the same config, from that checkpoint."
        )

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, index: int, stage: StageConfig, step: int, model, objective, teacher, data: StageData, micro: int) -> None:
        """Held-out loss (and its parts), the student's and the teacher's held-out cross-entropy; logged."""
        env = self.env
        rows = data.eval_rows(env.rank, env.world_size)
        if rows is None:
            return
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        layer_mse = None
        for chunk in rows.to(env.device).split(micro):
            weight = float(chunk.shape[0])
            with autocast_context(env, self.config.precision):
                out = objective(model, teacher, chunk, need_logits=True)
                ce = next_token_loss(out.logits, chunk)
                teacher_ce = next_token_loss(self.teacher(input_ids=chunk, use_cache=False).logits, chunk) if self.teacher_ce is None else None
            entries = {"loss": out.loss, **out.parts, "ce": ce}
            if teacher_ce is not None:
                entries["teacher_ce"] = teacher_ce
            for key, value in entries.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * weight
            if out.layer_mse is not None:
                layer_mse = (0.0 if layer_mse is None else layer_mse) + out.layer_mse.float() * weight
        model.train()
        count = float(rows.shape[0])
        flat = torch.stack(list(sums.values()) + ([] if layer_mse is None else list(layer_mse)))
        flat = (all_reduce_sum(flat, env) / (count * env.world_size)).tolist()
        means = dict(zip(sums, flat))
        if "teacher_ce" in means:
            self.teacher_ce = means.pop("teacher_ce")
        record = {"event": "eval", "stage": stage.name, "stage_index": index, "step": step,
                  **{f"heldout_{k}": v for k, v in means.items()}, "teacher_ce": self.teacher_ce,
                  "eval_sequences": int(count) * env.world_size}
        if layer_mse is not None:
            record["heldout_layer_mse"] = flat[len(sums):]
        self.log.write(record)

    def check_replicas(self, stage: StageConfig) -> None:
        """Under DDP, check that every process holds the same weights (per-tensor float64 sums and sums
        of squares, compared exactly); raise if the replicas diverged."""
        env = self.env
        if not env.distributed or self.config.distributed != "ddp":
            return
        sums = torch.stack([s for p in self.student.parameters() for s in (p.double().sum(), p.double().square().sum())])
        gathered = [torch.empty_like(sums) for _ in range(env.world_size)]
        torch.distributed.all_gather(gathered, sums)
        if not all(torch.equal(g, gathered[0]) for g in gathered[1:]):
            raise HeadscopeError(f"stage {stage.name!r}: the DDP replicas hold different weights (non-deterministic "
                                 "or unsynchronised updates); the run stopped")

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, index: int, stage: StageConfig, step: int, stage_done: bool, tokens: int, optimizer, scheduler) -> None:
        """Write a checkpoint after ``step`` (refusing to if any weight is NaN/inf)."""
        env = self.env
        finite = torch.tensor([float(all(bool(torch.isfinite(_shard(p)).all()) for p in self.student.parameters()))], device=env.device)
        if all_reduce_mean(finite, env).item() < 1.0:
            self._diverged(stage, step, "a weight is NaN/inf after the optimizer step")
        model_state, optimizer_state = full_state(self.student, optimizer, env, self.config.distributed)
        rng = gather_objects(rng_state(), env)
        state = CheckpointState(index, stage.name, step, stage_done, tokens, model_state,
                                None if stage_done else optimizer_state, None if stage_done else scheduler.state_dict(),
                                rng, self.config.digest())
        if env.is_main:
            save_checkpoint(self.run_dir, state, self.config.keep_checkpoints)
        barrier(env)
        self.last_checkpoint = checkpoint_dir(self.run_dir) / state.tag
