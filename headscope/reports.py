"""Plotly figures of head scores, fused rankings and masks, and one self-contained HTML report.

Every figure function *returns* a ``plotly.graph_objects.Figure`` and writes nothing; the CLI writes
the HTML. Conventions shared by all views:

* layer x head heatmaps put layer 0 at the top and head 0 on the left; thin vertical lines separate
  key/value groups (GQA), because the KV-cache cost of a mask is decided per group;
* raw scores use a diverging scale centred at 0 (red = positive, blue = negative): the sign says
  whether restoring the head helps or hurts the metric; hovering shows the head, its KV group, the
  score and its rank by ``|score|`` (1 = most important, as the fuser sees it);
* the grid of several probes/methods divides each matrix by its own ``max |score|`` (shared scale
  -1..1) so probes of different magnitude stay readable; hover still shows the raw score.

``sender_receiver`` shows path patching as a heatmap, receivers as columns and the ``top_n`` senders
(by their largest ``|score|`` over all receivers) as rows; a heatmap keeps signs and scales to many
receivers, which a Sankey diagram does not. ``build_report_html`` inlines plotly.js once (the machines
that read reports may have no internet) and assembles title, summary tables and all figures.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from headscope.fusion import FusedRanking, describe, fuse
from headscope.heads import Head, HeadMask, HeadscopeError, HeadScores, ModelFingerprint
from headscope.maskfile import ranking_from_mask

if TYPE_CHECKING:  # patching pulls in the model code; the figures only need str-able receivers
    from headscope.patching.path import Receiver

DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
CELL_PX = 22  # height of one row in the sender view and the smallest layer row in heatmaps
ROW_GAP_PX = 120  # between grid rows: tick labels, axis title, next subplot title
MARGIN_PX = {"t": 90, "b": 60}
LEGEND_COLUMNS, LEGEND_ROW_PX = 3, 24  # the per-layer distribution's legend, below the plot


def magnitude_ranks(values: torch.Tensor) -> torch.Tensor:
    """``(L, H)`` long ranks of ``|values|``: 1 = largest, ties by (layer, head) as in ``HeadScores.top``."""
    flat = values.abs().flatten()
    ranks = torch.empty_like(flat, dtype=torch.long)
    ranks[torch.argsort(flat, descending=True, stable=True)] = torch.arange(1, flat.numel() + 1)
    return ranks.view(values.shape)


def _customdata(fp: ModelFingerprint, values: torch.Tensor, ranks: torch.Tensor) -> list:
    """``[L][H][4]``: head label, KV group, value, rank, for hover templates."""
    return [
        [[f"L{l}H{h}", fp.kv_group(h), float(values[l, h]), int(ranks[l, h])] for h in range(fp.n_heads)]
        for l in range(fp.n_layers)
    ]


def _hover(value_name: str, total: int) -> str:
    return (f"<b>%{{customdata[0]}}</b><br>KV group %{{customdata[1]}}<br>{value_name} %{{customdata[2]:.4g}}"
            f"<br>rank %{{customdata[3]}} / {total}<extra></extra>")


def _layer_head_axes(fig: go.Figure, fp: ModelFingerprint, row: int | None = None, col: int | None = None) -> None:
    """Layer 0 at the top, integer ticks, and dotted lines between KV groups."""
    where = {"row": row, "col": col} if row is not None else {}
    fig.update_yaxes(autorange="reversed", title_text="layer", dtick=1 if fp.n_layers <= 16 else None, **where)
    fig.update_xaxes(title_text="head", dtick=1 if fp.n_heads <= 16 else None, **where)
    if fp.group_size > 1 and fp.n_kv_heads > 1:
        for group in range(1, fp.n_kv_heads):
            fig.add_vline(x=group * fp.group_size - 0.5, line_width=1, line_dash="dot", line_color="rgba(0,0,0,0.35)", **where)


def _row_px(fp: ModelFingerprint, cols: int = 1) -> int:
    """Height of one layer row, so cells are neither flat strips nor tall slivers (page ~1000 px wide)."""
    smallest = CELL_PX if cols == 1 else 14
    return min(48, max(smallest, 400 // (fp.n_heads * cols)))


def _heatmap_height(fp: ModelFingerprint, rows: int = 1, cols: int = 1) -> int:
    """Figure height for a ``rows`` x ``cols`` grid of layer x head heatmaps (plot areas, gaps, margins)."""
    return rows * _row_px(fp, cols) * fp.n_layers + (rows - 1) * ROW_GAP_PX + MARGIN_PX["t"] + MARGIN_PX["b"]


def heatmap(scores: HeadScores, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of one ``HeadScores``, diverging colours centred at 0.

    Args:
        scores: ``(L, H)`` scores.
        title: figure title (default: probe, method, capability).
    Returns:
        a Figure with one ``Heatmap`` trace of shape ``(L, H)``.
    """
    fp = scores.fingerprint
    trace = go.Heatmap(
        z=scores.values.tolist(), colorscale=DIVERGING, zmid=0, colorbar={"title": {"text": "score"}},
        customdata=_customdata(fp, scores.values, magnitude_ranks(scores.values)), hovertemplate=_hover("score", scores.values.numel()),
    )
    fig = go.Figure(trace)
    _layer_head_axes(fig, fp)
    fig.update_layout(title=title or f"{scores.probe} · {scores.method} ({scores.capability or 'no capability'})", height=_heatmap_height(fp), margin=MARGIN_PX)
    return fig


