"""Train the bundled demo model: a small Qwen3 on the generated task corpus, in minutes on one GPU.

    python -m headscope.zoo.train_demo --out data/models/headscope-demo --minutes 6.5 --seed 0 --compile

Recipe: build the word-level tokenizer from task samples and the haystack (``headscope.zoo.tokenizer``),
stream packed rows (``headscope.zoo.corpus``: the probe tasks plus the training-only multi-query recall
and multihop documents of ``headscope.zoo.multiquery``) from data-loader workers, first ``--short-fraction`` of the
steps on rows of ``--short-seq-len`` tokens weighted towards the key-matching tasks (``SHORT_PHASE_TASK_WEIGHTS``:
short look-ups among few positions; the realised mix is recorded in the summary), then
on rows of ``--seq-len`` with ``DEFAULT_TASK_WEIGHTS``, with the same tokens per step; train a
``Qwen3ForCausalLM`` (untied embeddings: tied ones let the never-predicted key words collapse
onto one embedding) with AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine
decay to 10%, bf16 autocast on CUDA, gradient clipping at 1, loss = answer-weighted next-token
cross-entropy. ``--steps`` fixes the step count; otherwise ``--minutes`` of training are turned into a
step count from the step time measured in each phase (the card records the counts, so ``--steps`` and
``--short-steps`` replay the run). Every few minutes the training state is written atomically to ``train_state.pt``, and
``--resume`` continues from it. At the end the weights are saved in bf16, loaded back in float32 and
scored on the probes (``headscope.zoo.evaluate``); the card, the loss log and its figure are written
by ``headscope.zoo.card``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from headscope.heads import HeadscopeError
from headscope.zoo.card import TrainingLog, write_outputs
from headscope.zoo.corpus import SHORT_PHASE_FILLER_FILL, SHORT_PHASE_TASK_WEIGHTS, CorpusConfig, CorpusStream, Haystack, RowBuilder, task_mix
from headscope.zoo.evaluate import embedding_similarity, task_accuracies
from headscope.zoo.multiquery import TRAINING_ONLY_TASKS, sample_training_task
from headscope.zoo.tokenizer import build_demo_tokenizer

PRESETS = {
    "demo": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}


def model_config(preset: str, tokenizer, seq_len: int, tie_embeddings: bool = False, layers: int | None = None) -> Qwen3Config:
    """The Qwen3 configuration of a preset for ``tokenizer``'s vocabulary and a ``seq_len`` context.

    Embeddings are untied by default: with tied embeddings the key words (needle and key-value keys, never
    predictable targets) get the same output-side gradient, their embeddings collapse onto one direction
    (mean pairwise cosine 0.93 in the first demo model) and no head can tell which key a query names.
    """
    return Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=seq_len, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **(PRESETS[preset] | ({"num_hidden_layers": layers} if layers else {})),
    )


def parse_task_weights(items: list[str], task_names: list[str]) -> dict[str, float]:
    """``["hop_queries=4", ...]`` -> ``{"hop_queries": 4.0}``; unknown tasks and bad weights are errors."""
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in task_names:
            raise HeadscopeError(f"--task-weight {item!r}: unknown task {name!r} (tasks: {', '.join(task_names)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise HeadscopeError(f"--task-weight {item!r}: the weight must be a number") from None
        if not weights[name] >= 0:
            raise HeadscopeError(f"--task-weight {item!r}: the weight must be >= 0")
    return weights


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``peak / 10`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def weighted_loss(model, batch: dict[str, torch.Tensor], n_tasks: int, amp: bool):
    """Answer-weighted next-token loss of one batch, plus detached sums for the log.

    Returns:
        (loss, sums) where sums is a ``(4 + 3 * n_tasks,)`` float tensor: weighted-loss numerator and
        denominator, text CE sum and count, then per task answer-CE sum, answer count and correct count.
    """
    ids, weights, answer_task = batch["ids"], batch["weights"], batch["answer_task"].long()
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T)
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=inputs).logits  # (B, T, V)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    loss = (ce * weights).sum() / weights.sum()
    with torch.no_grad():
        is_answer = answer_task >= 0
        correct = (logits.argmax(dim=-1) == targets) & is_answer
        task_index = answer_task.clamp(min=0).flatten()
        per_task = torch.zeros(3, n_tasks, device=ids.device)
        per_task[0].index_add_(0, task_index, (ce * is_answer).flatten())
        per_task[1].index_add_(0, task_index, is_answer.flatten().float())
        per_task[2].index_add_(0, task_index, correct.flatten().float())
        head = torch.stack([(ce * weights).sum(), weights.sum(), (ce * ~is_answer).sum(), (~is_answer).sum().float()])
        sums = torch.cat([head, per_task.flatten()])
    return loss, sums


@dataclass
class RunState:
    """Where a run stands; saved with the weights for ``--resume``.

    ``short_steps`` ends the short-row phase (0: no curriculum); it and ``total_steps`` are None until
    the step-time calibration of a ``--minutes`` run has fixed them.
    """

    step: int = 0
    total_steps: int | None = None
    short_steps: int | None = None
    train_seconds: float = 0.0
    task_weights: dict[str, float] = field(default_factory=dict)  # the --task-weight overrides of the run


class StepClock:
    """Seconds per step of a phase, averaged from the ``first`` step on (after compilation and warm-up).

    The first estimate comes at step ``second``; later ones every ``every`` steps, so that a run whose
    steady pace differs from its first steps (the loader's prefetched batches run out and the corpus
    workers set the pace) is re-planned: a fixed plan made from the first steps once let the short-row
    phase eat the whole time budget and left the 1024-token phase 50 steps.
    """

    def __init__(self, device: torch.device, first: int = 20, second: int = 50, every: int = 250) -> None:
        self.device, self.first, self.second, self.every, self.started = device, first, second, every, 0.0

    def tick(self, steps_in_phase: int) -> float | None:
        """Call after every step; returns the mean step time since ``first`` at ``second`` and every
        ``every`` steps after it, else None."""
        due = steps_in_phase >= self.second and (steps_in_phase - self.second) % self.every == 0
        if steps_in_phase != self.first and not due:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if steps_in_phase == self.first:
            self.started = time.perf_counter()
            return None
        return (time.perf_counter() - self.started) / (steps_in_phase - self.first)


def replan(run: RunState, seconds_left: float, step_seconds: float, short_fraction: float | None) -> None:
    """Fix ``run.total_steps`` (and, with ``short_fraction``, ``run.short_steps``) from the time left and
    the measured pace: the total never falls below the current step, the short phase never ends before
    it nor after the total."""
    run.total_steps = run.step + int(max(seconds_left, 0.0) / step_seconds)
    if short_fraction is not None:
        run.short_steps = min(max(int(short_fraction * run.total_steps), run.step), run.total_steps)


def save_state(path: Path, model, optimizer, state: RunState, log: TrainingLog) -> None:
    """Write the resumable training state atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "run": asdict(state),
                "log": log.rows}, tmp)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/models/headscope-demo", help="output model directory")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time (tokenizer and eval excluded)")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="preset", help="= --preset tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="rows of --seq-len tokens per step")
    parser.add_argument("--short-seq-len", type=int, default=256, help="row length of the first phase")
    parser.add_argument("--short-fraction", type=float, default=0.7, help="share of steps on short rows (0: none)")
    parser.add_argument("--short-steps", type=int, default=None, help="steps on short rows (overrides the fraction)")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="tie input and output embeddings (default: untied; tied, the key words' embeddings collapse)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (on the demo corpus 3e-3 reached multi-key 0.48 / key-value 0.17 in 8.2k steps; 1e-3 reached 1.00 / 1.00 within ~1,000)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--answer-weight", type=float, default=5.0)
    parser.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                        help="override a task's draw weight in both phases (repeatable), e.g. hop_queries=4")
    parser.add_argument("--workers", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (one graph per row length)")
    parser.add_argument("--eval-lengths", default="256,512,1024")
    parser.add_argument("--eval-pairs", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from headscope.probes import make_probe
    from headscope.probes.tasks import TASK_NAMES, sample_task_text, task_vocabulary

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    curriculum = 0 < args.short_seq_len < args.seq_len and (args.short_fraction > 0 or bool(args.short_steps))
    phase_lengths = [args.short_seq_len, args.seq_len] if curriculum else [args.seq_len]
    if any(args.batch_size * args.seq_len % length for length in phase_lengths):
        raise HeadscopeError(f"--short-seq-len {args.short_seq_len} must divide batch_size * seq_len")

    config = CorpusConfig(seq_len=args.seq_len, answer_weight=args.answer_weight)
    unknown = sorted(set(config.task_names) ^ (set(TASK_NAMES) | set(TRAINING_ONLY_TASKS)))
    if unknown:
        raise HeadscopeError(f"corpus task weights and the probe + training-only tasks differ on {unknown}")
    overrides = parse_task_weights(args.task_weight, config.task_names)
    config = replace(config, task_weights=config.task_weights | overrides)
    tokenizer = build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary(), seed=args.seed,
                                     model_max_length=args.seq_len)
    tokenizer.save_pretrained(out)
    core = tokenizer.backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731
    haystack = Haystack.essay(encode)

    def phase_config(seq_len: int) -> CorpusConfig:
        if seq_len < args.seq_len:
            return replace(config, seq_len=seq_len, task_weights=SHORT_PHASE_TASK_WEIGHTS | overrides, filler_fill=SHORT_PHASE_FILLER_FILL)
        return replace(config, seq_len=seq_len)

    def make_builder(seq_len: int) -> RowBuilder:
        return RowBuilder(encode, tokenizer.eos_token_id, sample_training_task, haystack, phase_config(seq_len))

    def make_loader(seq_len: int, start_batch: int) -> DataLoader:
        builder = lambda: make_builder(seq_len)  # noqa: E731
        stream = CorpusStream(builder, f"{args.seed}-{seq_len}", args.batch_size * args.seq_len // seq_len, start_batch)
        return DataLoader(stream, batch_size=None, num_workers=args.workers, pin_memory=amp,
                          prefetch_factor=8 if args.workers else None)

    model = Qwen3ForCausalLM(model_config(args.preset, tokenizer, args.seq_len, args.tie_embeddings, args.layers)).to(device)
    optimizer = make_optimizer(model, args.lr, fused=device.type == "cuda")
    log = TrainingLog(config.task_names, batch_tokens=args.batch_size * args.seq_len)
    run = RunState(total_steps=args.steps, short_steps=None if curriculum else 0, task_weights=overrides)
    if curriculum and args.short_steps is not None:
        run.short_steps = args.short_steps
    elif curriculum and args.steps is not None:
        run.short_steps = int(args.short_fraction * args.steps)
    if args.resume:
        if not state_path.is_file():
            raise HeadscopeError(f"--resume: no training state at {state_path}")
        saved = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        run, log.rows = RunState(**saved["run"]), saved["log"]
        if run.task_weights != overrides:
            raise HeadscopeError(f"--resume: the run was started with task-weight overrides {run.task_weights}, "
                                 f"not {overrides}; pass the same --task-weight options to resume it")
    forward = torch.compile(model, dynamic=False) if args.compile else model
    n_tasks = len(config.task_names)
    sums = torch.zeros(4 + 3 * n_tasks, device=device)
    started, last_checkpoint = time.perf_counter(), time.perf_counter()
    seconds_before = run.train_seconds
    progress = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step")
    model.train()
    for phase, seq_len in enumerate(phase_lengths):
        is_last = phase == len(phase_lengths) - 1
        if not is_last and run.short_steps is not None and run.step >= run.short_steps:
            continue
        clock, phase_start = StepClock(device), run.step
        for batch in make_loader(seq_len, run.step):
            end = run.total_steps if is_last else run.short_steps
            if end is not None and run.step >= end:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = learning_rate(run.step, run.total_steps or 10**9, args.lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, batch_sums = weighted_loss(forward, batch, n_tasks, amp)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums += batch_sums
            run.step += 1
            progress.update(1)
            step_seconds = clock.tick(run.step - phase_start) if args.steps is None else None
            if step_seconds is not None:
                left = max(args.minutes * 60 - (seconds_before + time.perf_counter() - started), 0.0)
                planned = run.total_steps
                replan(run, left, step_seconds, None if is_last or args.short_steps is not None else args.short_fraction)
                progress.total = run.total_steps
                if planned is None or abs(run.total_steps - planned) > 0.03 * planned or run.step - phase_start == clock.second:
                    tqdm.write(f"rows of {seq_len}: {step_seconds * 1e3:.1f} ms/step ({args.batch_size * args.seq_len / step_seconds:,.0f}"
                               f" tokens/s); plan: {run.total_steps} steps, {run.short_steps} on short rows")
            if run.step % args.log_every == 0 or run.step == run.total_steps:
                seconds = seconds_before + time.perf_counter() - started
                log.add(run.step, seconds, lr, float(grad_norm), sums.tolist(), seq_len)
                row = log.rows[-1]
                progress.set_postfix(loss=f"{row['loss']:.3f}", ans=f"{row['answer_acc']:.2f}")
                if run.step % (args.log_every * 20) == 0:
                    tasks = " ".join(f"{name[:6]} {row[f'answer_acc_{name}']:.2f}" for name in config.task_names)
                    tqdm.write(f"step {run.step} {seconds:.0f}s len {seq_len} loss {row['loss']:.3f} text "
                               f"{row['text_loss']:.3f} answer {row['answer_loss']:.3f} | {tasks}")
                sums.zero_()
                if run.total_steps is not None and time.perf_counter() - last_checkpoint > args.checkpoint_minutes * 60:
                    run.train_seconds = seconds
                    save_state(state_path, model, optimizer, run, log)
                    last_checkpoint = time.perf_counter()
    progress.close()
    run.train_seconds = seconds_before + time.perf_counter() - started

    model.to(torch.bfloat16).save_pretrained(out)
    shipped = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    shipped_tokenizer = AutoTokenizer.from_pretrained(out)
    lengths = [int(x) for x in args.eval_lengths.split(",") if int(x) <= args.seq_len]
    probe_tasks = [name for name in config.task_names if name in TASK_NAMES]
    accuracies = task_accuracies(shipped, make_probe, shipped_tokenizer, probe_tasks, lengths, args.eval_pairs)
    from headscope.probes import vocab

    diagnostics = {f"{pool}_embedding_cosine": embedding_similarity(shipped, shipped_tokenizer, vocab.WORD_LISTS[pool])
                   for pool in ("keys", "word_values", "names")}
    phases = [dict(asdict(phase_config(length)), realised_task_mix=task_mix(make_builder(length))) for length in phase_lengths]
    write_outputs(out, args=vars(args), log=log, accuracies=accuracies, model=shipped, run=asdict(run),
                  device_name=torch.cuda.get_device_name() if amp else "cpu", phases=phases, diagnostics=diagnostics)
    print("mean pairwise cosine of input embeddings (keys collapse -> no key matching): "
          + ", ".join(f"{name} {value:.3f}" for name, value in diagnostics.items()))
    state_path.unlink(missing_ok=True)
    for row in accuracies:
        print(f"{row.task:16s} len {row.length:5d}  argmax {row.argmax:.3f}  beats_wrong {row.beats_wrong:.3f}  "
              f"logit_diff {row.mean_logit_diff:+.2f}")
    return 0


if __name__ == "__main__":
    from headscope.cli import script_main

    script_main(main, prog="train_demo")
