"""Shared set-up of every scorer: probe tensors on the model's device, cached clean and corrupt runs,
and the normalisation of a patched logit difference into a score.

Normalisation (all scorers): with ``LD`` the logit difference ``logit(answer) - logit(wrong)`` at the
last position, averaged over the probe's pairs,

* denoising (patch clean activations into the corrupt run): ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)``,
  the fraction of the clean/corrupt gap the patch *restores*;
* noising (patch corrupt activations into the clean run): ``(LD_clean - LD_patched) / (LD_clean - LD_corrupt)``,
  the fraction of the gap the patch *destroys*.

Either way 0 means "no effect" and 1 means "the whole gap". The average over pairs is taken before
normalising, as in the IOI paper; per-pair normalisation explodes on pairs whose gap is near zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.heads import HeadScores, HeadscopeError
from headscope.models import LoadedModel, weights_digest
from headscope.patching.engine import PatchEngine, RunCache
from headscope.patching.prefix import shared_prefix
from headscope.probes.base import Probe

MIN_GAP = 1e-6


@dataclass
class ProbeRun:
    """A probe prepared for patching on one model.

    Attributes:
        lm, probe: what is being scored.
        engine: the ``PatchEngine`` holding the recorded layer calls.
        clean, corrupt: cached unpatched runs (``RunCache``).
        ids: ``{"clean", "corrupt"}`` ``(N, T)`` token ids on the model's device.
        noising: True to patch corrupt into clean, False (default) to patch clean into corrupt.
    """

    lm: LoadedModel
    probe: Probe
    engine: PatchEngine
    clean: RunCache
    corrupt: RunCache
    ids: dict[str, torch.Tensor]
    noising: bool = False

    @property
    def base(self) -> RunCache:
        """The run that gets patched."""
        return self.clean if self.noising else self.corrupt

    @property
    def source(self) -> RunCache:
        """The run activations are copied from."""
        return self.corrupt if self.noising else self.clean

    @property
    def base_ids(self) -> torch.Tensor:
        return self.ids["clean" if self.noising else "corrupt"]

    @property
    def n_pairs(self) -> int:
        return self.base_ids.shape[0]

    @property
    def gap(self) -> float:
        return float(self.clean.metric.mean() - self.corrupt.metric.mean())

    def normalise(self, patched_mean: torch.Tensor) -> torch.Tensor:
        """Turn a mean patched logit difference (any shape) into the normalised score."""
        clean, corrupt = float(self.clean.metric.mean()), float(self.corrupt.metric.mean())
        if self.noising:
            return (clean - patched_mean) / (clean - corrupt)
        return (patched_mean - corrupt) / (clean - corrupt)

    def to_scores(self, values: torch.Tensor, method: str, **meta) -> HeadScores:
        """Wrap ``(n_layers, n_heads)`` normalised values as ``HeadScores`` with provenance."""
        return HeadScores(
            values=values,
            probe=self.probe.name,
            method=method,
            fingerprint=self.lm.fingerprint,
            capability=self.probe.capability,
            meta={
                "n_pairs": self.n_pairs,
                "length": self.probe.length,
                "pairs_sha256": self.probe.digest(),
                "direction": "noising" if self.noising else "denoising",
                "ld_clean": float(self.clean.metric.mean()),
                "ld_corrupt": float(self.corrupt.metric.mean()),
                # per pair: does the clean prompt put the answer above the wrong token, and above what its corrupt twin does
                "clean_answer_wins": float((self.clean.metric > 0).float().mean()),
                "pairs_gap_positive": float((self.clean.metric > self.corrupt.metric).float().mean()),
                "attn_implementation": self.lm.attn_implementation,
                "dtype": str(self.lm.dtype),
                "weights_digest": weights_digest(self.lm.model),  # (two checkpoints of one shape differ here)
                **{k: v for k, v in self.probe.meta.items() if isinstance(v, (int, float, str, bool))},
                **meta,
            },
        )


def prepare(lm: LoadedModel, probe: Probe, noising: bool = False, reuse_prefix: bool = True) -> ProbeRun:
    """Validate ``probe`` against ``lm``, record the clean and corrupt runs.

    Args:
        reuse_prefix: keep the keys/values of the positions each pair's clean and corrupt prompts share
            (``headscope.patching.prefix``) so patched runs start after them; False for scorers whose
            intervention changes those positions too.

    Raises:
        HeadscopeError: the probe is longer than the context, uses ids outside the vocabulary, or the
            model does not tell clean from corrupt (zero logit-difference gap).
    """
    vocab = getattr(lm.model.config, "vocab_size", None)
    probe.check_fits(lm.max_context, vocab)
    tensors = probe.tensors(lm.device)
    directions, offsets = lm.logit_direction(tensors["answer"], tensors["wrong"])
    engine = PatchEngine(lm, directions.detach(), offsets.detach())
    clean = engine.record(tensors["clean"], shared_prefix(tensors["clean"], tensors["corrupt"]) if reuse_prefix else None)
    corrupt = engine.record(tensors["corrupt"])
    run = ProbeRun(lm, probe, engine, clean, corrupt, {"clean": tensors["clean"], "corrupt": tensors["corrupt"]}, noising)
    if abs(run.gap) < MIN_GAP:
        raise HeadscopeError(
            f"probe {probe.name}: the model's logit difference is the same on clean and corrupt prompts "
            f"(gap {run.gap:.2e}), so there is nothing to attribute"
        )
    return run