def heatmap_grid(scores: Sequence[HeadScores], cols: int = 2) -> go.Figure:
    """Heatmaps of several probes/methods side by side, each scaled by its own ``max |score|``.

    Returns:
        a Figure with one ``Heatmap`` per input (shared colour axis, -1..1).
    """
    if not scores:
        raise HeadscopeError("no scores to plot")
    fp = scores[0].fingerprint
    cols = max(1, min(cols, len(scores)))
    rows = math.ceil(len(scores) / cols)
    titles = [f"{s.probe} · {s.method} ({s.capability or '-'})" for s in scores]
    plot_area = _heatmap_height(fp, rows, cols) - MARGIN_PX["t"] - MARGIN_PX["b"]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=ROW_GAP_PX / plot_area if rows > 1 else 0.0)
    for index, item in enumerate(scores):
        row, col = index // cols + 1, index % cols + 1
        scale = float(item.values.abs().max()) or 1.0
        fig.add_trace(go.Heatmap(
            z=(item.values / scale).tolist(), coloraxis="coloraxis", name=titles[index],
            customdata=_customdata(fp, item.values, magnitude_ranks(item.values)), hovertemplate=_hover("score", item.values.numel()),
        ), row=row, col=col)
        _layer_head_axes(fig, fp, row, col)
    fig.update_layout(
        coloraxis={"colorscale": DIVERGING, "cmin": -1, "cmax": 1, "colorbar": {"title": {"text": "score / max|score|"}}},
        height=_heatmap_height(fp, rows, cols), margin=MARGIN_PX, title="Scores per probe and method",
    )
    return fig


def fused_heatmap(ranking: FusedRanking | None, mask: HeadMask | None = None, title: str | None = None) -> go.Figure:
    """The fused importance (sequential colours) with the mask's full-attention heads outlined.

    Args:
        ranking: the fused ranking, or None to draw the mask alone.
        mask: optional; full-attention heads get open white squares, KV groups kept get dashed boxes.
    Returns:
        a Figure: one ``Heatmap`` plus, with a mask, one ``Scatter`` of the full-attention heads.
    """
    if ranking is None and mask is None:
        raise HeadscopeError("fused_heatmap needs a ranking or a mask")
    fp = ranking.fingerprint if ranking is not None else mask.fingerprint
    if ranking is not None:
        values, ranks = ranking.values, ranking.ranks()
        trace = go.Heatmap(z=values.tolist(), colorscale=SEQUENTIAL, colorbar={"title": {"text": "fused"}},
                           customdata=_customdata(fp, values, ranks), hovertemplate=_hover("fused", values.numel()))
    else:
        values = mask.full.float()
        trace = go.Heatmap(z=values.tolist(), colorscale=[[0, "#d9d9d9"], [1, "#2b6cb0"]], showscale=False,
                           customdata=_customdata(fp, values, magnitude_ranks(values)), hovertemplate=_hover("full", values.numel()))
    fig = go.Figure(trace)
    _layer_head_axes(fig, fp)
    if mask is not None:
        heads = mask.heads()
        fig.add_trace(go.Scatter(
            x=[h.head for h in heads], y=[h.layer for h in heads], mode="markers", name=f"full attention ({len(heads)})",
            marker={"symbol": "square-open", "size": int(0.6 * _row_px(fp)), "color": "white", "line": {"width": 2.5}},
            hovertemplate="<b>L%{y}H%{x}</b> full attention<extra></extra>",
        ))
        if fp.group_size > 1:
            kept = mask.kv_groups_full().nonzero().tolist()
            for index, (layer, group) in enumerate(kept):
                fig.add_shape(type="rect", x0=group * fp.group_size - 0.5, x1=(group + 1) * fp.group_size - 0.5,
                              y0=layer - 0.5, y1=layer + 0.5, line={"color": "#ff7f0e", "width": 1.5},
                              name=f"KV group kept ({len(kept)})", legendgroup="kv", showlegend=index == 0)
    stats = f" — {mask.n_full} full heads ({mask.head_fraction:.1%}), KV cache {mask.kv_fraction:.1%}" if mask is not None else ""
    fig.update_xaxes(range=[-0.5, fp.n_heads - 0.5], autorange=False)
    fig.update_yaxes(range=[fp.n_layers - 0.5, -0.5], autorange=False)
    default_title = f"Fused ranking{stats}" if ranking is not None else f"Head mask ({mask.provenance.get('selection', {}).get('method', 'no scores')}){stats}"
    fig.update_layout(title=title or default_title, height=_heatmap_height(fp), margin=MARGIN_PX, showlegend=mask is not None,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0,
                              "bgcolor": "#4a5568", "font": {"color": "white"}})
    return fig


