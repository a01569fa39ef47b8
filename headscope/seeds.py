"""Arms repeated over seeds: families, mean +- sd over transfer and mask seeds, and the selection goals.

An arm name (``headscope.arms``) carries its seeds: ``_s<k>`` is the mask seed of a random
arm, ``_t<k>`` (last) the transfer seed of an arm repeated over transfer runs (the student's
initialisation and the order of its training data). Dropping ``_t<k>`` gives the arm's *mask*; dropping
``_s<k>`` too gives its *family* (``headwise_randomkv_7to1_s3_t1`` -> mask ``headwise_randomkv_7to1_s3``
-> family ``headwise_randomkv_7to1``).

The transfer seed of a run is its record's ``transfer_seed`` (the ``_t<k>`` of its name, else the
``--seed`` it ran with), so an arm first run once (``kv_aware``, seed 0) and later given a second transfer
seed (``kv_aware_t1``) reads as one mask with seeds 0 and 1.

Per family and metric (retrieval and reasoning means at every length, held-out CE at every evaluated
length, ``heldout@<length>``, and on the held-out documents of one kind, ``heldout:<kind>@<length>``), over
the arms that are done:

* ``mean``: the mean over the family's masks of each mask's mean over its transfer seeds (a mask run
  twice weighs as much as a mask run once);
* ``sd``: the sample sd (n - 1) of those per-mask means: the mask-seed spread of a random family, which
  includes transfer noise; ``None`` below two masks;
* ``transfer_sd``: the transfer noise alone, pooled over the masks run with >= 2 transfer seeds,
  ``sqrt(sum_m sum_t (x_mt - mean_m)^2 / sum_m (n_m - 1))``; ``None`` without such a mask.

Goals (``goal_checks``), for every *selected* family (kind ``fused``, the headscope mask, or ``file``, a
mask given as a file):

1. ``beats_random`` at each of ``GOAL_MULTIPLES`` x the teacher length: ``selected - random > 2 x
   transfer_sd(selected)`` on the retrieval mean, ``random`` the mean of the KV-matched random family
   (``randomkv``; the plain random family when there is none, said in the record);
   ``beats_layer_random``: the same test against the layer-matched random family (``randomlayer``: the
   same FA heads and KV groups in every layer), only when one is done: it asks whether the selection
   beats its own layers, beside the primary goal above (its own name, so the primary one stays one
   record per family and length);
2. ``near_layerwise``: at every length, retrieval and reasoning of the selected family are at least
   layer-wise 3:1's minus ``NEAR_POINTS`` (2 accuracy points), with at most half its KV cache.

A goal without the arms or seeds it needs is ``None`` (not met, not failed), with the reason.

``overlap_figure`` plots every run's retrieval against the heads its mask shares with the selected one:
whether accuracy follows the overlap across families (the selection found where retrieval lives) and
within one (the exact heads matter) are different claims, and a layer-matched family separates them.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Mapping

from headscope.quality import capability_means, heldout_columns, probe_groups, shared_with_fused

GOAL_MULTIPLES = (1, 4)
NEAR_POINTS = 0.02
SELECTED_KINDS = ("fused", "file")
_TRANSFER = re.compile(r"_t(\d+)$")
_MASK_SEED = re.compile(r"_s(\d+)$")


def mask_name(arm: str) -> str:
    """The arm without its transfer seed suffix ``_t<k>``."""
    return _TRANSFER.sub("", arm)


def arm_family(arm: str) -> str:
    """The arm without its transfer seed and mask seed suffixes."""
    return _MASK_SEED.sub("", mask_name(arm))


def transfer_seed(arm: str) -> int | None:
    found = _TRANSFER.search(arm)
    return int(found.group(1)) if found else None


def mask_seed(arm: str) -> int | None:
    found = _MASK_SEED.search(mask_name(arm))
    return int(found.group(1)) if found else None


def arm_metrics(arm: Mapping[str, Any], settings: Mapping[str, Any], metric: str = "argmax") -> dict[str, float]:
    """``retrieval@<length>``, ``reasoning@<length>`` (capability means), ``heldout@<length>`` and
    ``heldout:<kind>@<length>`` (held-out CE on the documents of one kind) of one arm."""
    groups = probe_groups(settings)
    out: dict[str, float] = {}
    for length in settings["lengths"]:
        for capability, value in capability_means(arm, length, metric, groups).items():
            out[f"{capability}@{length}"] = value
    for length, value in (arm.get("heldout_loss") or {}).items():
        out[f"heldout@{length}"] = value
    for kind, by_length in (arm.get("heldout_loss_by_kind") or {}).items():
        for length, value in by_length.items():
            out[f"heldout:{kind}@{length}"] = value
    return out


def _pooled_sd(groups: list[list[float]]) -> float | None:
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if dof == 0:
        return None
    return math.sqrt(sum((x - statistics.fmean(g)) ** 2 for g in groups if len(g) > 1 for x in g) / dof)


def family_stats(results: Mapping[str, Any], metric: str = "argmax") -> dict[str, dict[str, Any]]:
    """Per family (in run order): kind, masks and their transfer seeds, and per metric mean / sd / transfer_sd."""
    settings, families = results["settings"], {}
    for name, arm in results["arms"].items():
        if arm.get("status") != "done":
            continue
        family = families.setdefault(arm_family(name), {"kind": arm.get("kind"), "masks": {}, "kv_bytes_per_token": set()})
        family["masks"].setdefault(mask_name(name), []).append(name)
        family["kv_bytes_per_token"].add(arm.get("kv_bytes_per_token"))
    out = {}
    for family_name, family in families.items():
        per_mask = {mask: [arm_metrics(results["arms"][a], settings, metric) for a in arms] for mask, arms in family["masks"].items()}
        keys = sorted({k for records in per_mask.values() for r in records for k in r}, key=_metric_order)
        metrics = {}
        for key in keys:
            runs = [[r[key] for r in records if key in r and not math.isnan(r[key])] for records in per_mask.values()]
            runs = [values for values in runs if values]
            means = [statistics.fmean(values) for values in runs]
            metrics[key] = {"mean": statistics.fmean(means) if means else None, "sd": statistics.stdev(means) if len(means) > 1 else None,
                            "n_masks": len(means), "n_runs": sum(len(v) for v in runs), "transfer_sd": _pooled_sd(runs)}
        kv = sorted(v for v in family["kv_bytes_per_token"] if v is not None)
        seeds = {m: [results["arms"][a].get("transfer_seed", transfer_seed(a)) for a in arms] for m, arms in family["masks"].items()}
        out[family_name] = {"kind": family["kind"], "masks": seeds,
                            "kv_bytes_per_token": kv, "metrics": metrics}
    return out


def _metric_order(key: str) -> tuple[int, str, int]:
    name, length = key.split("@")
    metric, _, kind = name.partition(":")
    return ("retrieval", "reasoning", "heldout").index(metric), kind, int(length)


def _value(family: Mapping[str, Any] | None, key: str, field: str = "mean") -> float | None:
    if family is None or key not in family["metrics"]:
        return None
    return family["metrics"][key][field]


def _beats(goal: str, name: str, random_name: str | None, families: Mapping[str, Mapping[str, Any]], base: int, multiple: int,
           lengths: list[int], **fields: Any) -> dict[str, Any]:
    """One ``beats_random``-style record of family ``name`` against ``random_name`` (None: no random family done):
    ``selected - random > 2 x transfer_sd(selected)`` on the retrieval mean at ``multiple`` x ``base`` tokens."""
    key, selected, random_family = f"retrieval@{base * multiple}", families[name], families.get(random_name)
    record = {"goal": goal, "family": name, "length": base * multiple, "random_family": random_name, **fields, "met": None}
    if base * multiple not in lengths:
        return {**record, "reason": f"{multiple}x the teacher length was not evaluated"}
    mine, theirs, noise = _value(selected, key), _value(random_family, key), _value(selected, key, "transfer_sd")
    record.update(selected=mine, random_mean=theirs, random_sd=_value(random_family, key, "sd"),
                  random_masks=_value(random_family, key, "n_masks"), transfer_sd=noise, transfer_runs=_value(selected, key, "n_runs"))
    if theirs is None or mine is None:
        record["reason"] = "no random arm is done"
    elif noise is None:
        record["reason"] = "needs >= 2 transfer seeds of the selected arm"
    else:
        record.update(margin=mine - theirs, threshold=2 * noise, met=mine - theirs > 2 * noise)
    return record


def goal_checks(results: Mapping[str, Any], families: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The goals of the module docstring for every selected family (one record per goal, family and length)."""
    families = family_stats(results) if families is None else families
    settings = results["settings"]
    base, lengths = settings["teacher_length"], settings["lengths"]
    by_kind: dict[str, list[str]] = {}
    for name, family in families.items():
        by_kind.setdefault(family["kind"], []).append(name)
    random_kind = "randomkv" if by_kind.get("randomkv") else "random"
    random_name = by_kind.get(random_kind, [None])[0]
    layer_name = by_kind.get("randomlayer", [None])[0]
    layerwise = families.get("layerwise_3to1")
    checks = []
    for name in [n for kind in SELECTED_KINDS for n in by_kind.get(kind, [])]:
        selected = families[name]
        checks += [_beats("beats_random", name, random_name, families, base, multiple, lengths, kv_matched=random_kind == "randomkv")
                   for multiple in GOAL_MULTIPLES]
        if layer_name is not None:
            checks += [_beats("beats_layer_random", name, layer_name, families, base, multiple, lengths) for multiple in GOAL_MULTIPLES]
        record = {"goal": "near_layerwise", "family": name, "points": NEAR_POINTS, "met": None}
        if layerwise is None:
            checks.append({**record, "reason": "layerwise_3to1 is not done"})
            continue
        pairs = {f"{cap}@{n}": (_value(selected, f"{cap}@{n}"), _value(layerwise, f"{cap}@{n}")) for cap in ("retrieval", "reasoning") for n in lengths}
        gaps = {key: math.nan if None in pair else pair[0] - pair[1] for key, pair in pairs.items()}
        kv_mine, kv_layer = max(selected["kv_bytes_per_token"], default=None), max(layerwise["kv_bytes_per_token"], default=None)
        kv_ok = kv_mine is not None and kv_layer is not None and kv_mine <= kv_layer / 2
        finite = [g for g in gaps.values() if not math.isnan(g)]
        record.update(gaps=gaps, kv_bytes_per_token=kv_mine, layerwise_kv_bytes_per_token=kv_layer, kv_at_most_half=kv_ok,
                      met=bool(finite) and kv_ok and all(g >= -NEAR_POINTS - 1e-9 for g in finite))  # 1e-9: float round-off of the means
        checks.append(record)
    return checks


