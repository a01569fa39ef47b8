"""Probes: clean/corrupt prompt pairs that isolate one capability.

A probe is a list of ``PromptPair``s. In each pair the clean and corrupt prompts have the same token
length and differ only where the capability matters (the needle's value, the bound variable, the
indirect object ...). ``answer_id`` is the token the clean prompt should produce next, ``wrong_id`` the
one the corrupt prompt points to. The metric is the logit difference at the last position,
``logit(answer) - logit(wrong)``; patching scores are normalised between the corrupt and clean values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from headscope.heads import HeadscopeError

CAPABILITIES = ("retrieval", "reasoning")


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupt pair of token-id prompts of equal length."""

    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    answer_id: int
    wrong_id: int


@dataclass
class Probe:
    """A named set of prompt pairs for one capability.

    Attributes:
        name: e.g. ``"needle_single"``.
        capability: ``"retrieval"`` or ``"reasoning"``.
        pairs: the prompt pairs; all of one token length.
        metric: ``"logit_diff"`` (the only metric the scorers implement).
        meta: generator settings (length, seed, texts ...).
    """

    name: str
    capability: str
    pairs: list[PromptPair]
    metric: str = "logit_diff"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capability not in CAPABILITIES:
            raise HeadscopeError(f"probe {self.name}: capability must be one of {CAPABILITIES}, got {self.capability!r}")
        if not self.pairs:
            raise HeadscopeError(f"probe {self.name} has no prompt pairs")
        for index, pair in enumerate(self.pairs):
            if len(pair.clean_ids) != len(pair.corrupt_ids):
                raise HeadscopeError(
                    f"probe {self.name}, pair {index}: clean has {len(pair.clean_ids)} tokens but corrupt has "
                    f"{len(pair.corrupt_ids)}; clean and corrupt prompts must have equal token length"
                )
            if pair.answer_id == pair.wrong_id:
                raise HeadscopeError(f"probe {self.name}, pair {index}: answer and wrong token are the same")
        lengths = {len(p.clean_ids) for p in self.pairs}
        if len(lengths) != 1:
            raise HeadscopeError(
                f"probe {self.name}: pairs have different token lengths {sorted(lengths)}; "
                "all pairs of a probe must share one length"
            )

    @property
    def length(self) -> int:
        return len(self.pairs[0].clean_ids)

    def __len__(self) -> int:
        return len(self.pairs)

    def digest(self) -> str:
        """A hash of every pair's token ids and answer/wrong ids: scores of the same pairs carry the same one."""
        payload = json.dumps([[p.clean_ids, p.corrupt_ids, p.answer_id, p.wrong_id] for p in self.pairs])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def subset(self, n_pairs: int) -> "Probe":
        """The first ``n_pairs`` pairs (all of them if fewer exist)."""
        return Probe(self.name, self.capability, self.pairs[:n_pairs], self.metric, dict(self.meta))

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Stack the pairs.

        Returns:
            ``clean`` and ``corrupt``: ``(N, T)`` long; ``answer`` and ``wrong``: ``(N,)`` long.
        """
        return {
            "clean": torch.tensor([p.clean_ids for p in self.pairs], dtype=torch.long, device=device),
            "corrupt": torch.tensor([p.corrupt_ids for p in self.pairs], dtype=torch.long, device=device),
            "answer": torch.tensor([p.answer_id for p in self.pairs], dtype=torch.long, device=device),
            "wrong": torch.tensor([p.wrong_id for p in self.pairs], dtype=torch.long, device=device),
        }

    def check_fits(self, max_context: int | None, vocab_size: int | None = None) -> None:
        """Raise if the prompts are longer than the model's context or use ids outside its vocabulary."""
        if max_context is not None and self.length > max_context:
            raise HeadscopeError(
                f"probe {self.name} has {self.length}-token prompts but the model's context is {max_context} tokens"
            )
        if vocab_size is not None:
            top = max(max(max(p.clean_ids), max(p.corrupt_ids), p.answer_id, p.wrong_id) for p in self.pairs)
            if top >= vocab_size:
                raise HeadscopeError(f"probe {self.name} uses token id {top} but the model's vocabulary has {vocab_size}")
