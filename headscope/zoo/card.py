"""What a demo-model training run leaves beside its weights: loss log, figure, results and model card.

* ``training_log.csv``: one row per logging interval: step, tokens seen, seconds, row length, learning rate, gradient
  norm, the answer-weighted loss, the cross-entropy on text (non-answer) targets and on answer targets,
  and per task the answer cross-entropy and the fraction of answer tokens predicted by argmax (teacher
  forcing, on the training stream).
* ``loss_curves.html``: those curves against tokens seen (plotly; the page loads plotly.js from its CDN).
* ``training_summary.json``: arguments, shape, tokens, steps, time and the probe accuracies.
* ``README.md``: the model card.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

from headscope.heads import write_json_atomic
from headscope.zoo.evaluate import ProbeAccuracy
from headscope.zoo.multiquery import TRAINING_ONLY_TASKS


class TrainingLog:
    """Rows of the loss log, built from the per-interval sums of ``train_demo.weighted_loss``."""

    def __init__(self, task_names: Sequence[str], batch_tokens: int) -> None:
        self.task_names = list(task_names)
        self.batch_tokens = batch_tokens
        self.rows: list[dict[str, float]] = []

    def add(self, step: int, seconds: float, lr: float, grad_norm: float, sums: Sequence[float], seq_len: int) -> None:
        """Append one row; ``sums`` is the summed ``(4 + 3 * n_tasks)`` vector of the interval, ``seq_len``
        the row length of the batches."""
        n = len(self.task_names)
        weighted, weight, text_ce, text_count = sums[:4]
        task_ce, task_count, task_correct = sums[4 : 4 + n], sums[4 + n : 4 + 2 * n], sums[4 + 2 * n : 4 + 3 * n]
        answers = max(sum(task_count), 1.0)
        row: dict[str, float] = {
            "step": step, "tokens": step * self.batch_tokens, "seconds": round(seconds, 2), "seq_len": seq_len, "lr": lr,
            "grad_norm": grad_norm, "loss": weighted / max(weight, 1.0), "text_loss": text_ce / max(text_count, 1.0),
            "answer_loss": sum(task_ce) / answers, "answer_acc": sum(task_correct) / answers,
        }
        for index, name in enumerate(self.task_names):  # NaN where the interval had no answer of the task
            count = task_count[index] or math.nan
            row[f"answer_loss_{name}"] = task_ce[index] / count
            row[f"answer_acc_{name}"] = task_correct[index] / count
        self.rows.append(row)

    def write_csv(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)

    def write_figure(self, path: Path) -> None:
        """Loss and per-task answer accuracy against tokens seen, as a standalone HTML page."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        tokens = [row["tokens"] for row in self.rows]
        figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "answer-token accuracy (training stream)"))
        for key in ("loss", "text_loss", "answer_loss"):
            figure.add_trace(go.Scatter(x=tokens, y=[row[key] for row in self.rows], name=key), row=1, col=1)
        for name in self.task_names:
            values = [row[f"answer_acc_{name}"] for row in self.rows]
            figure.add_trace(go.Scatter(x=tokens, y=values, name=name), row=1, col=2)
        figure.update_xaxes(title_text="tokens seen")
        figure.update_yaxes(type="log", row=1, col=1)
        figure.update_layout(title="headscope-demo training", width=1200, height=480)
        tmp = path.with_suffix(".tmp")
        figure.write_html(tmp, include_plotlyjs="cdn")
        os.replace(tmp, path)


