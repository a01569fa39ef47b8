"""Fuse several per-head scores (capabilities x probes x methods) into one ranking of heads.

HydraHead keeps full attention on the heads that matter for *any* of the target capabilities, so the
scores of retrieval probes and reasoning probes, from activation patching, path patching or
attribution, must become one ordering. Raw scores are not comparable across probes (a logit-difference
recovery of 0.3 on a needle probe says nothing about 0.3 on an MQAR probe), so each score matrix is
first normalised on its own and only then combined.

Per-score normalisation (always of the magnitude ``|score|``):

* ``rank``: the rank of ``|score|`` among the ``L*H`` heads, ties averaged, scaled to ``[0, 1]``
  (1 = the largest magnitude). Robust to outliers and to the scale of each method.
* ``zscore``: ``(|s| - mean|s|) / std|s|`` (population std; all zeros when every head is equal).
  Keeps how far a head stands out, so one dominant head counts more than under ``rank``.

Sign: a patching score is negative when restoring the head moves the metric the wrong way (e.g. a
head that suppresses the answer). The behaviour still depends on that head, and turning it into a
linear-attention head would change the model just as much, so importance is the magnitude. The sign
stays visible in the per-probe reports.

Combination rules over the normalised matrices ``n_i`` with weights ``w_i`` (summing to 1):

* ``mean``: ``sum_i w_i n_i``. By default every *capability* weighs the same and its weight is split
  equally among its inputs, so a capability with four probes does not outweigh one with two.
  ``weights`` may instead give one weight per input (a sequence) or per capability (a mapping).
* ``rrf``: reciprocal rank fusion (Cormack et al. 2009), ``sum_i w_i / (k + rank_i)`` with
  ``rank_i`` the 1-based rank of ``|score_i|`` (ties averaged) and ``k = 60`` by default, the value of
  the original paper, which damps the difference between the very top ranks. It works on ranks, so
  ``normalise`` must be ``rank``. With equal weights it orders heads exactly like the textbook RRF.
* ``max``: ``max_i n_i``: a head is as important as its best showing on any input; weights do not
  apply (passing them is an error).

The ``order`` of a ``FusedRanking`` breaks ties by (layer, head) so it is deterministic.

Caveat (``benchmarks/fusion_recovery.py``): when probes rely on *different* sparse sets of heads, as
patching scores usually do, ``rank`` + ``mean`` dilutes them: the near-zero noise heads of the other
probes get ranks spread over [0, 1], so a head that is decisive for one probe averages to ~0.6, like
a head that is mildly above noise everywhere. On synthetic planted scores (28 x 16 heads, 4 probes
with 12 heads each, 7:1 mask) ``rank``/``mean`` kept 34 % of the planted heads and ``rrf`` 59 %, while
``zscore``/``mean``, ``rank``/``max`` and ``zscore``/``max`` kept all of them; with heads shared by
all probes every combination kept all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headscope.heads import Head, HeadscopeError, HeadScores, ModelFingerprint

NORMALISATIONS = ("rank", "zscore")
RULES = ("mean", "rrf", "max")
DEFAULT_RRF_K = 60.0


@dataclass
class FusedRanking:
    """One ranking of all heads.

    Attributes:
        values: ``(n_layers, n_heads)`` float32; higher = more important.
        fingerprint: the model the ranking belongs to.
        provenance: inputs (probe, method, capability, weight, source), normalisation, rule, rrf_k.
        order: every head, best first (ties broken by layer, then head).
    """

    values: torch.Tensor
    fingerprint: ModelFingerprint
    provenance: dict[str, Any] = field(default_factory=dict)
    order: list[Head] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float32).detach().cpu()
        if self.values.shape != self.fingerprint.shape:
            raise HeadscopeError(
                f"fused values have shape {tuple(self.values.shape)} but the model has "
                f"{self.fingerprint.n_layers} layers x {self.fingerprint.n_heads} heads"
            )
        if not torch.isfinite(self.values).all():
            raise HeadscopeError("fused values contain NaN or infinity")
        flat_order = torch.argsort(self.values.flatten(), descending=True, stable=True)
        n_heads = self.fingerprint.n_heads
        self.order = [Head(int(i) // n_heads, int(i) % n_heads) for i in flat_order]

    def top(self, k: int) -> list[Head]:
        """The ``k`` most important heads, best first."""
        return self.order[:k]

    def ranks(self) -> torch.Tensor:
        """``(n_layers, n_heads)`` long: 1 for the best head, ``L*H`` for the worst (ties by index)."""
        ranks = torch.empty(self.values.numel(), dtype=torch.long)
        n_heads = self.fingerprint.n_heads
        for position, head in enumerate(self.order):
            ranks[head.layer * n_heads + head.head] = position + 1
        return ranks.view(self.fingerprint.shape)

    def to_scores(self) -> HeadScores:
        """The fused values as a ``HeadScores`` (probe ``fused``), e.g. for plotting."""
        method = f"{self.provenance.get('normalisation', '?')}-{self.provenance.get('rule', '?')}"
        return HeadScores(self.values, "fused", method, self.fingerprint, "fused", dict(self.provenance))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ascending 1-based ranks of a 1-D tensor, tied values sharing their average rank.

    Args:
        values: ``(N,)`` float.
    Returns:
        ``(N,)`` float64: 1 for the smallest value, ``N`` for the largest.
    """
    sorted_values, order = torch.sort(values, stable=True)
    _, group_of_sorted, group_sizes = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    group_ends = group_sizes.cumsum(0).to(torch.float64)  # last 1-based rank of each tie group
    group_mean_rank = group_ends - (group_sizes.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_mean_rank[group_of_sorted]
    return ranks


def normalise_scores(values: torch.Tensor, method: str) -> torch.Tensor:
    """Normalise one score matrix by the magnitude of its entries.

    Args:
        values: ``(L, H)`` raw scores (any sign).
        method: ``rank`` (``[0, 1]``, 1 = largest ``|score|``) or ``zscore`` (of ``|score|``).
    Returns:
        ``(L, H)`` float64, higher = more important.
    """
    magnitude = values.abs().to(torch.float64).flatten()  # (L*H,)
    if method == "rank":
        n = magnitude.numel()
        scaled = (average_ranks(magnitude) - 1) / (n - 1) if n > 1 else torch.ones_like(magnitude)
        return scaled.view(values.shape)
    if method == "zscore":
        std = magnitude.std(unbiased=False)
        centred = magnitude - magnitude.mean()
        return (centred / std if std > 0 else torch.zeros_like(centred)).view(values.shape)
    raise HeadscopeError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALISATIONS)}")


