"""Quality of a causal LM (original or hybrid) across context lengths, and what its cache costs.

Used by ``benchmarks/hybrid_quality.py`` and ``notebooks/04_transfer_and_quality.ipynb``:

* ``probe_grid`` builds every (probe, length) once; ``grid_accuracy`` scores a model on all of them with
  ``headscope.zoo.evaluate.probe_accuracy`` (per clean prompt: is the answer the argmax over the
  vocabulary, ``argmax``; does its logit beat the corrupt prompt's answer, ``beats_wrong``, chance 0.5).
  The headline accuracy is ``argmax``, an exact-answer score like RULER's.
* ``heldout_loss``: mean next-token cross-entropy on held-out rows of the demo corpus.
* ``evaluate_quality``: all of it for one model (original or hybrid): the accuracy grid, held-out CE at
  each length (and, when asked, on the held-out documents of each kind alone), FA-head share, KV groups
  and cache sizes, evaluation time.
* ``kv_cache_bytes_per_token``: the KV cache a mask keeps, per token: for every layer the KV groups that
  hold at least one full-attention head (a group with one FA head keeps its whole K and V), times
  ``head_dim x 2 (K and V) x dtype bytes``. ``recurrent_state_bytes`` is the constant per-sequence state
  of the Gated DeltaNet heads (a ``D x D`` float32 matrix each, plus the short-convolution window of the
  model's own ``conv_size``).
* ``results_markdown`` and ``accuracy_figure`` turn a results mapping (the benchmark's JSON, layout in
  ``benchmarks/hybrid_quality_results.py``) into an arm x metric table and accuracy-vs-length curves;
  ``shared_with_fused`` gives each arm's heads and KV groups in common with the selected mask;
  ``arm_switches`` the ``build_hybrid`` switches an arm was trained with (an ``options`` column when any
  arm has some).

Evaluation runs under bf16 autocast on CUDA and in float32 on the CPU (``autocast_for``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from headscope.heads import HeadMask, ModelFingerprint
from headscope.maskfile import mask_from_dict
from headscope.probes import Probe, make_probe
from headscope.transfer.losses import next_token_loss
from headscope.zoo.evaluate import probe_accuracy

RETRIEVAL_PROBES = ("needle_single", "needle_multikey", "kv_recall")
REASONING_PROBES = ("multihop", "ioi", "comparison")
TOKENS_PER_BATCH = 1 << 16  # prompts per forward = max(1, this // length)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def kv_cache_bytes_per_token(fingerprint: ModelFingerprint, mask: HeadMask | None = None, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token: sum over layers of KV groups kept x head_dim x 2 (K, V) x ``dtype_bytes``.

    Args:
        fingerprint: the model.
        mask: the hybrid's head mask; None for the original model (every group kept).
        dtype_bytes: bytes per cached element (2 for bf16/fp16).
    """
    groups = fingerprint.n_layers * fingerprint.n_kv_heads if mask is None else int(mask.kv_groups_full().sum())
    return groups * fingerprint.head_dim * 2 * dtype_bytes


def recurrent_state_bytes(fingerprint: ModelFingerprint, mask: HeadMask | None = None, conv_size: int = 4, dtype_bytes: int = 2) -> int:
    """Constant per-sequence state of the GDN heads: ``D x D`` float32 each, plus the q/k/v conv window.

    Args:
        fingerprint: the model.
        mask: the head mask (None: the original model, no GDN head, 0 bytes).
        conv_size: the short convolution's kernel (its window holds ``conv_size`` inputs of ``3 D`` channels).
        dtype_bytes: bytes per conv-window element.
    """
    if mask is None:
        return 0
    n_gdn = int((~mask.full).sum())
    d = fingerprint.head_dim
    return n_gdn * (d * d * 4 + 3 * d * conv_size * dtype_bytes)


def probe_grid(tokenizer: Any, names: Iterable[str], lengths: Iterable[int], n_pairs: int, seed: int) -> dict[tuple[str, int], Probe]:
    """Every built-in probe of ``names`` at every length (``make_probe``), deterministic for ``seed``.

    Returns:
        ``{(name, length): Probe}`` in (name, length) order.
    """
    grid = [(name, length) for name in names for length in lengths]
    return {key: make_probe(key[0], tokenizer, length=key[1], n_pairs=n_pairs, seed=seed)
            for key in tqdm(grid, desc="build probes", leave=False)}


