"""The versioned head-mask JSON file and exports to peer formats (DuoAttention, Retrieval_Head).

Mask file (``kind: headscope.mask``, ``schema_version: 1``)::

    {"schema_version": 1, "kind": "headscope.mask",
     "model": {"architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim", "name"},
     "full_attention_heads": [[layer, head], ...],      # sorted, 0-based query heads
     "ratio": "7:1" | null,                             # null when an explicit n_full was asked for
     "n_full": 8, "head_fraction": 0.125, "kv_fraction": 0.25,
     "provenance": {"selection": {...}, "probes": [...], "methods": [...],
                    "fusion": {inputs, normalisation, rule, ...} | null,
                    "scores": [[...L x H fused importance...]]  (optional)}}

``load_mask`` checks every key, the schema version, each head (in range, no duplicates), that the
stored fractions agree with the heads, the shape of the stored scores, and, given ``expect``, that the
mask was made for that model; each problem is a ``HeadscopeError`` naming the file and the fault.

Exports:

* ``export_duo_tsv``: DuoAttention's ``full_attention_heads.tsv``, ``n_layers`` rows of ``n_kv_heads``
  tab-separated values in ``[0, 1]`` (DuoAttention loads it with ``np.loadtxt(delimiter="\\t")`` and
  treats values >= its threshold, 0.5 by default, as full attention per KV head). Default value 1 when
  the KV group keeps its cache (any head of it is FA), else 0: DuoAttention decides per KV head, and a
  group with an FA head must keep its cache, so a chosen head is never demoted. ``group_value=
  "fraction"`` writes the fraction of the group's query heads that are FA instead (more information,
  but at the 0.5 threshold a group with few FA heads becomes streaming). With ``sink_size`` and
  ``recent_size`` the ``config.json`` DuoAttention's ``load_attn_pattern`` needs beside the TSV is written too
  (first, so a failure leaves the TSV as it was; other keys of an existing pattern config are kept, a model's
  config.json is refused).
* ``export_retrieval_json``: Retrieval_Head / HeadKV ``{"layer-head": [score]}`` on one line (both read it with
  ``json.loads(file.readline())``), every head in layer-major order. Consumers rank heads by the (mean) score,
  descending, and HeadKV shares its cache out in proportion to the scores, so every value is >= 0: ``|score|`` of
  a HeadScores; for a FusedRanking (z-scores: half negative, summing to ~0) and a mask, ``(N - position) / N`` of
  each head's place in the order (N heads), where a mask puts its own heads first (by their fused score when it
  stores one): a consumer's top ``n_full`` is the mask, excluded and KV-group choices included.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from headscope.fusion import FusedRanking
from headscope.heads import (
    HeadMask,
    HeadscopeError,
    HeadScores,
    ModelFingerprint,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

MASK_SCHEMA_VERSION = 1
MASK_KIND = "headscope.mask"
REQUIRED_KEYS = ("schema_version", "kind", "model", "full_attention_heads", "ratio", "n_full", "head_fraction", "kv_fraction", "provenance")
GROUP_VALUES = ("any", "fraction")


def mask_to_dict(mask: HeadMask) -> dict[str, Any]:
    """The JSON payload of a mask (see the module docstring)."""
    provenance = {k: v for k, v in mask.provenance.items() if k != "ratio"}
    return {
        "schema_version": MASK_SCHEMA_VERSION,
        "kind": MASK_KIND,
        "model": mask.fingerprint.to_dict(),
        "full_attention_heads": [[h.layer, h.head] for h in mask.heads()],
        "ratio": mask.provenance.get("ratio"),
        "n_full": mask.n_full,
        "head_fraction": mask.head_fraction,
        "kv_fraction": mask.kv_fraction,
        "provenance": provenance,
    }


def save_mask(mask: HeadMask, path: str | os.PathLike) -> Path:
    """Write the mask JSON atomically; returns the path."""
    return write_json_atomic(path, mask_to_dict(mask))


def _read_heads(pairs: Any, fp: ModelFingerprint, source: str) -> torch.Tensor:
    """``(L, H)`` bool from ``[[layer, head], ...]``, rejecting malformed, out-of-range and repeated pairs."""
    if not isinstance(pairs, list):
        raise HeadscopeError(f"{source}: 'full_attention_heads' must be a list of [layer, head] pairs")
    full = torch.zeros(fp.shape, dtype=torch.bool)
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise HeadscopeError(f"{source}: full-attention head {pair!r} is not a [layer, head] pair of integers")
        layer, head = pair
        if not (0 <= layer < fp.n_layers and 0 <= head < fp.n_heads):
            raise HeadscopeError(
                f"{source}: full-attention head [{layer}, {head}] is out of range for "
                f"{fp.n_layers} layers x {fp.n_heads} heads"
            )
        if full[layer, head]:
            raise HeadscopeError(f"{source}: full-attention head [{layer}, {head}] is listed twice")
        full[layer, head] = True
    return full


def _check_scores_matrix(scores: Any, fp: ModelFingerprint, source: str) -> None:
    shape_ok = isinstance(scores, list) and len(scores) == fp.n_layers and all(
        isinstance(row, list) and len(row) == fp.n_heads for row in scores
    )
    if not shape_ok:
        raise HeadscopeError(f"{source}: provenance 'scores' must be {fp.n_layers} lists of {fp.n_heads} numbers")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for row in scores for x in row):
        raise HeadscopeError(f"{source}: provenance 'scores' contains a non-number, NaN or infinity")


def mask_from_dict(data: Any, source: str = "mask", expect: ModelFingerprint | None = None) -> HeadMask:
    """Validate a mask payload (see ``load_mask``) and build the ``HeadMask``."""
    if not isinstance(data, dict):
        raise HeadscopeError(f"{source} is not a headscope mask file (top level is not an object)")
    if data.get("kind") != MASK_KIND:
        raise HeadscopeError(f"{source} is not a headscope mask file (kind={data.get('kind')!r})")
    if data.get("schema_version") != MASK_SCHEMA_VERSION:
        raise HeadscopeError(
            f"{source} has unknown mask schema version {data.get('schema_version')!r}; "
            f"this headscope reads version {MASK_SCHEMA_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise HeadscopeError(f"{source} lacks the keys {', '.join(missing)}")
    if not isinstance(data["model"], dict):
        raise HeadscopeError(f"{source}: 'model' must be an object")
    fp = ModelFingerprint.from_dict(data["model"])
    if min(fp.n_layers, fp.n_heads, fp.n_kv_heads) < 1 or fp.n_heads % fp.n_kv_heads:
        raise HeadscopeError(f"{source}: impossible geometry {fp.n_layers} layers, {fp.n_heads} heads, {fp.n_kv_heads} KV heads")
    if expect is not None:
        problem = expect.mismatch(fp)
        if problem:
            raise HeadscopeError(f"{source} was made for another model: {problem}")
    provenance = data["provenance"]
    if not isinstance(provenance, dict):
        raise HeadscopeError(f"{source}: 'provenance' must be an object")
    for key in ("selection", "fusion"):
        if provenance.get(key) is not None and not isinstance(provenance[key], dict):
            raise HeadscopeError(f"{source}: 'provenance.{key}' must be an object")
    if "scores" in provenance:
        _check_scores_matrix(provenance["scores"], fp, source)
    if data["ratio"] is not None and not isinstance(data["ratio"], str):
        raise HeadscopeError(f"{source}: 'ratio' must be a string like \"7:1\" or null")
    mask = HeadMask(_read_heads(data["full_attention_heads"], fp, source), fp, {"ratio": data["ratio"], **provenance})
    stored = {"n_full": data["n_full"], "head_fraction": data["head_fraction"], "kv_fraction": data["kv_fraction"]}
    actual = {"n_full": mask.n_full, "head_fraction": mask.head_fraction, "kv_fraction": mask.kv_fraction}
    for key, value in stored.items():
        if not isinstance(value, (int, float)) or abs(value - actual[key]) > 1e-9:
            raise HeadscopeError(f"{source}: '{key}' is {value!r} but the listed heads give {actual[key]!r}")
    return mask


def load_mask(path: str | os.PathLike, expect: ModelFingerprint | None = None) -> HeadMask:
    """Read and validate a mask file.

    Args:
        path: a file written by ``save_mask``.
        expect: the model the mask must fit (geometry compared, the name is not), or None.
    Returns:
        the ``HeadMask``; its provenance holds ``ratio`` and the file's provenance.
    """
    return mask_from_dict(read_json(path, "mask"), source=str(path), expect=expect)


def ranking_from_mask(mask: HeadMask) -> FusedRanking:
    """The fused importance a mask was selected from (its provenance ``scores``)."""
    scores = mask.provenance.get("scores")
    if scores is None:
        method = mask.provenance.get("selection", {}).get("method", "unknown")
        raise HeadscopeError(f"this mask ({method} selection) stores no head scores to rank by")
    return FusedRanking(torch.tensor(scores, dtype=torch.float32), mask.fingerprint, dict(mask.provenance.get("fusion") or {}))


def duo_matrix(mask: HeadMask, group_value: str = "any") -> torch.Tensor:
    """``(n_layers, n_kv_heads)`` float in [0, 1]: 1/0 per group kept (``any``) or the FA fraction."""
    fp = mask.fingerprint
    if group_value == "any":
        return mask.kv_groups_full().to(torch.float32)
    if group_value == "fraction":
        return mask.full.view(fp.n_layers, fp.n_kv_heads, fp.group_size).to(torch.float32).mean(-1)
    raise HeadscopeError(f"unknown DuoAttention group value {group_value!r}; choose one of {', '.join(GROUP_VALUES)}")


def export_duo_tsv(
    mask: HeadMask,
    path: str | os.PathLike,
    group_value: str = "any",
    sink_size: int | None = None,
    recent_size: int | None = None,
) -> Path:
    """Write DuoAttention's ``full_attention_heads.tsv`` (and ``config.json`` when sizes are given).

    Args:
        mask: the head mask.
        path: the TSV file to write.
        group_value: ``any`` (1 where the KV group keeps its cache) or ``fraction``.
        sink_size, recent_size: DuoAttention's streaming window; both or neither.
    Returns:
        the TSV path.
    """
    matrix = duo_matrix(mask, group_value)  # (L, G)
    text = "".join("\t".join(repr(float(v)) for v in row) + "\n" for row in matrix.tolist())
    if (sink_size is None) != (recent_size is None):
        raise HeadscopeError("give both sink_size and recent_size for DuoAttention's config.json, or neither")
    if sink_size is not None and not (int(sink_size) >= 0 and int(recent_size) > 0):
        raise HeadscopeError(f"DuoAttention needs sink_size >= 0 and recent_size > 0, got {sink_size} and {recent_size}")
    config = Path(path).parent / "config.json"
    existing = read_json(config, "config") if sink_size is not None and config.is_file() else {}
    if not isinstance(existing, dict) or "model_type" in existing or "architectures" in existing:
        raise HeadscopeError(f"{config} exists and is not DuoAttention's (a model's?); export the TSV into its own directory")
    if sink_size is not None:  # first: a config that cannot be written leaves the TSV as it was
        write_json_atomic(config, {**existing, "sink_size": int(sink_size), "recent_size": int(recent_size)})
    return write_text_atomic(path, text)


def export_retrieval_json(source: HeadMask | FusedRanking | HeadScores, path: str | os.PathLike) -> Path:
    """Write Retrieval_Head style ``{"layer-head": [score]}`` on one line (module docstring: the values)."""
    if isinstance(source, HeadScores):
        values = source.values.abs()
    elif isinstance(source, (HeadMask, FusedRanking)):
        fused = source.values if isinstance(source, FusedRanking) else source.provenance.get("scores")
        key = torch.zeros(source.fingerprint.shape) if fused is None else torch.as_tensor(fused, dtype=torch.float32).clone()
        if isinstance(source, HeadMask):  # the mask's heads above every other head, in their fused order
            key = key - key.min() + 1.0
            key[~source.full] = key[~source.full] - key.max() - 1.0
        order = torch.sort(key.flatten(), descending=True, stable=True).indices  # ties: layer-major order
        n = order.numel()
        values = torch.empty(n)
        values[order] = (n - torch.arange(n, dtype=torch.float32)) / n
        values = values.view(source.fingerprint.shape)
    else:
        raise HeadscopeError(f"retrieval-json export needs a HeadMask, FusedRanking or HeadScores, got {type(source).__name__}")
    payload = {f"{l}-{h}": [float(values[l, h])] for l in range(values.shape[0]) for h in range(values.shape[1])}
    return write_text_atomic(path, json.dumps(payload) + "\n")
