"""Programmatic entry points: ``run_transfer`` (the whole pipeline of a run config) and ``align_hybrid``.

``run_transfer`` loads the teacher, resolves the head mask, builds the hybrid student with
``headscope.hybrid.builder.build_hybrid`` (on a copy of the teacher, so the two never share a tensor),
reads and splits the data, starts each fused head at its pretrained output scale (``calibrate_student``,
fresh runs) and hands everything to ``TransferTrainer``. The run directory holds:

* ``config.json`` (the validated config and its digest) and ``mask.json`` (the mask used);
* ``log.jsonl``, ``loss_curves.html`` (see ``headscope.transfer.runlog``);
* ``checkpoints/`` (see ``headscope.transfer.checkpoint``);
* ``final/``: the trained hybrid (``save_pretrained``) with the tokenizer and ``headscope_mask.json``;
* ``result.json``: per-stage summaries.

``align_hybrid`` is stage 1 alone, in memory, for short runs (the demo's CPU alignment): no run
directory, no checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from headscope.distributed import DistEnv, barrier, init_distributed, shutdown
from headscope.heads import HeadMask, HeadscopeError, ModelFingerprint, read_json, write_json_atomic
from headscope.mask import save_mask
from headscope.models import load_model
from headscope.outputs import check_not_inside, check_writable, give_usual_mode
from headscope.transfer.checkpoint import latest_checkpoint, load_checkpoint
from headscope.transfer.config import RESUMABLE_CHANGES, HybridSpec, TransferConfig, config_from_dict
from headscope.transfer.data import SequenceSource, data_files, separator_note, sequence_source
from headscope.transfer.distributed import shard_fsdp
from headscope.transfer.objectives import AlignObjective, decoder_layers, set_trainable
from headscope.transfer.trainer import StepInfo, TrainingDiverged, TransferTrainer

StudentBuilder = Callable[[nn.Module, HeadMask, dict], nn.Module]


@dataclass
class StageSummary:
    """The end of one stage: steps, tokens, last logged training loss and the last held-out evaluation."""

    name: str
    kind: str
    steps: int
    tokens: int
    final_loss: float | None
    heldout: dict[str, Any]


@dataclass
class TransferResult:
    """What ``run_transfer`` returns. ``model`` is the trained student (FSDP-sharded under fsdp)."""

    run_dir: Path
    final_model_dir: Path
    stages: list[StageSummary]
    log_path: Path
    curves_path: Path
    resumed_from: str | None
    model: nn.Module | None = field(default=None, repr=False)


def build_student(teacher: nn.Module, mask: HeadMask, options: dict) -> nn.Module:
    """The head-wise hybrid of ``teacher`` under ``mask`` (``build_hybrid`` copies, never modifies, the teacher).

    Args:
        teacher: the pretrained causal LM.
        mask: its head mask.
        options: ``HybridConfig`` switches (``headscope.hybrid.builder.SWITCHES``), from ``hybrid.options``.
    """
    from headscope.hybrid.builder import SWITCHES, build_hybrid
    from headscope.hybrid.configuration import HybridConfig

    unknown = sorted(set(options) - set(SWITCHES))
    if unknown:
        raise HeadscopeError(f"unknown config key 'hybrid.options.{unknown[0]}'; known options: {', '.join(SWITCHES)}")
    try:
        switches = HybridConfig(**options) if options else None
    except (TypeError, ValueError) as err:
        raise HeadscopeError(f"config key 'hybrid.options': {err}") from None
    return build_hybrid(teacher, mask, switches)


def calibrate_student(student: nn.Module, teacher: nn.Module, sequences: SequenceSource, spec: HybridSpec, seq_len: int) -> torch.Tensor | None:
    """Start every fused head of a headscope hybrid at its pretrained output RMS (``spec.calibrate_gamma`` rows).

    With the fusion norm each head leaves the layer at unit RMS times ``gamma`` (init 1), while pretrained
    heads have their own scales (SmolLM2-135M: 0.012 to 1.15, median 0.28): at gamma = 1 the built hybrid
    starts far from the teacher (SmolLM2, 7:1: held-out CE 15.6 against the teacher's 5.1, align loss 469;
    calibrated: 8.7 and 124). Uses the first rows of stage 0's training stream.

    Returns:
        ``(n_layers, n_heads)`` RMS per pretrained head, or None when nothing was calibrated (not a
        headscope hybrid, or ``calibrate_gamma`` 0).
    """
    from headscope.hybrid.builder import calibrate_gamma
    from headscope.hybrid.modeling import HybridForCausalLM

    if spec.calibrate_gamma == 0 or not isinstance(student, HybridForCausalLM):
        return None
    rows = sequences("train", 0, seq_len)
    n = min(spec.calibrate_gamma, len(rows))
    if n == 0:
        raise HeadscopeError(f"hybrid.calibrate_gamma: the training data holds no sequence of {seq_len} tokens")
    ids = torch.stack([torch.as_tensor(rows[i]) for i in range(n)])  # (n, seq_len); calibrate_gamma moves it to the teacher
    return calibrate_gamma(student, teacher, ids)


def resolve_mask(spec: HybridSpec, fingerprint: ModelFingerprint) -> HeadMask:
    """The ``HeadMask`` of a run's ``hybrid`` section (a mask file, or a ``headscope.mask`` baseline)."""
    from headscope.mask import layerwise_mask, load_mask, random_mask

    if spec.mask is not None:
        return load_mask(spec.mask, expect=fingerprint)
    if spec.baseline == "layerwise":
        return layerwise_mask(fingerprint, spec.ratio or "3:1")
    if spec.baseline == "random":
        return random_mask(fingerprint, ratio=spec.ratio, n_full=spec.n_full, seed=spec.seed, kv_aware=spec.kv_aware)
    raise HeadscopeError(f"hybrid: unknown baseline {spec.baseline!r}")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix]