def describe(scores: HeadScores) -> str:
    """How error messages name one input: its source file if known, then probe/method."""
    source = scores.meta.get("source")
    label = f"{scores.probe}/{scores.method}"
    return f"{source} ({label})" if source else label


def input_weights(scores: Sequence[HeadScores], weights: Sequence[float] | Mapping[str, float] | None) -> torch.Tensor:
    """One weight per input, summing to 1.

    Args:
        scores: the inputs.
        weights: None (equal per capability, split equally inside it), a sequence (one per input) or a
            mapping capability -> weight (split equally among that capability's inputs).
    Returns:
        ``(S,)`` float64.
    """
    capabilities = [s.capability for s in scores]
    members = {cap: capabilities.count(cap) for cap in capabilities}
    if weights is None:
        raw = [1.0 / (len(members) * members[cap]) for cap in capabilities]
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(members))
        if unknown:
            raise HeadscopeError(f"weights name capabilities {unknown} that no input has (inputs have {sorted(members)})")
        missing = sorted(set(members) - set(weights))
        if missing:
            raise HeadscopeError(f"no weight given for capabilities {missing}")
        raw = [float(weights[cap]) / members[cap] for cap in capabilities]
    else:
        raw = [float(w) for w in weights]
        if len(raw) != len(scores):
            raise HeadscopeError(f"{len(raw)} weights given for {len(scores)} score inputs")
    tensor = torch.tensor(raw, dtype=torch.float64)
    if not torch.isfinite(tensor).all() or (tensor < 0).any() or tensor.sum() <= 0:
        raise HeadscopeError(f"weights must be finite, non-negative and not all zero, got {raw}")
    return tensor / tensor.sum()


