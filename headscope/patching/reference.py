"""Slow, obviously-correct twins of the fast scorers: one head at a time, full forwards, full logits.

Each patched run here is a complete ``model(ids)`` call with hooks on the output projections, and the
metric is read from the model's real logits. No prefix caching, no batching across heads, no shortcut
unembedding. Tests assert the fast scorers equal these.
"""

from __future__ import annotations

import torch

from headscope.models import LoadedModel
from headscope.patching.common import prepare
from headscope.patching.engine import head_view, patched_head_outputs
from headscope.probes.base import Probe


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """``(N, T, V)`` logits -> ``(N,)`` float32 logit(answer) - logit(wrong) at the last position."""
    last = logits[:, -1].float()
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, answer] - last[rows, wrong]


@torch.no_grad()
def patched_logit_diff(lm: LoadedModel, ids: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor, patches: dict) -> torch.Tensor:
    """One full forward of ``ids`` with ``patches`` (layer -> fn on the head outputs); ``(N,)`` logit diffs."""
    with patched_head_outputs(lm, patches):
        logits = lm.model(ids, use_cache=False).logits
    return logit_diff(logits, answer, wrong)


def _copy_head(source: torch.Tensor, head: int, n_heads: int, position: int | None = None):
    def patch(z: torch.Tensor) -> torch.Tensor:
        out = head_view(z.clone(), n_heads)
        src = head_view(source, n_heads)
        if position is None:
            out[:, :, head] = src[:, :, head]
        else:
            out[:, position, head] = src[:, position, head]
        return out.view(z.shape)

    return patch


def _freeze(source: torch.Tensor):
    return lambda z: source.to(z.dtype)


@torch.no_grad()
def reference_scores(lm: LoadedModel, probe: Probe, *, method: str = "activation", noising: bool = False) -> torch.Tensor:
    """One full forward per head.

    Args:
        method: ``"activation"`` (total effect) or ``"direct"`` (later heads frozen to the base run).
    Returns:
        ``(n_layers, n_heads)`` float32 normalised scores.
    """
    run = prepare(lm, probe, noising)
    tensors = probe.tensors(lm.device)
    fp = lm.fingerprint
    out = torch.zeros(fp.n_layers, fp.n_heads)
    for layer in range(fp.n_layers):
        for head in range(fp.n_heads):
            patches = {layer: _copy_head(run.source.z[layer], head, fp.n_heads)}
            if method == "direct":
                patches.update({later: _freeze(run.base.z[later]) for later in range(layer + 1, fp.n_layers)})
            ld = patched_logit_diff(lm, run.base_ids, tensors["answer"], tensors["wrong"], patches)
            out[layer, head] = ld.mean().cpu()
    return run.normalise(out)


@torch.no_grad()
def reference_scores_by_position(lm: LoadedModel, probe: Probe, *, noising: bool = False) -> torch.Tensor:
    """One full forward per (head, position); ``(n_layers, n_heads, T)`` normalised scores."""
    run = prepare(lm, probe, noising)
    tensors = probe.tensors(lm.device)
    fp = lm.fingerprint
    out = torch.zeros(fp.n_layers, fp.n_heads, probe.length)
    for layer in range(fp.n_layers):
        for head in range(fp.n_heads):
            for pos in range(probe.length):
                patches = {layer: _copy_head(run.source.z[layer], head, fp.n_heads, pos)}
                ld = patched_logit_diff(lm, run.base_ids, tensors["answer"], tensors["wrong"], patches)
                out[layer, head, pos] = ld.mean().cpu()
    return run.normalise(out)
