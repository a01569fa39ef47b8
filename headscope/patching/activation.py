"""Exact activation patching of attention heads: total effect (``activation``) and direct effect (``direct``).

``activation`` (total effect, receivers and everything upstream of them): run the corrupt prompt,
overwrite one head's output (its slice of the output projection's input) with the clean run's value at
all positions, and measure the logit difference at the last position. Everything downstream of the head
reacts. This is TransformerLens' ``get_act_patch_attn_head_out_all_pos``.

``direct`` (receivers, IOI-style path patching to the logits): as above, but every *other* attention head
in later layers is frozen to its output in the base run, so the head's effect reaches the logits only
through the residual stream (and the MLPs, which still recompute). A head that matters only by steering
later heads scores ~0 here; a head that writes the answer scores high.

Both are computed exactly and fast (see ``engine``): the patched run starts from the cached residual at
the patched layer and computes only the positions after the prefix its clean and corrupt prompts share,
and heads x pairs of one layer share a batch. ``reference`` holds the slow
one-head-at-a-time twins they are tested against.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadScores
from headscope.models import LoadedModel
from headscope.patching.batching import AdaptiveBatcher, default_batch_size, whole_units
from headscope.patching.common import ProbeRun, prepare
from headscope.patching.engine import PatchFn, overwrite_heads, replace_all_heads
from headscope.patching.sharding import all_heads, map_heads, per_layer, replay_cost
from headscope.probes.base import Probe


def _layer_effects(
    run: ProbeRun, layer: int, positions: bool, freeze_later: bool, batcher: AdaptiveBatcher, bar, heads: torch.Tensor
) -> torch.Tensor:
    """Mean patched logit difference for some heads (and every position) of one layer.

    Rows compute only the positions after their pairs' shared prefix (``PatchEngine.run_items``); a
    single-position patch inside the prefix copies a value equal to the base run's, so it is not run:
    its logit difference is the base run's.

    Args:
        heads: ``(K,)`` the heads of ``layer`` to patch.
    Returns:
        ``(K,)`` or, with ``positions``, ``(K, T)`` float32, averaged over pairs.
    """
    fp, engine = run.lm.fingerprint, run.engine
    n_pairs, seq_len = run.base_ids.shape
    n_pos = seq_len if positions else 1
    device = run.base_ids.device
    head_ids = heads.to(device)
    # Items are ordered (head, position, pair), pair fastest.
    n_items = len(head_ids) * n_pos * n_pairs
    items = torch.arange(n_items, device=device)
    pair_of, head_of, pos_of = items % n_pairs, head_ids[items // (n_pos * n_pairs)], (items // n_pairs) % n_pos
    patched = run.base.metric[pair_of].clone()  # (n_items,)
    live = pos_of >= engine.shared.to(device)[pair_of] if positions else torch.ones_like(pair_of, dtype=torch.bool)

    def run_batch(rows: torch.Tensor, start: int) -> torch.Tensor:
        pairs, heads = pair_of[rows], head_of[rows]
        patches: dict[int, PatchFn] = {
            layer: overwrite_heads(run.source.z[layer][:, start:], pairs, heads, pos_of[rows] - start if positions else None, fp.n_heads)
        }
        if freeze_later:
            for later in range(layer + 1, fp.n_layers):
                patches[later] = replace_all_heads(run.base.z[later][:, start:], pairs)
        resid = run.base.resid_pre[layer][pairs, start:]  # (B, T - start, d_model)
        return engine.run_from(layer, resid, pairs, patches, start)

    progress = whole_units(bar, n_pos * n_pairs)
    progress(int((~live).sum()))
    if live.any():
        chosen = items[live]
        patched[chosen] = engine.run_items(batcher, pair_of[chosen], lambda rows, start: run_batch(chosen[rows], start), progress)
    means = patched.view(len(head_ids), n_pos, n_pairs).mean(-1)
    return means if positions else means[:, 0]


def head_effects(run: ProbeRun, heads: list[Head], positions: bool, freeze_later: bool, batcher: AdaptiveBatcher,
                 progress: bool, desc: str) -> torch.Tensor:
    """Mean patched logit difference of each of ``heads`` (one batched run per layer they touch).

    Returns:
        ``(len(heads),)`` or, with ``positions``, ``(len(heads), T)`` float32 on the CPU, in the order of ``heads``.
    """
    with tqdm(total=len(heads), desc=desc, unit="head", disable=not progress) as bar:
        return per_layer(heads, lambda layer, subset: _layer_effects(run, layer, positions, freeze_later, batcher, bar, subset))


def _scan(run: ProbeRun, positions: bool, freeze_later: bool, batch_size: int | None, progress: bool, desc: str) -> torch.Tensor:
    """Normalised scores of every head, ``(n_layers, n_heads)`` (``(n_layers, n_heads, T)`` with ``positions``)."""
    fp = run.lm.fingerprint
    batcher = AdaptiveBatcher(batch_size or default_batch_size(run.lm, run.probe.length))
    means = map_heads(all_heads(fp), lambda heads: head_effects(run, heads, positions, freeze_later, batcher, progress, desc),
                      replay_cost(fp.n_layers))
    return run.normalise(means.view(fp.n_layers, fp.n_heads, *means.shape[1:]))


def activation_effects(run: ProbeRun, heads: list[Head], batch_size: int | None, progress: bool) -> torch.Tensor:
    """Exact total effect (``activation`` score) of a subset of heads, one batched run per layer they touch.

    Args:
        run: the prepared probe.
        heads: the heads to patch, any order.
    Returns:
        ``(len(heads),)`` float32 normalised scores, in the order of ``heads``.
    """
    batcher = AdaptiveBatcher(batch_size or default_batch_size(run.lm, run.probe.length))
    means = map_heads(heads, lambda subset: head_effects(run, subset, False, False, batcher, progress, f"exact {run.probe.name}"),
                      replay_cost(run.lm.fingerprint.n_layers))
    return run.normalise(means)


def activation_scores(
    lm: LoadedModel,
    probe: Probe,
    *,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> HeadScores:
    """Total effect of each head: patch its output at all positions.

    Args:
        lm: the model (any attention implementation).
        probe: clean/corrupt prompt pairs.
        noising: patch corrupt into clean instead of clean into corrupt.
        batch_size: patched sequences per forward (default: the largest that fits).
        progress: show a progress bar over heads.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)``, normalised as in ``headscope.patching.common``.
    """
    run = prepare(lm, probe, noising)
    values = _scan(run, positions=False, freeze_later=False, batch_size=batch_size, progress=progress, desc=f"activation {probe.name}")
    return run.to_scores(values, "activation")


def direct_scores(
    lm: LoadedModel,
    probe: Probe,
    *,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> HeadScores:
    """Direct effect of each head on the answer: patch it, freeze every later attention head.

    Args and Returns as ``activation_scores``.
    """
    run = prepare(lm, probe, noising)
    values = _scan(run, positions=False, freeze_later=True, batch_size=batch_size, progress=progress, desc=f"direct {probe.name}")
    return run.to_scores(values, "direct")


def activation_scores_by_position(
    lm: LoadedModel,
    probe: Probe,
    *,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Total effect of each head at each single position (``get_act_patch_attn_head_out_by_pos``).

    Costs ``T`` times ``activation_scores``; meant for short probes.

    Returns:
        ``(n_layers, n_heads, T)`` float32 normalised scores.
    """
    run = prepare(lm, probe, noising)
    return _scan(run, positions=True, freeze_later=False, batch_size=batch_size, progress=progress, desc=f"by-position {probe.name}")