def _prepare_run_dir(run_dir: Path, config: TransferConfig, resume: bool) -> Path | None:
    """Check the run directory against ``resume`` and ``headscope.outputs``' rules (never inside the teacher's
    or the tokenizer's directory, writable); return the checkpoint to resume from, if any."""
    check_not_inside(run_dir, [config.model, config.tokenizer])
    check_writable(run_dir)
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise HeadscopeError(f"{run_dir} is not empty and holds no transfer run; choose another --out")
        return None
    if not resume:
        raise HeadscopeError(f"{run_dir} already holds a transfer run; pass --resume to continue it or choose another --out")
    stored = read_json(stored_path, "run config")
    if stored.get("digest") != config.digest():
        keys = [k for k in _differences(stored.get("config", {}), config.to_dict()) if k not in RESUMABLE_CHANGES]
        raise HeadscopeError(f"cannot resume {run_dir}: the config differs from the run's in {', '.join(keys) or 'its digest'}")
    if "data_files" in stored and stored["data_files"] != (now := data_files(config.data)):
        changed = sorted(set(stored["data_files"].items()) ^ set(now.items()))[0][0]
        raise HeadscopeError(f"cannot resume {run_dir}: its data files changed since it started (first: {changed}); "
                             "the documents and their order would differ")
    return latest_checkpoint(run_dir)


def _shares_storage(a: nn.Module, b: nn.Module) -> bool:
    pointers = {p.data_ptr() for p in a.parameters()}
    return any(p.data_ptr() in pointers for p in b.parameters())


def _load_tokenizer(config: TransferConfig, fallback: Any) -> Any:
    if config.tokenizer is None:
        return fallback
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HeadscopeError(f"cannot load the tokenizer {config.tokenizer}: {err}") from None


