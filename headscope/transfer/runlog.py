"""The run log (JSON lines) and its loss-curve figure.

``RUN_DIR/log.jsonl`` holds one JSON object per line:

* ``{"event": "train", "stage", "stage_index", "step", "loss", <loss parts>, "lr", "grad_norm", "tokens",
  "elapsed_s"}`` every ``log_every`` steps (and at a stage's first and last step);
* ``{"event": "eval", "stage", "stage_index", "step", "heldout_loss", "heldout_<part>", "heldout_ce",
  "teacher_ce", ...}`` every ``eval_every`` steps and at the end of each stage.

On resume the log is cut back to the checkpoint's position, so a resumed run's log reads as if it had
never stopped. ``loss_curves.html`` (one panel per stage: training loss and held-out loss against
the step) is rewritten at the end of every stage; it embeds plotly.js, so it opens offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Append-only JSON-lines log; only the main process writes (``enabled=False`` elsewhere)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path) as stream:
            return [json.loads(line) for line in stream if line.strip()]

    def truncate(self, stage_index: int, step: int) -> None:
        """Drop records after ``step`` of stage ``stage_index`` (and of later stages)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if (r["stage_index"], r["step"]) <= (stage_index, step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def write_loss_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Plot training and held-out loss per stage into a self-contained HTML file (atomically).

    Args:
        records: log records (see the module docstring).
        path: the ``.html`` file to write.
    Returns:
        The path written.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    stages: dict[int, str] = {}
    for record in records:
        stages.setdefault(record["stage_index"], record["stage"])
    order = sorted(stages)
    figure = make_subplots(rows=1, cols=max(len(order), 1), subplot_titles=[f"{i + 1}. {stages[i]}" for i in order])
    for column, index in enumerate(order, start=1):
        train = [r for r in records if r["stage_index"] == index and r["event"] == "train"]
        evals = [r for r in records if r["stage_index"] == index and r["event"] == "eval"]
        first = column == 1
        figure.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], mode="lines",
                                    name="train loss", line={"color": "#1f77b4"}, legendgroup="train", showlegend=first), row=1, col=column)
        if evals:
            figure.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["heldout_loss"] for r in evals], mode="lines+markers",
                                        name="held-out loss", line={"color": "#d62728"}, legendgroup="heldout", showlegend=first), row=1, col=column)
        figure.update_xaxes(title_text="step", row=1, col=column)
    figure.update_yaxes(title_text="loss", row=1, col=1)
    figure.update_layout(title="headscope transfer: loss per stage", height=420, width=max(460 * len(order), 560))
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    figure.write_html(tmp, include_plotlyjs=True, full_html=True)
    os.replace(tmp, target)
    return target
