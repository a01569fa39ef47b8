"""Slow, obviously-correct twins of the fast scorers: one head at a time, full forwards, full logits.

Each patched run here is a complete ``model(ids)`` call with hooks on the output projections, and the
metric is read from the model's real logits. No prefix caching, no batching across heads, no shortcut
unembedding. Tests assert the fast scorers equal these.
"""

from __future__ import annotations

import torch

from headscope.models import LoadedModel
from headscope.patching.common import prepare
from headscope.patching.engine import head_view, hooked, patched_head_outputs
from headscope.patching.path import Receiver, check_receivers, qkv_parts
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


@torch.no_grad()
def path_reference(lm: LoadedModel, probe: Probe, receivers: list[Receiver], *, noising: bool = False) -> torch.Tensor:
    """Path patching one sender at a time with full forwards (twin of ``path.path_scores``).

    Per sender: (1) a full forward of the base prompt with the sender patched and every other head frozen,
    recording the receiver layers' q/k/v projection outputs; (2) per receiver, a full base forward with
    the chosen parts of those projection outputs swapped for the recorded ones, reading the receiver
    head's output; (3) a full base forward with the receivers' outputs written, reading the logits.

    Args:
        receivers: receiver heads and their inputs.
    Returns:
        ``(n_layers, n_heads)`` float32 normalised scores; 0 for heads in or after the last receiver layer.
    """
    run = prepare(lm, probe, noising)
    tensors = probe.tensors(lm.device)
    fp = lm.fingerprint
    receivers = check_receivers(list(receivers), fp)
    last = max(r.head.layer for r in receivers)
    out = torch.zeros(fp.n_layers, fp.n_heads)
    for layer in range(last):
        later = [r for r in receivers if r.head.layer > layer]
        receiver_layers = sorted({r.head.layer for r in later})
        for sender in range(fp.n_heads):
            # (1) sender patched, all other heads frozen; record the receiver layers' projection outputs.
            patches = {l: _freeze(run.base.z[l]) for l in range(fp.n_layers)}
            patches[layer] = _copy_head(run.source.z[layer], sender, fp.n_heads)
            recorded: dict[tuple[int, int], torch.Tensor] = {}

            def record(key):
                def hook(module, args, output):
                    recorded[key] = output.clone()

                return hook

            registrations = [(proj, "post", record((l, i))) for l in receiver_layers for i, (proj, _) in enumerate(qkv_parts(lm, l))]
            with hooked(registrations), patched_head_outputs(lm, patches):
                lm.model(run.base_ids, use_cache=False)
            # (2) each receiver's output with its chosen inputs swapped in at the projection outputs.
            new_outputs: dict[int, dict[int, torch.Tensor]] = {}
            for receiver in later:
                l, h = receiver.head.layer, receiver.head.head

                def swap(key, parts, chosen):
                    def hook(module, args, output):
                        mixed = output.clone()
                        for name, cols in parts.items():
                            if name in chosen:
                                mixed[..., cols] = recorded[key][..., cols]
                        return mixed

                    return hook

                grabbed: list[torch.Tensor] = []
                registrations = [(proj, "post", swap((l, i), parts, receiver.inputs)) for i, (proj, parts) in enumerate(qkv_parts(lm, l))]
                registrations.append((lm.out_proj(l), "pre", lambda module, args: grabbed.append(head_view(args[0], fp.n_heads)[:, :, h].clone())))
                with hooked(registrations):
                    lm.model(run.base_ids, use_cache=False)
                new_outputs.setdefault(l, {})[h] = grabbed[0]
            # (3) base forward with only the receivers' outputs replaced.
            ld = patched_logit_diff(lm, run.base_ids, tensors["answer"], tensors["wrong"], {l: _write(heads, fp.n_heads) for l, heads in new_outputs.items()})
            out[layer, sender] = ld.mean().cpu()
    values = run.normalise(out)
    values[last:] = 0.0
    return values


def _write(heads: dict[int, torch.Tensor], n_heads: int):
    def patch(z: torch.Tensor) -> torch.Tensor:
        out = head_view(z.clone(), n_heads)
        for head, value in heads.items():
            out[:, :, head] = value
        return out.view(z.shape)

    return patch