@torch.no_grad()
def grid_accuracy(model: nn.Module, grid: Mapping[tuple[str, int], Probe], progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """Score ``model`` on every probe of a ``probe_grid``.

    Args:
        model: a causal LM on its device (put in eval mode for the call).
        grid: ``{(name, length): Probe}``.
    Returns:
        ``{name: {str(length): {"argmax", "beats_wrong", "logit_diff"}}}``.
    """
    device = next(model.parameters()).device
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, length), probe in tqdm(grid.items(), desc="probe accuracy", leave=False, disable=not progress):
        with autocast_for(device):
            score = probe_accuracy(model, probe, batch_size=max(1, TOKENS_PER_BATCH // length))
        out.setdefault(name, {})[str(length)] = {"argmax": score.argmax, "beats_wrong": score.beats_wrong,
                                                 "logit_diff": score.mean_logit_diff}
    return out


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on ``rows`` ``(N, T)`` (each row weighs the same)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch = max(1, TOKENS_PER_BATCH // rows.shape[1])
    total = 0.0
    try:
        for chunk in rows.split(batch):
            chunk = chunk.to(device)
            with autocast_for(device):
                logits = model(input_ids=chunk, use_cache=False).logits  # (b, T, V)
            total += float(next_token_loss(logits, chunk)) * chunk.shape[0]
    finally:
        model.train(was_training)
    return total / rows.shape[0]


def evaluate_quality(model: nn.Module, fingerprint: ModelFingerprint, mask: HeadMask | None, grid: Mapping[tuple[str, int], Probe],
                     heldout: Mapping[int, torch.Tensor], progress: bool = True,
                     heldout_by_kind: Mapping[str, Mapping[int, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Accuracy grid, held-out CE, FA share and cache sizes of one model.

    Args:
        model: a causal LM on its device.
        fingerprint: the original model's layout.
        mask: the hybrid's head mask; None for the original model.
        grid: a ``probe_grid``.
        heldout: ``{length: rows (N, length)}`` for ``heldout_loss``.
        progress: show the accuracy progress bar.
        heldout_by_kind: ``{kind: {length: rows}}``: the held-out rows of each document kind alone.
    Returns:
        ``n_full``, ``fa_head_share``, ``kv_fraction``, ``kv_groups``, ``kv_bytes_per_token`` (bf16),
        ``gdn_state_bytes_per_sequence``, ``heldout_loss`` ``{str(length): CE}``, with ``heldout_by_kind``
        ``heldout_loss_by_kind`` ``{kind: {str(length): CE}}``, ``accuracy`` (``grid_accuracy``) and ``eval_seconds``.
    """
    fp = fingerprint
    started = time.perf_counter()
    record = {
        "n_full": fp.n_layers * fp.n_heads if mask is None else mask.n_full,
        "fa_head_share": 1.0 if mask is None else mask.head_fraction,
        "kv_fraction": 1.0 if mask is None else mask.kv_fraction,
        "kv_groups": fp.n_layers * fp.n_kv_heads if mask is None else int(mask.kv_groups_full().sum()),
        "kv_bytes_per_token": kv_cache_bytes_per_token(fp, mask),
        # the model's own conv window: a hybrid built with another conv_size holds another state
        "gdn_state_bytes_per_sequence": recurrent_state_bytes(fp, mask, getattr(getattr(model, "config", None), "conv_size", 4)),
        "heldout_loss": {str(length): heldout_loss(model, rows) for length, rows in heldout.items()},
    }
    if heldout_by_kind:
        record["heldout_loss_by_kind"] = {kind: {str(length): heldout_loss(model, rows) for length, rows in by_length.items()}
                                          for kind, by_length in heldout_by_kind.items()}
    record["accuracy"] = grid_accuracy(model, grid, progress=progress)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    record["eval_seconds"] = round(time.perf_counter() - started, 2)
    return record


# --- reading a results mapping ---------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def probe_groups(settings: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The retrieval and reasoning probes a results mapping averages (its settings, else the defaults)."""
    return {"retrieval": tuple(settings.get("retrieval_probes", RETRIEVAL_PROBES)),
            "reasoning": tuple(settings.get("reasoning_probes", REASONING_PROBES))}


def capability_means(arm: Mapping[str, Any], length: int, metric: str = "argmax",
                     groups: Mapping[str, Iterable[str]] | None = None) -> dict[str, float]:
    """Mean accuracy over the retrieval and over the reasoning probes of one arm at one length.

    Args:
        groups: ``{"retrieval": probes, "reasoning": probes}`` (default ``RETRIEVAL_PROBES``, ``REASONING_PROBES``).
    """
    groups = groups or {"retrieval": RETRIEVAL_PROBES, "reasoning": REASONING_PROBES}
    acc = arm.get("accuracy") or {}
    pick = lambda names: [acc[n][str(length)][metric] for n in names if n in acc and str(length) in acc[n]]  # noqa: E731
    return {capability: _mean(pick(names)) for capability, names in groups.items()}


def heldout_columns(settings: Mapping[str, Any]) -> list[str]:
    """The extra held-out CE of a results mapping, in column order: each ``--heldout-kinds`` kind, then
    ``eval:<name>`` for each evaluation-only text (``--eval-data``); keys of ``heldout_loss_by_kind``."""
    return list(settings.get("heldout_kinds", [])) + [f"eval:{entry['name']}" for entry in settings.get("eval_data", [])]


def shared_with_fused(results: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Per arm with a mask: (FA heads, KV groups) it shares with the results' fused (selected) mask.

    Empty when the results hold no fused mask. How far a random mask overlaps the selected one says what a
    comparison between them tests: a layer-matched random mask shares whole layers with it.
    """
    if not results.get("fused_mask"):
        return {}
    fused = mask_from_dict(results["fused_mask"], "fused_mask")
    return {name: mask_from_dict(arm["mask"], name).shared_with(fused) for name, arm in results["arms"].items() if arm.get("mask")}


def arm_switches(arm: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``build_hybrid`` switches a hybrid arm was trained with beyond the defaults: the run's
    ``--hybrid-option`` ones (settings ``hybrid_options``) updated by the arm's own (record ``hybrid_options``)."""
    return {**settings.get("hybrid_options", {}), **arm.get("hybrid_options", {})}


def format_switches(switches: Mapping[str, Any]) -> str:
    """``key=value`` (JSON values) sorted by key, comma-separated; "" for none."""
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(switches.items()))


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _length_label(length: int, base: int) -> str:
    return f"{length} ({length // base}x)" if length % base == 0 else str(length)


def results_markdown(results: Mapping[str, Any], metric: str = "argmax") -> str:
    """The results as markdown: a summary table (arm x metric) and one accuracy table per length.

    Args:
        results: the benchmark's results mapping (``settings``, ``budget``, ``arms`` in run order).
        metric: ``"argmax"`` or ``"beats_wrong"``.
    """
    settings, arms = results["settings"], results["arms"]
    lengths, base = settings["lengths"], settings["teacher_length"]
    groups = probe_groups(settings)
    probes = [p for p in groups["retrieval"] + groups["reasoning"] if p in settings["probes"]]
    lines = [f"# Hybrid quality on {settings['model_name']}", ""]
    lines += [f"- {line}" for line in results.get("notes", [])]
    lines += ["", f"Accuracy = {metric} (answer is the argmax over the vocabulary)" if metric == "argmax"
              else f"Accuracy = {metric} (answer logit beats the corrupt answer's; chance 0.5)", ""]
    held = [str(n * base) for n in (1, 2)]
    kinds = heldout_columns(settings)
    lines += [f"Retrieval = mean of {', '.join(groups['retrieval'])}; reasoning = mean of {', '.join(groups['reasoning'])}."]
    if settings.get("heldout_kinds"):
        lines.append(f"Held-out CE <kind>: on the held-out documents of that kind alone ({', '.join(settings['heldout_kinds'])}).")
    if settings.get("eval_data"):
        lines.append("Held-out CE eval:<name>: on the evaluation-only text <name>, never trained on ("
                     + ", ".join(f"{e['name']}: sha256 {e['sha256']}" for e in settings["eval_data"]) + ").")
    lines.append("")
    shared = shared_with_fused(results)
    if shared:
        lines += ["`shared`: full-attention heads (KV groups) in common with the fused (selected) mask.", ""]
    switches = {name: format_switches(arm_switches(arm, settings)) for name, arm in arms.items() if arm.get("kind") != "teacher"}
    if any(switches.values()):
        lines += ["`options`: the build_hybrid switches an arm was trained with beyond the defaults (--hybrid-option for every arm, "
                  "--arm-option per arm family; fa_rope=true: the head-wise FA heads keep RoPE).", ""]
    header = (["arm", "status"] + (["options"] if any(switches.values()) else []) + ["FA heads", "FA share", "KV B/token", "KV vs teacher"]
              + (["shared"] if shared else [])
              + [f"held-out CE {h}" for h in held]
              + [f"held-out CE {kind} {h}" for kind in kinds for h in held]
              + [f"retrieval {_length_label(n, base)}" for n in lengths] + [f"reasoning {_length_label(n, base)}" for n in lengths])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher_kv = next((a["kv_bytes_per_token"] for a in arms.values() if a.get("kind") == "teacher"), None)
    for name, arm in arms.items():
        means = [capability_means(arm, n, metric, groups) for n in lengths]
        kv = arm.get("kv_bytes_per_token")
        row = [name, arm.get("status", "?")] + ([switches.get(name) or ("defaults" if name in switches else "—")] if any(switches.values()) else [])
        row += [str(arm.get("n_full", "—")), _cell(arm.get("fa_head_share")), str(kv if kv is not None else "—"),
                _cell(kv / teacher_kv if kv is not None and teacher_kv else None)]
        if shared:
            row.append("{} ({})".format(*shared[name]) if name in shared else "all" if arm.get("kind") == "teacher" else "—")
        row += [_cell((arm.get("heldout_loss") or {}).get(h), 3) for h in held]
        row += [_cell((arm.get("heldout_loss_by_kind") or {}).get(kind, {}).get(h), 3) for kind in kinds for h in held]
        row += [_cell(m["retrieval"]) for m in means] + [_cell(m["reasoning"]) for m in means]
        lines.append("| " + " | ".join(row) + " |")
    for length in lengths:
        lines += ["", f"## Accuracy at {_length_label(length, base)} tokens", ""]
        head = ["arm"] + probes + ["retrieval mean", "reasoning mean"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, arm in arms.items():
            acc = arm.get("accuracy") or {}
            means = capability_means(arm, length, metric, groups)
            cells = [_cell(acc.get(p, {}).get(str(length), {}).get(metric)) for p in probes]
            lines.append("| " + " | ".join([name] + cells + [_cell(means["retrieval"]), _cell(means["reasoning"])]) + " |")
    problems = [(name, arm) for name, arm in arms.items() if arm.get("status") != "done"]
    if problems:
        lines += ["", "## Arms without results", ""]
        lines += [f"- **{name}**: {arm.get('status')}: {arm.get('error', '')}" for name, arm in problems]
    return "\n".join(lines) + "\n"


def accuracy_figure(results: Mapping[str, Any], metric: str = "argmax"):
    """Accuracy against context length, one line per arm, one panel per probe and per capability mean.

    Returns:
        A ``plotly.graph_objects.Figure`` (2 rows: retrieval, reasoning; a column per probe, then the mean).
    """
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    settings, arms = results["settings"], results["arms"]
    lengths, base = settings["lengths"], settings["teacher_length"]
    groups = probe_groups(settings)
    cols = max(len(names) for names in groups.values()) + 1
    rows = [[*names, *[None] * (cols - 1 - len(names)), capability] for capability, names in groups.items()]
    titles = [("mean " + t) if t in groups else (t or "") for row in rows for t in row]
    figure = make_subplots(rows=2, cols=cols, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.14)
    palette = qualitative.D3
    for index, (name, arm) in enumerate(arms.items()):
        if not arm.get("accuracy"):
            continue
        color = palette[index % len(palette)]
        dash = "dot" if arm.get("kind") == "random" else ("dash" if arm.get("kind") == "teacher" else "solid")
        for r, row in enumerate(rows, start=1):
            for c, panel in enumerate(row, start=1):
                if panel is None:
                    continue
                if panel in groups:
                    ys = [capability_means(arm, n, metric, groups)[panel] for n in lengths]
                else:
                    ys = [arm["accuracy"].get(panel, {}).get(str(n), {}).get(metric) for n in lengths]
                figure.add_trace(go.Scatter(x=lengths, y=ys, mode="lines+markers", name=name, legendgroup=name,
                                            showlegend=(r, c) == (1, 1), line={"color": color, "dash": dash}), row=r, col=c)
    ticks = {"tickvals": lengths, "ticktext": [_length_label(n, base) for n in lengths], "type": "log"}
    figure.update_xaxes(**ticks)
    figure.update_yaxes(range=[-0.03, 1.03])
    figure.update_yaxes(title_text=f"accuracy ({metric})", col=1)
    figure.update_layout(title=f"Probe accuracy vs context length — {settings['model_name']} (teacher trained at {base} tokens)",
                         height=640, width=350 * cols, legend={"title": "arm"})
    return figure


def family_figure(results: Mapping[str, Any], families: Mapping[str, Mapping[str, Any]], metric: str = "argmax"):
    """Selection against chance: retrieval and reasoning vs context length, one line per arm family.

    A line is the family's mean (``headscope.seeds.family_stats``: the mean over its masks of each mask's
    mean over transfer seeds), its error bars the sd over masks (random families), and every run is
    drawn as a faint dot, so the transfer noise of a selected mask and the spread of random masks are
    both visible beside the gap between them.

    Args:
        results: the benchmark's results mapping (``settings``, ``arms``).
        families: ``family_stats(results, metric)``.
    Returns:
        A ``plotly.graph_objects.Figure`` with a retrieval and a reasoning panel.
    """
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    from headscope.seeds import arm_family, arm_metrics

    settings = results["settings"]
    lengths, base = settings["lengths"], settings["teacher_length"]
    capabilities = ("retrieval", "reasoning")
    figure = make_subplots(rows=1, cols=2, subplot_titles=[f"mean {c}" for c in capabilities], shared_yaxes=True, horizontal_spacing=0.05)
    runs: dict[str, list[dict[str, float]]] = {}
    for name, arm in results["arms"].items():
        if arm.get("status") == "done":
            runs.setdefault(arm_family(name), []).append(arm_metrics(arm, settings, metric))
    for index, (name, family) in enumerate(families.items()):
        color = qualitative.D3[index % len(qualitative.D3)]
        dash = "dash" if family["kind"] == "teacher" else ("dot" if str(family["kind"]).startswith("random") else "solid")
        n_masks, n_runs = len(family["masks"]), len(runs.get(name, []))
        label = name + (f" ({n_masks} masks, {n_runs} runs)" if n_masks > 1 else f" ({n_runs} runs)" if n_runs > 1 else "")
        for col, capability in enumerate(capabilities, start=1):
            stats = [family["metrics"].get(f"{capability}@{n}", {}) for n in lengths]
            sds = [s.get("sd") or 0.0 for s in stats]
            figure.add_trace(go.Scatter(x=lengths, y=[s.get("mean") for s in stats], mode="lines+markers", name=label, legendgroup=name,
                                        showlegend=col == 1, line={"color": color, "dash": dash},
                                        error_y={"type": "data", "array": sds, "visible": any(sds)}), row=1, col=col)
            points = [(n, run[f"{capability}@{n}"]) for run in runs.get(name, []) for n in lengths if f"{capability}@{n}" in run]
            if n_runs > 1:
                figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", legendgroup=name,
                                            showlegend=False, opacity=0.35, marker={"color": color, "size": 6}, hoverinfo="y"), row=1, col=col)
    figure.update_xaxes(tickvals=lengths, ticktext=[_length_label(n, base) for n in lengths], type="log")
    figure.update_yaxes(range=[-0.03, 1.03])
    figure.update_yaxes(title_text=f"accuracy ({metric})", col=1)
    figure.update_layout(title=f"Arm families vs context length — {settings['model_name']}: mean, sd over masks, every run",
                         height=480, width=1100, legend={"title": "family"})
    return figure