def _save_final(student: nn.Module, tokenizer: Any, mask: HeadMask, run_dir: Path, env: DistEnv, strategy: str) -> Path:
    """``save_pretrained`` the student into ``run_dir/final`` through a temporary directory."""
    state = None
    if env.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run_dir / "final"
    if env.is_main:
        tmp = run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, state_dict=state) if state is not None else student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_mask(mask, tmp / "headscope_mask.json")
        give_usual_mode(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier(env)
    return final


def stage_summaries(config: TransferConfig, records: list[dict]) -> list[StageSummary]:
    """One ``StageSummary`` per stage of a finished run of ``config``: its steps and tokens (every stage ran to its
    end), and from the log ``records`` its last logged training loss (None with ``log_every: 0``, or on a rank
    that keeps no log) and its last held-out evaluation."""
    out = []
    for index, stage in enumerate(config.stages):
        train = [r for r in records if r["stage_index"] == index and r["event"] == "train"]
        evals = [r for r in records if r["stage_index"] == index and r["event"] == "eval"]
        heldout = {k: v for k, v in evals[-1].items() if k.startswith("heldout_") or k == "teacher_ce"} if evals else {}
        out.append(StageSummary(stage.name, stage.kind, stage.steps, stage.steps * stage.batch_size * stage.seq_len,
                                train[-1]["loss"] if train else None, heldout))
    return out


def run_transfer(config: TransferConfig | dict, out_dir: str | os.PathLike, resume: bool = False, *,
                 on_step: Callable[[StepInfo], None] | None = None, student_builder: StudentBuilder | None = None) -> TransferResult:
    """Run (or resume) the three-stage transfer of a run config.

    Args:
        config: a ``TransferConfig`` or a config mapping (validated; relative paths stay relative to the cwd).
        out_dir: the run directory.
        resume: continue the run in ``out_dir`` from its latest checkpoint (a fresh directory just starts).
        on_step: called with a ``StepInfo`` after every optimizer step.
        student_builder: ``(teacher, mask, options) -> student``; default ``build_student`` (the hybrid).
    Returns:
        A ``TransferResult``.
    Raises:
        HeadscopeError: bad config, data or run directory; ``TrainingDiverged`` on a NaN/inf loss.
    """
    cfg = config if isinstance(config, TransferConfig) else config_from_dict(config)
    run_dir = Path(out_dir)
    resume_path = _prepare_run_dir(run_dir, cfg, resume)
    env = init_distributed(cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        fsdp = env.distributed and cfg.distributed == "fsdp"
        # Under FSDP the full models are built in host memory; fully_shard moves each rank's shards to its device.
        teacher_lm = load_model(cfg.model, dtype=torch.float32, device="cpu" if fsdp else env.device)
        tokenizer = _load_tokenizer(cfg, teacher_lm.tokenizer)
        teacher = teacher_lm.model.requires_grad_(False).eval()
        mask = resolve_mask(cfg.hybrid, teacher_lm.fingerprint)
        student = (student_builder or build_student)(teacher, mask, dict(cfg.hybrid.options)).to(teacher_lm.device)
        if student is teacher or _shares_storage(student, teacher):
            raise HeadscopeError("the student shares parameters with the teacher; the builder must copy them")
        if len(decoder_layers(student)) != len(decoder_layers(teacher)):
            raise HeadscopeError("the student and the teacher have different numbers of decoder layers")
        sequences = sequence_source(cfg.data, cfg.seed, tokenizer, vocab_size=getattr(teacher.config, "vocab_size", None))
        if env.is_main and (note := separator_note(cfg.data, tokenizer)):
            print(f"headscope transfer: note: {note}", file=sys.stderr)
        if resume_path is None:  # a resumed run loads its trained scales from the checkpoint
            calibrate_student(student, teacher, sequences, cfg.hybrid, cfg.stages[0].seq_len)
        if fsdp:
            shard_fsdp(teacher, decoder_layers(teacher), env)
            shard_fsdp(student, decoder_layers(student), env)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "config.json", {"digest": cfg.digest(), "config": cfg.to_dict(), "data_files": data_files(cfg.data)})
            save_mask(mask, run_dir / "mask.json")
        barrier(env)
        trainer = TransferTrainer(cfg, run_dir, env, teacher, student, sequences, on_step=on_step)
        trainer.run(load_checkpoint(resume_path) if resume_path else None, resume_path)
        final = _save_final(student, tokenizer, mask, run_dir, env, cfg.distributed)
        stages = stage_summaries(cfg, trainer.log.records() if env.is_main else [])
        result = TransferResult(run_dir, final, stages, run_dir / "log.jsonl", run_dir / "loss_curves.html",
                                str(resume_path) if resume_path else None, student)
        if env.is_main:
            write_json_atomic(run_dir / "result.json", {"final_model_dir": str(final), "resumed_from": result.resumed_from,
                                                        "stages": [s.__dict__ for s in stages]})
        barrier(env)  # leave together, as `headscope score` does: a rank tearing gloo down alone can abort its peer
        return result
    finally:
        shutdown(env)


def align_hybrid(student: nn.Module, teacher: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor], steps: int,
                 lr: float = 1e-3, *, align_inputs: str = "teacher", grad_clip: float = 1.0, progress: bool = True) -> list[float]:
    """Stage 1 in memory: train the student's attention modules to match the teacher's layer outputs.

    Args:
        student: the hybrid (its non-attention parameters are frozen during the call, unfrozen after).
        teacher: the original model (not modified).
        batches: ``(N, B, T)`` / ``(B, T)`` id tensor or an iterable of ``(B, T)`` tensors, cycled through.
        steps: optimizer steps.
        lr: AdamW learning rate (constant).
        align_inputs: "teacher" (teacher-forced, layer-local) or "student" (end-to-end).
        grad_clip: gradient-norm clipping (0 disables).
        progress: show a progress bar.
    Returns:
        The alignment loss of every step.
    Raises:
        TrainingDiverged: the loss became NaN/inf.
    """
    batch_list = [batches] if isinstance(batches, torch.Tensor) and batches.dim() == 2 else list(batches)
    if not batch_list or steps < 1:
        raise HeadscopeError("align_hybrid needs at least one batch and one step")
    device = next(student.parameters()).device
    objective = AlignObjective(align_inputs)
    set_trainable(student, "attention")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    teacher.eval()
    student.train()
    losses: list[float] = []
    try:
        for step in tqdm(range(steps), desc="align", disable=not progress, dynamic_ncols=True):
            ids = batch_list[step % len(batch_list)].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = objective(student, teacher, ids).loss
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"align_hybrid step {step + 1}: the loss is {loss.item()}; lower lr ({lr})")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            optimizer.step()
            losses.append(loss.item())
    finally:
        set_trainable(student, "all")
        student.eval()
    return losses