def _check_inputs(scores: Sequence[HeadScores]) -> ModelFingerprint:
    if len(scores) == 0:
        raise HeadscopeError("nothing to fuse: no score inputs given")
    reference = scores[0].fingerprint
    for item in scores:
        problem = reference.mismatch(item.fingerprint)
        if problem:
            raise HeadscopeError(
                f"{describe(item)} was scored on another model than {describe(scores[0])}: {problem}"
            )
        if not torch.isfinite(item.values).all():
            raise HeadscopeError(f"{describe(item)} contains NaN or infinite scores")
    return reference


def fuse(
    scores: Sequence[HeadScores],
    normalise: str | None = None,
    rule: str = "mean",
    weights: Sequence[float] | Mapping[str, float] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
) -> FusedRanking:
    """Fuse per-head scores into one ranking (see the module docstring for every option).

    Args:
        scores: ``S`` HeadScores of one model, each ``(L, H)``.
        normalise: ``zscore`` or ``rank``; default ``rank`` for ``rrf``, else ``zscore``, which keeps heads that matter for one probe
            only: on planted sparse scores (``benchmarks/fusion_recovery.py``) ``rank`` + ``mean`` recovered
            34% of the planted heads at 7:1, ``zscore`` + ``mean`` all of them.
        rule: ``mean`` (default), ``rrf`` or ``max``.
        weights: for ``mean``/``rrf``: None, one per input, or one per capability.
        rrf_k: the RRF constant (``rrf`` only), must be >= 0.
    Returns:
        ``FusedRanking`` with ``values (L, H)`` (higher = more important) and provenance.
    """
    fingerprint = _check_inputs(scores)
    if normalise is None:
        normalise = "rank" if rule == "rrf" else "zscore"
    if normalise not in NORMALISATIONS:
        raise HeadscopeError(f"unknown normalisation {normalise!r}; choose one of {', '.join(NORMALISATIONS)}")
    if rule not in RULES:
        raise HeadscopeError(f"unknown fusion rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "rrf" and normalise != "rank":
        raise HeadscopeError("rule 'rrf' fuses ranks; use normalise='rank' with it")
    if rule == "max" and weights is not None:
        raise HeadscopeError("rule 'max' takes no weights")
    if rule == "rrf" and not 0 <= rrf_k < float("inf"):
        raise HeadscopeError(f"rrf_k must be a finite number >= 0, got {rrf_k}")

    weight = input_weights(scores, weights)  # (S,)
    if rule == "rrf":
        n = fingerprint.n_layers * fingerprint.n_heads
        # 1-based descending rank of |score| (ties averaged) = n + 1 - ascending rank
        ranks = torch.stack([n + 1 - average_ranks(s.values.abs().to(torch.float64).flatten()) for s in scores])  # (S, L*H)
        fused = (weight[:, None] / (rrf_k + ranks)).sum(0).view(fingerprint.shape)
    else:
        normalised = torch.stack([normalise_scores(s.values, normalise) for s in scores])  # (S, L, H)
        fused = normalised.amax(0) if rule == "max" else (weight[:, None, None] * normalised).sum(0)

    inputs = []
    for item, w in zip(scores, weight.tolist()):
        entry = {"probe": item.probe, "method": item.method, "capability": item.capability}
        if rule != "max":
            entry["weight"] = w
        if item.meta.get("source"):
            entry["source"] = str(item.meta["source"])
        inputs.append(entry)
    provenance: dict[str, Any] = {"inputs": inputs, "normalisation": normalise, "rule": rule}
    if rule == "rrf":
        provenance["rrf_k"] = float(rrf_k)
    return FusedRanking(fused.to(torch.float32), fingerprint, provenance)