def receiver_label(receiver: Head | Receiver) -> str:
    """Column label of a receiver: ``L2H7`` for a ``Head`` (or a ``Receiver`` of all of q, k, v), ``L2H7:k``
    for a ``headscope.patching.Receiver`` restricted to some of its inputs."""
    if isinstance(receiver, Head):
        return str(receiver)
    if not isinstance(getattr(receiver, "head", None), Head):
        raise HeadscopeError(f"a receiver must be a Head or a Receiver, got {receiver!r}")
    inputs = set(getattr(receiver, "inputs", "qkv"))
    suffix = "" if inputs == set("qkv") else ":" + "".join(i for i in "qkv" if i in inputs)
    return f"{receiver.head}{suffix}"


def sender_receiver(
    paths: Mapping[Head | Receiver, HeadScores] | torch.Tensor,
    receivers: Sequence[Head | Receiver] | None = None,
    top_n: int = 20,
) -> go.Figure:
    """Path-patching view: receivers as columns, the ``top_n`` senders as rows.

    Args:
        paths: receiver -> ``HeadScores`` of every sender, or an ``(L, H, R)`` tensor of sender scores per
            receiver (then ``receivers`` names the ``R`` columns). A receiver is a ``Head`` or a
            ``headscope.patching.Receiver``, so one head scored through different inputs (``2.7:q``,
            ``2.7:k``) gets one column each (labels from ``receiver_label``; two receivers with the same
            label are an error).
        top_n: senders shown, ranked by their largest ``|score|`` over all receivers.
    Returns:
        a Figure with one diverging ``Heatmap`` of shape ``(min(top_n, L*H), R)``.
    """
    if isinstance(paths, Mapping):
        receivers = list(paths)
        matrix = torch.stack([paths[r].values for r in receivers], dim=-1)  # (L, H, R)
    else:
        matrix = torch.as_tensor(paths, dtype=torch.float32)
        if receivers is None or matrix.dim() != 3 or matrix.shape[-1] != len(receivers):
            raise HeadscopeError("a sender matrix must be (layers, heads, receivers) with one receiver Head per column")
    if not receivers:
        raise HeadscopeError("no receivers to plot")
    n_layers, n_heads, _ = matrix.shape
    flat = matrix.reshape(n_layers * n_heads, -1)  # (senders, R)
    best = torch.argsort(flat.abs().amax(-1), descending=True, stable=True)[: max(1, top_n)]
    senders = [f"L{int(i) // n_heads}H{int(i) % n_heads}" for i in best]
    columns = [receiver_label(r) for r in receivers]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise HeadscopeError(f"receivers {', '.join(repeated)} appear more than once (one column per receiver and input set)")
    fig = go.Figure(go.Heatmap(
        z=flat[best].tolist(), x=columns, y=senders, colorscale=DIVERGING, zmid=0, colorbar={"title": {"text": "path score"}},
        hovertemplate="sender <b>%{y}</b> → receiver <b>%{x}</b><br>score %{z:.4g}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title_text=f"sender (top {len(senders)})", type="category")
    fig.update_xaxes(title_text="receiver", type="category")
    fig.update_layout(title="Path patching: senders → receivers", height=max(320, CELL_PX * len(senders) + 160))
    return fig


def layer_distributions(scores: HeadScores | Sequence[HeadScores], kind: str = "box") -> go.Figure:
    """Per-layer distribution of head scores: one box (or violin) trace per input, grouped by layer.

    Returns:
        a Figure with one ``Box``/``Violin`` trace per ``HeadScores``; x = layer, y = score.
    """
    items = [scores] if isinstance(scores, HeadScores) else list(scores)
    if kind not in ("box", "violin"):
        raise HeadscopeError(f"unknown distribution kind {kind!r}; choose box or violin")
    fig = go.Figure()
    for item in items:
        n_layers, n_heads = item.shape
        common = {
            "x": [l for l in range(n_layers) for _ in range(n_heads)], "y": item.values.flatten().tolist(),
            "name": f"{item.probe} · {item.method}", "customdata": [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)],
            "hovertemplate": "<b>%{customdata}</b><br>score %{y:.4g}<extra>%{fullData.name}</extra>",
        }
        fig.add_trace(go.Box(boxpoints="outliers", **common) if kind == "box" else go.Violin(points="outliers", **common))
    # The legend (one entry per input) sits below the plot and the figure grows with it, so no entry is cut off.
    legend_rows = -(-len(items) // LEGEND_COLUMNS)
    fig.update_layout(boxmode="group", violinmode="group", title="Score distribution per layer", height=420 + LEGEND_ROW_PX * legend_rows,
                      xaxis={"title": {"text": "layer"}, "dtick": 1}, yaxis={"title": {"text": "score"}, "zeroline": True},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0,
                              "entrywidth": 1.0 / LEGEND_COLUMNS, "entrywidthmode": "fraction"})
    return fig


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1320px; color: #1a202c; }
h1 { margin-bottom: 4px; } .subtitle { color: #4a5568; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 14px; }
th, td { border: 1px solid #cbd5e0; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #edf2f7; } code { font-size: 13px; } .figure { margin: 12px 0 28px; }
"""


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are already escaped. ``header=None``: key-value rows with the key as ``th``."""
    if header is None:
        body = "".join(f"<tr><th>{key}</th><td>{value}</td></tr>" for key, value in rows)
        return f"<table><tbody>{body}</tbody></table>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mask_rows(mask: HeadMask) -> list[tuple[str, str]]:
    selection = mask.provenance.get("selection", {})
    fusion = mask.provenance.get("fusion") or {}
    groups = mask.kv_groups_full()
    per_layer = ", ".join(f"L{l}: {int(n)}" for l, n in enumerate(mask.full.sum(1).tolist()))
    rows = [
        ("selection", html.escape(str(selection.get("method", "unknown")))),
        ("ratio (linear:full)", html.escape(str(mask.provenance.get("ratio") or "explicit count"))),
        ("full-attention heads", f"{mask.n_full} of {mask.full.numel()} ({mask.head_fraction:.1%})"),
        ("KV cache kept", f"{int(groups.sum())} of {groups.numel()} KV groups ({mask.kv_fraction:.1%})"),
        ("per layer", html.escape(per_layer)),
    ]
    for key in ("min_per_layer", "kv_aware", "group_score", "seed"):
        if key in selection:
            rows.append((key.replace("_", " "), html.escape(str(selection[key]))))
    if fusion:
        rows.append(("fusion", html.escape(f"{fusion.get('normalisation')} / {fusion.get('rule')}")))
    if mask.provenance.get("probes"):
        rows.append(("probes", html.escape(", ".join(dict.fromkeys(mask.provenance["probes"])))))  # older masks list a probe per method
    return rows


def _head_list(heads: Sequence[Head], mask: HeadMask | None, labels: Sequence[str] | None = None) -> str:
    """Heads as code, bold where the mask keeps them at full attention."""
    labels = labels or [str(h) for h in heads]
    cells = [f"<b>{html.escape(t)}</b>" if mask is not None and h in mask else html.escape(t) for h, t in zip(heads, labels)]
    return "<code>" + " ".join(cells) + "</code>"


def _coverage(heads: Sequence[Head], mask: HeadMask | None) -> str:
    return "-" if mask is None else f"{sum(h in mask for h in heads)}/{len(heads)}"


def _capability_rows(scores: Sequence[HeadScores], ranking: FusedRanking | None, mask: HeadMask | None, top_k: int = 10) -> list[tuple[str, ...]]:
    """Per capability: its inputs fused with the ranking's own normalisation and rule."""
    provenance = ranking.provenance if ranking is not None else {}
    options = {"normalise": provenance.get("normalisation", "rank"), "rule": provenance.get("rule", "mean")}
    if "rrf_k" in provenance:
        options["rrf_k"] = provenance["rrf_k"]
    rows = []
    for capability in dict.fromkeys(s.capability for s in scores):
        members = [s for s in scores if s.capability == capability]
        top = fuse(members, **options).top(top_k)
        inputs = ", ".join(f"{s.probe}/{s.method}" for s in members)
        rows.append((html.escape(capability or "-"), html.escape(inputs), _head_list(top, mask), _coverage(top, mask)))
    return rows


def _input_rows(scores: Sequence[HeadScores], mask: HeadMask | None, top_k: int = 5) -> list[tuple[str, ...]]:
    rows = []
    for s in scores:
        top = s.top(top_k)
        rows.append((html.escape(s.probe), html.escape(s.method), html.escape(s.capability or "-"), f"{float(s.values.abs().max()):.4g}",
                     _head_list(top, mask, [f"{h}={s[h]:+.3g}" for h in top]), _coverage(top, mask)))
    return rows


def build_report_html(
    scores: Sequence[HeadScores],
    mask: HeadMask | None = None,
    ranking: FusedRanking | None = None,
    title: str = "headscope report",
    paths: Mapping[Head | Receiver, HeadScores] | None = None,
) -> str:
    """One self-contained HTML page: title, summary tables and every figure, plotly.js inlined once.

    Args:
        scores: the per-probe/method scores (may be empty when a mask is given). ``rope`` scores (RoPE dependence,
            not importance) are drawn and listed with the others but left out of the ranking and the per-capability
            tops, as ``headscope fuse`` leaves them out.
        mask: optional head mask, outlined on the fused heatmap and summarised.
        ranking: the fused ranking; default the one stored in the mask, else ``fuse(scores)``.
        title: page title.
        paths: optional path-patching results (receiver ``Head`` or ``Receiver`` -> sender scores) for the sender view.
    Returns:
        the HTML text (about 5 MB, mostly plotly.js).
    """
    scores = list(scores)
    if not scores and mask is None:
        raise HeadscopeError("nothing to report: give scores or a mask")
    fingerprints = [(describe(s), s.fingerprint) for s in scores]
    fingerprints += [("the mask", mask.fingerprint)] if mask is not None else []
    fingerprints += [("the ranking", ranking.fingerprint)] if ranking is not None else []
    fp = fingerprints[0][1]
    for label, other in fingerprints[1:]:
        problem = fp.mismatch(other)
        if problem:
            raise HeadscopeError(f"{label} belongs to another model than {fingerprints[0][0]}: {problem}")
    if ranking is None and mask is not None and mask.provenance.get("scores") is not None:
        ranking = ranking_from_mask(mask)
    importance = [s for s in scores if s.method != "rope"]
    if ranking is None and importance:
        ranking = fuse(importance)

    if ranking is None and mask is None:
        raise HeadscopeError("nothing to rank: rope scores say which heads need RoPE, not which matter; add importance scores or a mask")
    figures = [fused_heatmap(ranking, mask)]
    if scores:
        figures += [heatmap_grid(scores), layer_distributions(scores)]
    if paths:
        figures.append(sender_receiver(paths))
    divs = [fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}", config={"responsive": True})
            for i, fig in enumerate(figures)]

    sections = []
    if mask is not None:
        sections.append("<h2>Head mask</h2>" + _table(None, _mask_rows(mask)))
    if importance:
        note = "<p>Heads in <b>bold</b> keep full attention in the mask.</p>" if mask is not None else ""
        sections.append("<h2>Top heads per capability</h2>" + note + _table(
            ("capability", "inputs", "top heads (inputs fused as in the ranking)", "in mask"), _capability_rows(importance, ranking, mask)))
    if scores:
        sections.append("<h2>Inputs</h2>" + _table(
            ("probe", "method", "capability", "max |score|", "top heads (signed score)", "in mask"), _input_rows(scores, mask)))
    geometry = f"{fp.name or fp.architecture}: {fp.n_layers} layers × {fp.n_heads} heads, {fp.n_kv_heads} KV heads, head dim {fp.head_dim}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>", f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head><body>",
        f"<h1>{html.escape(title)}</h1>", f'<p class="subtitle">{html.escape(geometry)}</p>', *sections,
        "<h2>Figures</h2>", *(f'<div class="figure">{div}</div>' for div in divs), "</body></html>",
    ])
