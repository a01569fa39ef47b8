"""Choose which heads keep full attention: budgets, per-layer minimums, GQA groups and baselines.

A mask keeps ``n_full`` of the ``L*H`` query heads at full attention (FA); the rest become linear
attention. The budget is a ratio ``"a:b"`` = linear:full, so ``"7:1"`` keeps ``b/(a+b) = 1/8`` of the
heads (rounded to the nearest integer, at least 1), or an explicit ``n_full``. A mask records the ratio
its heads realise (``"1000:1"`` on 48 heads keeps 1 head: ``"47:1"``, with the request kept beside it).

Selection is greedy on an importance matrix (higher = keep): first each layer's ``min_per_layer``
best heads, then the best remaining heads anywhere. For a budget with per-layer lower bounds this
greedy choice maximises the total importance of the kept heads (exchange argument; a brute-force test
checks it).

KV cache: with grouped-query attention the ``group_size`` query heads of one KV group share one key
and value cache, and the cache can only be dropped when *no* head of the group is FA. So the KV cost of
a mask is the fraction of groups with at least one FA head (``HeadMask.kv_fraction``), which can be
up to ``group_size`` times the head fraction. ``kv_aware=True`` selects whole groups instead: a group's
importance is the ``max`` of its members (default: a group holding one critical head must keep its
cache anyway, and the other heads then get FA for free) or their ``sum`` (favours groups that matter
as a whole); ``round(n_full / group_size)`` groups (at least 1) are chosen, so the head count is a
multiple of ``group_size`` and ``kv_fraction == head_fraction``. With ``kv_aware`` the per-layer
minimum is in heads and rounds up to whole groups. ``whole_layers=True`` selects whole layers the same
way (a layer's importance is the ``max`` or ``sum`` of its heads; ``round(n_full / n_heads)`` layers): a
layer-wise hybrid whose layers the scores choose, the control that asks whether a head-wise mask beats
the same scores spent on whole layers (an all-FA layer stays the pretrained attention, RoPE included).

Baselines use the same budget arithmetic: ``random_mask`` (seeded, exact budget; optionally exactly
``kv_groups`` KV groups touched, and ``kv_matched_random_mask`` matching a given mask's head and group
counts, the fair baseline of a selection that concentrates its heads in few groups),
``layer_matched_random_mask`` (the same head and group counts in every layer: the stricter baseline that
separates "these heads" from "these layers") and ``layerwise_mask`` (whole layers, the Qwen3-Next
``"3:1"`` layout: layer ``i`` is FA when ``i % (a+b) >= a``, i.e. layers 3, 7, 11, ...). ``layer_types``/``mask_from_layer_types`` convert a
layer-wise mask to and from a Qwen3-Next style ``layer_types`` list. The versioned JSON file and the
DuoAttention / Retrieval_Head exports live in ``headscope.maskfile`` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from headscope.fusion import FusedRanking
from headscope.heads import Head, HeadMask, HeadscopeError, HeadScores, ModelFingerprint
from headscope.maskfile import (
    MASK_SCHEMA_VERSION,
    export_duo_tsv,
    export_retrieval_json,
    load_mask,
    mask_to_dict,
    ranking_from_mask,
    save_mask,
)

GROUP_SCORES = ("max", "sum")
LINEAR, FULL = "linear_attention", "full_attention"


def parse_ratio(ratio: str) -> tuple[int, int]:
    """``"7:1"`` -> ``(7, 1)`` (linear, full); both parts positive integers."""
    parts = str(ratio).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise HeadscopeError(f"cannot read ratio {ratio!r}: expected LINEAR:FULL with positive integers, e.g. 7:1")
    return int(parts[0]), int(parts[1])


def head_budget(fingerprint: ModelFingerprint, ratio: str | None = None, n_full: int | None = None) -> int:
    """The number of full-attention heads a ratio or explicit count asks for.

    Args:
        fingerprint: the model.
        ratio: ``"a:b"`` linear:full; keeps ``round(L*H*b/(a+b))`` heads, at least 1 (default ``"7:1"``).
        n_full: an explicit count instead of a ratio (not both).
    Returns:
        the budget in heads, in ``[1, L*H]``.
    """
    total = fingerprint.n_layers * fingerprint.n_heads
    if ratio is not None and n_full is not None:
        raise HeadscopeError("give either a ratio or n_full, not both")
    if n_full is None:
        linear, full = parse_ratio(ratio or "7:1")
        n_full = max(1, (2 * total * full + linear + full) // (2 * (linear + full)))  # round half up
    if not 1 <= n_full <= total:
        raise HeadscopeError(f"n_full must be between 1 and {total} (the model's heads), got {n_full}")
    return int(n_full)


def realised_ratio(n_total: int, n_full: int) -> str:
    """The ``"linear:full"`` ratio ``n_full`` of ``n_total`` heads make, in lowest terms (6 of 48 -> ``"7:1"``)."""
    divisor = math.gcd(n_total - n_full, n_full)
    return f"{(n_total - n_full) // divisor}:{n_full // divisor}"


def _ratio_record(ratio: str | None, n_full: int | None, full: torch.Tensor, record: dict) -> str | None:
    """The ratio a mask records: the one its heads realise (``None`` for an explicit count). A requested ratio
    the head count cannot meet (``1000:1`` of 48 heads is 1 head, 47:1) is kept as ``record["requested_ratio"]``."""
    if n_full is not None:
        return None
    linear, kept = parse_ratio(ratio or "7:1")
    n_kept = int(full.sum())
    if linear * n_kept != kept * (full.numel() - n_kept):
        record["requested_ratio"] = ratio or "7:1"
    return realised_ratio(full.numel(), n_kept)


def budget_note(mask: HeadMask) -> str | None:
    """One line saying that the requested ratio (see ``_ratio_record``) or head count was rounded (to whole KV groups
    or layers), or None when it was met."""
    selection = mask.provenance.get("selection", {})
    requested = selection.get("requested_ratio")
    if requested is not None:
        return (f"note: ratio {requested} cannot be met exactly with {mask.full.numel()} heads; the mask keeps {mask.n_full} "
                f"at full attention, {mask.provenance['ratio']} (recorded as such)")
    if mask.provenance.get("ratio") is None and selection.get("n_full_budget") not in (None, mask.n_full) and not selection.get("excluded"):
        unit = "layers" if selection.get("whole_layers") else "KV groups"
        return f"note: {selection['n_full_budget']} full heads asked for; in whole {unit} the mask keeps {mask.n_full}"
    return None


def select_units(importance: torch.Tensor, n_units: int, min_per_layer: int) -> torch.Tensor:
    """Greedy selection of ``n_units`` units with at least ``min_per_layer`` in every layer.

    Args:
        importance: ``(L, U)`` finite floats, higher = keep (units are heads or KV groups).
        n_units: how many to keep, ``min_per_layer * L <= n_units <= L * U``.
        min_per_layer: lower bound per layer.
    Returns:
        ``(L, U)`` bool, exactly ``n_units`` True. Ties go to the lower index.
    """
    n_layers, n_per_layer = importance.shape
    chosen = torch.zeros(n_layers, n_per_layer, dtype=torch.bool)
    if min_per_layer > 0:
        per_layer_best = torch.argsort(importance, dim=1, descending=True, stable=True)[:, :min_per_layer]  # (L, m)
        chosen.scatter_(1, per_layer_best, True)
    remaining = n_units - int(chosen.sum())
    order = torch.argsort(importance.flatten(), descending=True, stable=True)  # (L*U,)
    order = order[~chosen.flatten()[order]][:remaining]
    chosen.view(-1)[order] = True
    return chosen


def _importance_of(source: FusedRanking | HeadScores | torch.Tensor, fingerprint: ModelFingerprint | None):
    """(importance (L, H), fingerprint, provenance) of a ranking, a HeadScores (|score|) or a tensor."""
    if isinstance(source, FusedRanking):
        values, own, provenance = source.values, source.fingerprint, {"fusion": dict(source.provenance)}
        provenance["probes"] = list(dict.fromkeys(i["probe"] for i in source.provenance.get("inputs", [])))  # each once, in order
        provenance["methods"] = sorted({i["method"] for i in source.provenance.get("inputs", [])})
    elif isinstance(source, HeadScores):
        values, own = source.values.abs(), source.fingerprint
        provenance = {"probes": [source.probe], "methods": [source.method], "fusion": None}
    else:
        if fingerprint is None:
            raise HeadscopeError("a plain importance tensor needs the model fingerprint")
        values, own, provenance = torch.as_tensor(source, dtype=torch.float32), fingerprint, {"probes": [], "methods": [], "fusion": None}
    if fingerprint is not None and own is not fingerprint:
        problem = fingerprint.mismatch(own)
        if problem:
            raise HeadscopeError(f"the ranking belongs to another model: {problem}")
    if values.shape != own.shape:
        raise HeadscopeError(f"importance has shape {tuple(values.shape)}, the model {own.shape}")
    if not torch.isfinite(values).all():
        raise HeadscopeError("importance contains NaN or infinity")
    provenance["scores"] = [[float(x) for x in row] for row in values.tolist()]
    return values.to(torch.float32), own, provenance


def _select(importance, fingerprint, n_full, min_per_layer, kv_aware, group_score, whole_layers=False,
            excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Heads (L, H) bool of a budget, by heads, by whole KV groups or by whole layers; plus the selection record.
    ``excluded`` (L, H) bool: heads left out of their unit's score (a unit of excluded heads only comes last)."""
    fp = fingerprint
    if not 0 <= min_per_layer <= fp.n_heads:
        raise HeadscopeError(f"min_per_layer must be between 0 and {fp.n_heads}, got {min_per_layer}")
    if group_score not in GROUP_SCORES:
        raise HeadscopeError(f"unknown group score {group_score!r}; choose one of {', '.join(GROUP_SCORES)}")
    if whole_layers and (kv_aware or min_per_layer):
        raise HeadscopeError("whole layers cannot be combined with kv_aware or a per-layer minimum (a whole layer holds all its groups)")
    unit = fp.n_heads if whole_layers else fp.group_size if kv_aware else 1
    grouped = importance.view(fp.n_layers, fp.n_heads // unit, unit)  # (L, U, unit)
    if excluded is None:
        unit_importance = grouped.amax(-1) if group_score == "max" else grouped.sum(-1)  # (L, U)
    else:
        out = excluded.view(grouped.shape)
        kept = grouped.masked_fill(out, float("-inf")).amax(-1) if group_score == "max" else grouped.masked_fill(out, 0.0).sum(-1)
        unit_importance = kept.masked_fill(out.all(-1), float(importance.min()) - 1.0 - float(importance.abs().sum()))
    n_units = max(1, (2 * n_full + unit) // (2 * unit))  # round half up, at least one unit
    min_units = -(-min_per_layer // unit)  # ceil
    if min_units * fp.n_layers > n_units:
        raise HeadscopeError(
            f"min_per_layer={min_per_layer} needs {min_units * unit * fp.n_layers} full heads over "
            f"{fp.n_layers} layers, more than the budget of {n_units * unit}"
        )
    chosen = select_units(unit_importance, n_units, min_units)  # (L, U)
    full = chosen[:, :, None].expand(-1, -1, unit).reshape(fp.shape)  # (L, H)
    record = {"n_full_budget": n_full, "n_full": int(full.sum()), "min_per_layer": min_per_layer, "kv_aware": kv_aware}
    if whole_layers:
        record["whole_layers"] = True
    if kv_aware or whole_layers:
        record["group_score"] = group_score
    return full, record


def select_mask(
    ranking_or_values: FusedRanking | HeadScores | torch.Tensor,
    fingerprint: ModelFingerprint | None = None,
    ratio: str | None = None,
    n_full: int | None = None,
    min_per_layer: int = 0,
    kv_aware: bool = False,
    group_score: str = "max",
    exclude: Sequence[Head] = (),
    whole_layers: bool = False,
) -> HeadMask:
    """Keep the most important heads at full attention under a head budget.

    Args:
        ranking_or_values: a ``FusedRanking``, a ``HeadScores`` (importance = ``|score|``) or an
            ``(L, H)`` tensor (higher = keep; needs ``fingerprint``).
        fingerprint: the model; checked against the ranking's own when both are given.
        ratio: ``"a:b"`` linear:full (default ``"7:1"``); or ``n_full`` heads instead.
        min_per_layer: full heads every layer must keep (in heads; whole groups with ``kv_aware``).
        kv_aware: choose whole KV groups (scored by ``group_score``: ``max`` or ``sum``).
        exclude: heads that must not get full attention, e.g. heads whose job needs RoPE (``rope``
            scores: the FA branch is NoPE); the budget goes to the next heads. With ``kv_aware`` the
            groups are scored without them and the budget stays in groups (the KV cache): a chosen
            group keeps its excluded heads linear, so the mask has fewer FA heads than the budget.
        whole_layers: choose whole layers (scored by ``group_score`` over their heads); not with
            ``kv_aware``, ``min_per_layer`` or ``exclude``.
    Returns:
        ``HeadMask`` whose provenance holds ratio, selection record, probes, methods, fusion, scores.
    """
    importance, fp, provenance = _importance_of(ranking_or_values, fingerprint)
    if bool((importance == importance.flatten()[0]).all()):
        raise HeadscopeError("every head has the same importance (all-zero or constant scores): nothing to select by")
    budget = head_budget(fp, ratio, n_full)
    excluded = sorted(set(exclude), key=lambda h: (h.layer, h.head))
    if excluded and whole_layers:
        raise HeadscopeError("whole layers cannot exclude heads: an all-FA layer stays the pretrained attention, RoPE included")
    out = torch.zeros(fp.shape, dtype=torch.bool)
    for head in excluded:
        if not fp.has_head(head):
            raise HeadscopeError(f"cannot exclude {head}: the model has {fp.n_layers} layers x {fp.n_heads} heads")
        out[head.layer, head.head] = True
    if excluded and not kv_aware and budget > out.numel() - len(excluded):
        raise HeadscopeError(f"a budget of {budget} full heads exceeds the {out.numel() - len(excluded)} heads not excluded")
    full, record = _select(importance, fp, budget, min_per_layer, kv_aware, group_score, whole_layers, out if excluded else None)
    if excluded and kv_aware:
        full &= ~out  # a chosen group keeps its excluded heads linear
        record["n_full"] = int(full.sum())
    if excluded:
        forced = [str(h) for h in excluded if full[h.layer, h.head]]
        if forced:
            raise HeadscopeError(f"min_per_layer={min_per_layer} forces excluded heads {', '.join(forced)} to full attention")
        short = [layer for layer, count in enumerate(full.sum(1).tolist()) if count < min_per_layer]
        if short:
            raise HeadscopeError(f"min_per_layer={min_per_layer} cannot be met in layer(s) {', '.join(map(str, short))} "
                                 "without excluded heads")
        record["excluded"] = [str(h) for h in excluded]
    ratio_text = _ratio_record(ratio, n_full, full, record)
    return HeadMask(full, fp, {"ratio": ratio_text, "selection": {"method": "ranked", **record}, **provenance})


def random_mask(
    fingerprint: ModelFingerprint,
    ratio: str | None = None,
    n_full: int | None = None,
    seed: int = 0,
    kv_aware: bool = False,
    kv_groups: int | None = None,
) -> HeadMask:
    """A uniformly random mask with exactly the budget of ``select_mask`` (same seed -> same mask).

    Args:
        fingerprint: the model.
        ratio / n_full: the budget (default ``"7:1"``).
        seed: seed of a private ``torch.Generator`` (global RNG untouched).
        kv_aware: draw whole KV groups.
        kv_groups: the heads touch exactly this many KV groups (the KV cost of the mask), uniformly over
            all such masks: a uniform set of groups, then heads per group with the multiplicities of
            ``_group_counts``; not with ``kv_aware``. ``kv_matched_random_mask`` takes both counts from a mask.
    Returns:
        ``HeadMask`` with provenance ``selection.method = "random"``.
    """
    budget = head_budget(fingerprint, ratio, n_full)
    generator = torch.Generator().manual_seed(int(seed))
    if kv_groups is None:
        importance = torch.rand(fingerprint.shape, generator=generator)  # (L, H); groups score by their max
        full, record = _select(importance, fingerprint, budget, 0, kv_aware, "max")
    else:
        if kv_aware:
            raise HeadscopeError("kv_groups fixes the KV groups of single heads; it does not combine with kv_aware")
        kv_groups, size, total = int(kv_groups), fingerprint.group_size, fingerprint.n_layers * fingerprint.n_kv_heads
        if not 1 <= kv_groups <= total or not kv_groups <= budget <= kv_groups * size:
            raise HeadscopeError(f"cannot place {budget} full-attention heads in exactly {kv_groups} KV groups of {size} heads "
                                 f"(the model has {total} groups): need groups <= heads <= groups x {size}")
        full = _random_in_groups(total, size, budget, kv_groups, generator).view(fingerprint.shape)
        record = {"n_full_budget": budget, "n_full": int(full.sum()), "kv_groups": kv_groups, "min_per_layer": 0, "kv_aware": False}
    ratio_text = _ratio_record(ratio, n_full, full, record)
    selection = {"method": "random", "seed": int(seed), **record}
    return HeadMask(full, fingerprint, {"ratio": ratio_text, "selection": selection, "probes": [], "methods": [], "fusion": None})


def kv_matched_random_mask(mask: HeadMask, seed: int = 0) -> HeadMask:
    """A random mask with the FA head count of ``mask`` and as many KV groups touched (its KV cache bytes).

    The fair random baseline of a selected mask: a plain ``random_mask`` of the same head budget spreads
    its heads over more groups, so it keeps a larger KV cache than a selection that concentrates them.
    """
    groups = int(mask.kv_groups_full().sum())
    matched = random_mask(mask.fingerprint, n_full=mask.n_full, seed=seed, kv_groups=groups)
    matched.provenance["ratio"] = mask.provenance.get("ratio")
    matched.provenance["selection"]["kv_matched_to"] = {"n_full": mask.n_full, "kv_groups": groups,
                                                        "heads": [str(h) for h in mask.heads()]}
    return matched


def _group_counts(n_groups: int, group_size: int, n_heads: int) -> list[list[int]]:
    """``ways[i][m]``: masks that put ``m`` heads in groups ``i..n_groups-1``, each group 1..``group_size`` heads."""
    ways = [[0] * (n_heads + 1) for _ in range(n_groups + 1)]
    ways[n_groups][0] = 1
    for i in range(n_groups - 1, -1, -1):
        for m in range(n_heads + 1):
            ways[i][m] = sum(math.comb(group_size, k) * ways[i + 1][m - k] for k in range(1, min(group_size, m) + 1))
    return ways


def _random_in_groups(n_slots: int, size: int, n_full: int, n_groups: int, generator: torch.Generator) -> torch.Tensor:
    """``(n_slots, size)`` bool: ``n_full`` heads touching exactly ``n_groups`` of ``n_slots`` KV groups of
    ``size`` heads, uniform over all such masks (the caller checks ``1 <= n_groups <= n_slots`` and
    ``n_groups <= n_full <= n_groups * size``).

    Every set of groups holds equally many masks, so the groups are a uniform draw; the head count ``k``
    of each chosen group is drawn with probability proportional to ``C(size, k)`` times the ways to place
    the rest (``_group_counts``), and the heads inside a group uniformly. The slots are the whole model's
    groups (``random_mask``) or one layer's (``layer_matched_random_mask``).
    """
    groups = torch.randperm(n_slots, generator=generator)[:n_groups].sort().values  # (G,) slot ids
    ways = _group_counts(n_groups, size, n_full)
    full = torch.zeros(n_slots, size, dtype=torch.bool)  # (n_slots, size)
    left = n_full
    for i, group in enumerate(groups.tolist()):
        target = float(torch.rand((), generator=generator)) * ways[i][left]  # in [0, ways[i][left])
        cumulative, k = 0, 0
        while cumulative <= target:  # exact integers against a float: k with zero ways is never taken
            k += 1
            cumulative += math.comb(size, k) * ways[i + 1][left - k]
        full[group, torch.randperm(size, generator=generator)[:k]] = True
        left -= k
    return full


def layer_matched_random_mask(mask: HeadMask, seed: int = 0) -> HeadMask:
    """A random mask with, in every layer, as many FA heads and KV groups touched as ``mask`` there.

    The stricter baseline: ``kv_matched_random_mask`` draws its groups over the whole model, so a
    selection that sits in a few (late) layers may beat it only by *where* its heads are. This one keeps
    the layers and, per layer, the head and group counts (so the KV cache too), and draws the groups and
    heads uniformly inside each layer: uniform over all masks with those per-layer counts (the layers are
    independent draws of ``_random_in_groups`` from one seeded generator). What is left to beat it is
    the choice of heads within the layers.

    A layer whose every head is FA is the same in every such mask (and so is a layer without FA heads);
    no other head is forced (a partly FA layer can always drop any given head: choose other groups, or
    fewer heads of its group). Each head of layer ``l`` is FA with probability ``n_l / H``, so the
    expected overlap with ``mask`` is ``sum_l n_l^2 / H`` heads, far more than a KV-matched draw's.
    Provenance ``selection.layer_matched_to``: the source's heads, per-layer head and group counts, and
    ``forced_heads`` (its FA heads in all-FA layers, which every draw shares) with ``forced_layers``.
    """
    fp, generator = mask.fingerprint, torch.Generator().manual_seed(int(seed))
    heads_per_layer = mask.full.sum(1).tolist()  # (L,)
    groups_per_layer = mask.kv_groups_full().sum(1).tolist()  # (L,)
    full = torch.zeros(fp.shape, dtype=torch.bool)  # (L, H)
    for layer, (n_heads, n_groups) in enumerate(zip(heads_per_layer, groups_per_layer)):
        if n_heads:
            full[layer] = _random_in_groups(fp.n_kv_heads, fp.group_size, n_heads, n_groups, generator).view(fp.n_heads)
    forced_layers = [layer for layer, n in enumerate(heads_per_layer) if n == fp.n_heads]
    record = {"n_full": int(full.sum()), "kv_groups": int(sum(groups_per_layer)), "min_per_layer": 0, "kv_aware": False}
    matched_to = {"n_full": mask.n_full, "kv_groups": int(sum(groups_per_layer)), "heads_per_layer": heads_per_layer,
                  "kv_groups_per_layer": groups_per_layer, "forced_heads": len(forced_layers) * fp.n_heads,
                  "forced_layers": forced_layers, "heads": [str(h) for h in mask.heads()]}
    selection = {"method": "random", "seed": int(seed), **record, "layer_matched_to": matched_to}
    return HeadMask(full, fp, {"ratio": mask.provenance.get("ratio"), "selection": selection, "probes": [], "methods": [], "fusion": None})


def layerwise_mask(fingerprint: ModelFingerprint, ratio: str = "3:1") -> HeadMask:
    """Whole layers at full attention: with ``"a:b"``, layer ``i`` is FA when ``i % (a+b) >= a``.

    ``"3:1"`` is the Qwen3-Next layout (layers 3, 7, 11, ...). Every head of an FA layer is FA, so
    ``kv_fraction == head_fraction``. The mask records the ratio its layers realise (and the requested one
    where they differ: ``budget_note``).
    """
    linear, full_layers = parse_ratio(ratio)
    is_full = torch.tensor([i % (linear + full_layers) >= linear for i in range(fingerprint.n_layers)])  # (L,)
    if not is_full.any():
        raise HeadscopeError(
            f"ratio {ratio} puts no full-attention layer in a model of {fingerprint.n_layers} layers "
            f"(the first one would be layer {linear})"
        )
    full = is_full[:, None].expand(fingerprint.shape).clone()  # (L, H)
    selection = {"method": "layerwise", "n_full": int(full.sum()), "full_layers": is_full.nonzero().flatten().tolist()}
    realised = _ratio_record(ratio, None, full, selection)  # (7:1 of 30 layers: layers 7, 15, 23, 3 of 30: 9:1, recorded so)
    return HeadMask(full, fingerprint, {"ratio": realised, "selection": selection, "probes": [], "methods": [], "fusion": None})


def layer_types(mask: HeadMask) -> list[str]:
    """Qwen3-Next style ``layer_types`` of a layer-wise mask; a layer mixing head types is an error."""
    types = []
    for layer, row in enumerate(mask.full):
        n_full = int(row.sum())
        if 0 < n_full < row.numel():
            raise HeadscopeError(
                f"layer {layer} mixes {n_full} full-attention and {row.numel() - n_full} linear heads; "
                "layer_types can only describe a layer-wise mask"
            )
        types.append(FULL if n_full else LINEAR)
    return types


def mask_from_layer_types(types: Sequence[str], fingerprint: ModelFingerprint) -> HeadMask:
    """The head mask of a Qwen3-Next style ``layer_types`` list (one entry per layer)."""
    if len(types) != fingerprint.n_layers:
        raise HeadscopeError(f"layer_types has {len(types)} entries but the model has {fingerprint.n_layers} layers")
    unknown = sorted({t for t in types if t not in (LINEAR, FULL)})
    if unknown:
        raise HeadscopeError(f"unknown layer types {unknown}; expected {LINEAR!r} or {FULL!r}")
    is_full = torch.tensor([t == FULL for t in types])  # (L,)
    full = is_full[:, None].expand(fingerprint.shape).clone()
    selection = {"method": "layer_types", "n_full": int(full.sum())}
    return HeadMask(full, fingerprint, {"ratio": None, "selection": selection, "probes": [], "methods": [], "fusion": None})


__all__ = [
    "GROUP_SCORES", "MASK_SCHEMA_VERSION", "budget_note", "export_duo_tsv", "export_retrieval_json", "head_budget",
    "layer_types", "layerwise_mask", "load_mask", "mask_from_layer_types", "mask_to_dict", "parse_ratio", "kv_matched_random_mask",
    "layer_matched_random_mask", "random_mask", "ranking_from_mask", "realised_ratio", "save_mask", "select_mask", "select_units",
]
