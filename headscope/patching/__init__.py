"""Head scorers. Every scorer has one signature::

    scorer(lm: LoadedModel, probe: Probe, *, noising=False, batch_size=None, progress=True, **options) -> HeadScores

and is registered in ``SCORERS`` under its method name; ``score(lm, probe, method)`` dispatches. Under
torchrun, inside ``sharding.sharded(env)``, the scorers split their patched runs over the processes by head.
"""

from __future__ import annotations

from typing import Callable

from headscope.heads import HeadScores, HeadscopeError
from headscope.models import LoadedModel
from headscope.patching.activation import activation_scores, activation_scores_by_position, direct_scores
from headscope.patching.attribution import attribution_scores, rank_correlation, screen_order, screen_scores
from headscope.patching.path import Receiver, parse_receivers, path_scores
from headscope.patching.rope import rope_dependence_scores
from headscope.probes.base import Probe

Scorer = Callable[..., HeadScores]

SCORERS: dict[str, Scorer] = {
    "activation": activation_scores,
    "direct": direct_scores,
    "path": path_scores,
    "attribution": attribution_scores,
    "screen": screen_scores,
    "rope": rope_dependence_scores,
}


def register_scorer(name: str, scorer: Scorer) -> None:
    """Add a scorer under ``name`` (it must follow the common signature)."""
    SCORERS[name] = scorer


def score(lm: LoadedModel, probe: Probe, method: str = "activation", **options) -> HeadScores:
    """Score every head of ``lm`` on ``probe`` with ``method`` (a key of ``SCORERS``)."""
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise HeadscopeError(f"unknown scoring method {method!r}; available: {', '.join(sorted(SCORERS))}") from None
    return scorer(lm, probe, **options)


__all__ = [
    "SCORERS", "Receiver", "Scorer", "activation_scores", "activation_scores_by_position", "attribution_scores", "direct_scores",
    "parse_receivers", "path_scores", "rank_correlation", "register_scorer", "rope_dependence_scores", "score", "screen_order", "screen_scores",
]