def _accuracy_table(accuracies: Sequence[ProbeAccuracy]) -> str:
    lines = ["| task | length | pairs | argmax acc | beats wrong (chance 0.5) | mean logit diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in accuracies:
        lines.append(f"| {row.task} | {row.length} | {row.n_pairs} | {row.argmax:.3f} | {row.beats_wrong:.3f} | "
                     f"{row.mean_logit_diff:+.2f} |")
    return "\n".join(lines)


# A task counts as learnt when, at every scored length, its answer is the argmax and beats the corrupt
# answer this often (tests/test_demo_model.py holds the shipped model to the same bar at 256 tokens).
LEARNT_ARGMAX, LEARNT_BEATS_WRONG = 0.75, 0.85


def learnt_tasks(accuracies: Sequence[ProbeAccuracy]) -> dict[str, bool]:
    """Task -> whether it clears ``LEARNT_ARGMAX`` and ``LEARNT_BEATS_WRONG`` at every scored length."""
    learnt: dict[str, bool] = {}
    for row in accuracies:
        ok = row.argmax >= LEARNT_ARGMAX and row.beats_wrong >= LEARNT_BEATS_WRONG
        learnt[row.task] = learnt.get(row.task, True) and ok
    return learnt


def status_section(accuracies: Sequence[ProbeAccuracy]) -> str:
    """The card's Status: which probe tasks the model has learnt, from its measured accuracies."""
    learnt = learnt_tasks(accuracies)
    done = [task for task, ok in learnt.items() if ok]
    missing = [task for task, ok in learnt.items() if not ok]
    lengths = sorted({row.length for row in accuracies})
    line = (f"{len(done)} of {len(learnt)} probe tasks learnt (argmax >= {LEARNT_ARGMAX:g} and beats wrong >= "
            f"{LEARNT_BEATS_WRONG:g} at every length scored: {', '.join(map(str, lengths))} tokens)")
    if not missing:
        return line + ": " + ", ".join(done) + "."
    worst = {task: min(row.argmax for row in accuracies if row.task == task) for task in missing}
    return (line + ". Learnt: " + (", ".join(done) or "none") + ". Not learnt: "
            + ", ".join(f"{task} (argmax down to {worst[task]:.2f})" for task in missing) + ".")


def phase_mix_line(phase: dict[str, Any]) -> str:
    """One Markdown bullet: a phase's row length and, per task, its draw weight share -> realised share."""
    total = sum(phase["task_weights"].values())
    shares = ", ".join(f"{name} {weight / total:.0%} -> {phase['realised_task_mix'][name]:.0%}"
                       for name, weight in phase["task_weights"].items())
    return f"* rows of {phase['seq_len']} tokens: {shares}"


def model_card(summary: dict[str, Any], accuracies: Sequence[ProbeAccuracy]) -> str:
    """The README.md of the model directory."""
    shape, args, run = summary["shape"], summary["args"], summary["run"]
    phases = summary["phases"]
    corpus = phases[-1]
    mix = "\n".join(phase_mix_line(phase) for phase in phases)
    training_only = ", ".join(f"`{name}`" for name in corpus["task_weights"] if name in TRAINING_ONLY_TASKS)
    curriculum = (
        f"Length curriculum: the first {run['short_steps']} steps use rows of {phases[0]['seq_len']} tokens "
        f"(the key-matching mix above, {phases[0]['filler_fill']:.0%} of the filler), the rest rows of "
        f"{corpus['seq_len']}." if run["short_steps"] else ""
    )
    reproduce = (
        f"python -m headscope.zoo.train_demo --out DIR --seed {args['seed']} --steps {run['step']} "
        f"--short-steps {run['short_steps']} --seq-len {args['seq_len']} --short-seq-len {args['short_seq_len']} "
        f"--batch-size {args['batch_size']} --lr {args['lr']:g}" + (f" --layers {args['layers']}" if args.get("layers") else "")
        + "".join(f" --task-weight {item}" for item in args.get("task_weight", []))
        + (" --compile" if args["compile"] else "")
    )
    return f"""# headscope-demo

A small `Qwen3ForCausalLM` trained from scratch, in minutes, on text generated by headscope itself, so that
`make demo` and the tests have a model whose heads have specialised (retrieval, induction, binding)
without downloading weights. It knows nothing beyond its synthetic corpus.

## Status
{status_section(accuracies)} What was tried on the way to this recipe, failures included:
`data/models/headscope-demo/HISTORY.md` in the headscope repository.

## Shape
| | |
| --- | --- |
| architecture | Qwen3ForCausalLM (RoPE, RMSNorm, q/k norm, SwiGLU, GQA), {'tied' if shape.get('tied_embeddings') else 'untied'} embeddings |
| layers x query heads (KV heads) | {shape['n_layers']} x {shape['n_heads']} ({shape['n_kv_heads']}) |
| head_dim / d_model / d_ff | {shape['head_dim']} / {shape['hidden_size']} / {shape['intermediate_size']} |
| parameters | {summary['parameters']:,} |
| vocabulary | {shape['vocab_size']} word-level tokens (digits and punctuation single tokens; `<unk>`, `<eos>`, `<pad>`) |
| context (= training length) | {shape['max_position_embeddings']} tokens |
| weights | bf16 safetensors (load with `dtype=torch.float32` for analysis) |

## Data
Generated on the fly by `headscope.zoo.corpus` (seed {args['seed']}): haystack text from `data/haystack/`
with task instances embedded (the probe tasks from `headscope.probes.tasks.sample_task_text`, the probes'
own sampler, and the training-only {training_only} from `headscope.zoo.multiquery`), prompt followed by its answer, documents packed into rows separated by
`<eos>`; {corpus['filler_doc_prob']:.0%} of documents are plain haystack text. Answer tokens weigh
{corpus['answer_weight']:g}x in the loss. Task mix per phase, as draw weight -> realised share of task
documents (`headscope.zoo.corpus.task_mix`: a task too long for what is left of a row gives way to
one that fits):

{mix}

## Training
{run['step']} steps of {args['batch_size'] * args['seq_len']:,} tokens = {summary['tokens']:,} tokens seen,
{run['train_seconds'] / 60:.1f} minutes on {summary['device']}. {curriculum}
AdamW (lr {args['lr']:g}, betas 0.9/0.95, weight decay 0.1), {args['warmup']} warm-up steps, cosine decay to
10%, bf16 autocast, gradient clip 1. Final loss: {summary['final']['loss']:.3f} (text
{summary['final']['text_loss']:.3f}, answers {summary['final']['answer_loss']:.3f}). Curves: `training_log.csv`,
`loss_curves.html`.

Reproduce (GPU kernels are not bit-deterministic: expect the same accuracies, not the same bits):

    {reproduce}

## Probe accuracy (clean prompts, shipped bf16 weights read as float32)
`headscope.probes.make_probe(task, tokenizer, length=L, n_pairs=N)`; *argmax acc*: the answer token is the
most likely next token; *beats wrong*: its logit beats the corrupt prompt's answer.

{_accuracy_table(accuracies)}

## Limits
A toy: tiny vocabulary, templated text, {shape['max_position_embeddings']}-token context. Use it to exercise
headscope, not to draw conclusions about large models.
"""


def write_outputs(out: Path, *, args: dict[str, Any], log: TrainingLog, accuracies: Sequence[ProbeAccuracy],
                  model, run: dict[str, Any], device_name: str, phases: Sequence[dict[str, Any]],
                  diagnostics: dict[str, float] | None = None) -> dict[str, Any]:
    """Write the log, figure, summary and card into ``out``; returns the summary.

    Args:
        phases: per curriculum phase, short rows first: the ``CorpusConfig`` as a dict plus
            ``realised_task_mix`` (``headscope.zoo.corpus.task_mix``).
        diagnostics: e.g. the key-embedding similarity; stored in the summary as they are.
    """
    config = model.config
    shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "head_dim")
    shape = {key: getattr(config, key) for key in shape_keys}
    shape.update(n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                 n_kv_heads=config.num_key_value_heads, tied_embeddings=bool(config.tie_word_embeddings))
    final = log.rows[-1]
    summary = {
        "args": args, "shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
        "run": run, "tokens": int(final["tokens"]),
        "device": device_name, "phases": list(phases), "final": final,
        "accuracy": [row.to_dict() for row in accuracies],
        "diagnostics": dict(diagnostics or {}),
    }
    log.write_csv(out / "training_log.csv")
    log.write_figure(out / "loss_curves.html")
    write_json_atomic(out / "training_summary.json", summary)
    tmp = out / "README.md.tmp"
    tmp.write_text(model_card(summary, accuracies))
    os.replace(tmp, out / "README.md")
    return summary
