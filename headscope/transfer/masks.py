"""The head mask a transfer run builds its hybrid from: a mask file, or a layer-wise / random baseline.

* ``hybrid.mask: PATH``: a mask JSON file (``full_attention_heads`` as ``[layer, head]`` pairs and the
  ``model`` fingerprint, the format ``headscope.heads.HeadMask`` documents); its fingerprint must match
  the teacher's.
* ``hybrid.baseline: layerwise``: whole layers at full attention, ``round(fa_fraction * n_layers)`` of
  them (at least one), evenly spaced with the last layer of each block full (``fa_fraction = 0.25`` on
  8 layers: layers 3 and 7, the 3:1 pattern of Qwen3-Next), or exactly ``hybrid.fa_layers``.
* ``hybrid.baseline: random``: ``round(fa_fraction * n_layers * n_heads)`` query heads (at least one)
  drawn uniformly without replacement by a generator seeded with ``hybrid.seed``.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadMask, HeadscopeError, ModelFingerprint, read_json
from headscope.transfer.config import HybridSpec


def read_mask_file(path: str, fingerprint: ModelFingerprint) -> HeadMask:
    """Read a mask JSON file and check it belongs to a model of ``fingerprint``'s geometry."""
    data = read_json(path, "mask")
    pairs = data.get("full_attention_heads") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise HeadscopeError(f"mask {path}: 'full_attention_heads' must be a list of [layer, head] pairs")
    if "model" in data:
        problem = fingerprint.mismatch(ModelFingerprint.from_dict(data["model"]))
        if problem:
            raise HeadscopeError(f"mask {path} belongs to another model: {problem}")
    full = torch.zeros(fingerprint.shape, dtype=torch.bool)
    for layer, head in pairs:
        if not (0 <= layer < fingerprint.n_layers and 0 <= head < fingerprint.n_heads):
            raise HeadscopeError(f"mask {path}: head [{layer}, {head}] is outside {fingerprint.n_layers} layers x {fingerprint.n_heads} heads")
        full[layer, head] = True
    return HeadMask(full, fingerprint, {"source": str(path), **dict(data.get("provenance", {}))})


def layerwise_mask(fingerprint: ModelFingerprint, fa_fraction: float, fa_layers: list[int] | None = None) -> HeadMask:
    """Whole layers at full attention (see the module docstring)."""
    n_layers = fingerprint.n_layers
    if fa_layers is None:
        n_full = max(1, round(fa_fraction * n_layers))
        fa_layers = [round((i + 1) * n_layers / n_full) - 1 for i in range(n_full)]
    bad = [l for l in fa_layers if not 0 <= l < n_layers]
    if bad:
        raise HeadscopeError(f"hybrid.fa_layers {bad} outside the model's {n_layers} layers")
    full = torch.zeros(fingerprint.shape, dtype=torch.bool)
    full[sorted(set(fa_layers))] = True
    return HeadMask(full, fingerprint, {"baseline": "layerwise", "fa_layers": sorted(set(fa_layers))})


def random_mask(fingerprint: ModelFingerprint, fa_fraction: float, seed: int) -> HeadMask:
    """Uniformly random full-attention heads (see the module docstring)."""
    n_total = fingerprint.n_layers * fingerprint.n_heads
    n_full = max(1, round(fa_fraction * n_total))
    chosen = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n_full]
    full = torch.zeros(n_total, dtype=torch.bool)
    full[chosen] = True
    return HeadMask(full.view(fingerprint.shape), fingerprint, {"baseline": "random", "fa_fraction": fa_fraction, "seed": seed})


def resolve_mask(spec: HybridSpec, fingerprint: ModelFingerprint) -> HeadMask:
    """The ``HeadMask`` of a run's ``hybrid`` section."""
    if spec.mask is not None:
        return read_mask_file(spec.mask, fingerprint)
    if spec.baseline == "layerwise":
        return layerwise_mask(fingerprint, spec.fa_fraction, spec.fa_layers)
    if spec.baseline == "random":
        return random_mask(fingerprint, spec.fa_fraction, spec.seed)
    raise HeadscopeError(f"hybrid: unknown baseline {spec.baseline!r}")


def mask_to_json(mask: HeadMask) -> dict:
    """The JSON payload ``read_mask_file`` reads."""
    return {
        "kind": "headscope.mask",
        "model": mask.fingerprint.to_dict(),
        "full_attention_heads": [[h.layer, h.head] for h in mask.heads()],
        "provenance": mask.provenance,
    }