def _pm(mean: float | None, sd: float | None, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def seeds_markdown(results: Mapping[str, Any], families: Mapping[str, Mapping[str, Any]], checks: list[dict[str, Any]]) -> str:
    """Markdown: per family mean ± sd (over masks; transfer sd beside it) at every length, then the goals."""
    settings = results["settings"]
    base, lengths = settings["teacher_length"], settings["lengths"]
    kinds = heldout_columns(settings)
    columns = ([f"retrieval@{n}" for n in lengths] + [f"reasoning@{n}" for n in lengths] + [f"heldout@{base}"]
               + [f"heldout:{kind}@{base}" for kind in kinds])
    labels = ([f"retrieval {n // base}x" for n in lengths] + [f"reasoning {n // base}x" for n in lengths] + ["held-out CE 1x"]
              + [f"held-out CE {kind} 1x" for kind in kinds])
    lines = ["## Seeds: mean ± sd per arm family", "",
             "Mean over masks of each mask's mean over its transfer seeds; ± the sd over masks (mask seeds; transfer noise "
             "included). `transfer sd`: the spread over transfer seeds alone, pooled over masks run more than once.", "",
             "| family | masks | transfer seeds | KV B/token | " + " | ".join(labels) + " | transfer sd (retrieval 1x) |",
             "|" + "---|" * (len(labels) + 5)]
    for name, family in families.items():
        seeds = sorted({s for runs in family["masks"].values() for s in runs if s is not None})
        runs = sum(len(r) for r in family["masks"].values())
        cells = [_pm(_value(family, key), _value(family, key, "sd"), 3 if key.startswith("heldout") else 2) for key in columns]
        noise = _value(family, f"retrieval@{base}", "transfer_sd")
        kv = "/".join(str(v) for v in family["kv_bytes_per_token"]) or "—"
        lines.append(f"| {name} | {len(family['masks'])} | {','.join(map(str, seeds)) or '—'} (runs: {runs}) | {kv} | " + " | ".join(cells)
                     + f" | {'—' if noise is None else f'{noise:.3f}'} |")
    lines += ["", "## Goals", ""]
    for check in checks:
        verdict = {True: "**met**", False: "**not met**", None: "undecided"}[check["met"]]
        if check["goal"] in ("beats_random", "beats_layer_random"):
            if check.get("random_family") is None:
                against = "random masks"
            elif check["goal"] == "beats_layer_random":
                against = f"layer-matched random {check['random_family']} (the same FA heads and KV groups in every layer)"
            else:
                against = f"{'KV-matched ' if check['kv_matched'] else 'plain (not KV-matched) '}random {check['random_family']}"
            if check.get("margin") is not None:
                detail = (f"{check['selected']:.3f} - {check['random_mean']:.3f} (sd over {check['random_masks']} masks "
                          f"{_pm(check['random_sd'], None, 3)}) = {check['margin']:+.3f} vs 2 x transfer sd {check['threshold']:.3f} "
                          f"({check['transfer_runs']} transfer runs)")
            else:
                detail = check.get("reason", "")
            lines.append(f"- {verdict}: {check['family']} beats the {against} on retrieval at {check['length']} tokens "
                         f"by more than 2 transfer sd: {detail}")
        else:
            if "gaps" in check:
                worst = min(check["gaps"].items(), key=lambda kv: kv[1] if not math.isnan(kv[1]) else math.inf)
                detail = (f"worst gap {worst[0]} {worst[1]:+.3f}; KV {check['kv_bytes_per_token']} vs {check['layerwise_kv_bytes_per_token']} "
                          f"B/token ({'at most' if check['kv_at_most_half'] else 'more than'} half)")
            else:
                detail = check.get("reason", "")
            lines.append(f"- {verdict}: {check['family']} within {check['points'] * 100:.0f} points of layerwise_3to1 on retrieval and "
                         f"reasoning at every length with at most half its KV cache: {detail}")
    return "\n".join(lines) + "\n"


def overlap_figure(results: Mapping[str, Any], metric: str = "argmax"):
    """Retrieval of every hybrid run against the FA heads its mask shares with the fused (selected) mask.

    One panel per evaluated length, one colour per arm family, one dot per run (hover: the arm and its
    shared KV groups).

    Returns:
        A ``plotly.graph_objects.Figure``, or ``None`` when the results hold no fused mask.
    """
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    shared = shared_with_fused(results)
    if not shared:
        return None
    settings = results["settings"]
    lengths, base = settings["lengths"], settings["teacher_length"]
    figure = make_subplots(rows=1, cols=len(lengths), subplot_titles=[f"retrieval at {n} ({n // base}x)" for n in lengths],
                           shared_yaxes=True, horizontal_spacing=0.04)
    families: dict[str, list[str]] = {}
    for name, arm in results["arms"].items():
        if arm.get("status") == "done" and name in shared:
            families.setdefault(arm_family(name), []).append(name)
    for index, (family, arms) in enumerate(families.items()):
        color = qualitative.D3[index % len(qualitative.D3)]
        metrics = [arm_metrics(results["arms"][a], settings, metric) for a in arms]
        for col, length in enumerate(lengths, start=1):
            values = [m.get(f"retrieval@{length}") for m in metrics]
            figure.add_trace(go.Scatter(x=[shared[a][0] for a in arms], y=values, mode="markers", name=family, legendgroup=family,
                                        showlegend=col == 1, marker={"color": color, "size": 9, "opacity": 0.8},
                                        text=[f"{a}: {shared[a][1]} KV groups shared" for a in arms],
                                        hovertemplate="%{text}<br>%{x} heads shared<br>retrieval %{y:.2f}<extra></extra>"),
                             row=1, col=col)
    n_full = len(results["fused_mask"]["full_attention_heads"])
    figure.update_xaxes(title_text=f"FA heads shared with the selected mask (of its {n_full})", range=[-1, n_full + 1])
    figure.update_yaxes(range=[-0.03, 1.03])
    figure.update_yaxes(title_text=f"retrieval ({metric})", col=1)
    figure.update_layout(title=f"Does accuracy follow the selected heads? — {settings['model_name']}: one dot per run",
                         height=420, width=380 * len(lengths) + 200, legend={"title": "family"})
    return figure
