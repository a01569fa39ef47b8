"""Task accuracy of a causal LM on headscope's probes.

For every clean prompt of a probe the model's logits at the last position are read and two numbers are
kept: whether the answer token is the argmax over the whole vocabulary (``argmax``; chance is about one
over the number of answers the task can have), and whether the answer's logit beats the logit of the
corrupt prompt's answer (``beats_wrong``; chance 0.5). The mean logit difference answer - wrong is kept too.
These are the numbers on the demo model's card and in its test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from headscope.models import takes_logits_to_keep
from headscope.probes.base import Probe


@dataclass(frozen=True)
class ProbeAccuracy:
    """Accuracy of one model on one probe (clean prompts only)."""

    task: str
    length: int
    n_pairs: int
    argmax: float
    beats_wrong: float
    mean_logit_diff: float
    corrupt_logit_diff: float | None = None  # mean answer - wrong on the corrupt prompts (``with_corrupt``)

    @property
    def gap(self) -> float | None:
        """Clean minus corrupt mean logit difference: the span patching scores are normalised by."""
        return None if self.corrupt_logit_diff is None else self.mean_logit_diff - self.corrupt_logit_diff

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` float32 logits at the last position of ``ids`` ``(B, T)``; only that position goes through the
    output head where the model's forward takes ``logits_to_keep`` (a 150K vocabulary over 16 x 1024 positions
    would be ~10 GB of logits)."""
    keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    return model(input_ids=ids, **keep).logits[:, -1, :].float()


@torch.no_grad()
def pair_results(model: nn.Module, probe: Probe, batch_size: int = 16, with_corrupt: bool = False) -> dict[str, torch.Tensor]:
    """Per pair of ``probe``, from the last-position logits of its clean prompts (on the model's device, in eval mode).

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` is ``(B, T, V)``).
        probe: prompt pairs; ``clean``, ``answer`` and ``wrong`` are used, ``corrupt`` too with ``with_corrupt``.
        batch_size: prompts per forward.
        with_corrupt: also run the corrupt prompts, for ``corrupt_logit_diff``.
    Returns:
        ``(N,)`` CPU tensors: ``hit`` (the answer is the argmax), ``beats`` (answer > wrong), ``logit_diff`` (answer -
        wrong), and with ``with_corrupt`` ``corrupt_logit_diff`` (the same on the corrupt prompt).
    """
    device = next(model.parameters()).device
    tensors = probe.tensors(device)
    was_training = model.training
    model.eval()
    hits, beats, diffs, corrupt_diffs = [], [], [], []
    try:
        for start in range(0, len(probe), batch_size):
            clean = tensors["clean"][start : start + batch_size]  # (b, T)
            answer = tensors["answer"][start : start + batch_size]  # (b,)
            wrong = tensors["wrong"][start : start + batch_size]  # (b,)
            last = last_logits(model, clean)  # (b, V)
            answer_logit = last.gather(1, answer[:, None])[:, 0]
            wrong_logit = last.gather(1, wrong[:, None])[:, 0]
            hits.append(last.argmax(dim=-1) == answer)
            beats.append(answer_logit > wrong_logit)
            diffs.append(answer_logit - wrong_logit)
            if with_corrupt:
                corrupt = last_logits(model, tensors["corrupt"][start : start + batch_size])  # (b, V)
                corrupt_diffs.append(corrupt.gather(1, answer[:, None])[:, 0] - corrupt.gather(1, wrong[:, None])[:, 0])
    finally:
        model.train(was_training)
    out = {"hit": torch.cat(hits).cpu(), "beats": torch.cat(beats).cpu(), "logit_diff": torch.cat(diffs).cpu()}
    if with_corrupt:
        out["corrupt_logit_diff"] = torch.cat(corrupt_diffs).cpu()
    return out


def probe_accuracy(model: nn.Module, probe: Probe, batch_size: int = 16, with_corrupt: bool = False) -> ProbeAccuracy:
    """Score the clean prompts of ``probe`` with ``model``: the means of :func:`pair_results` (same arguments)."""
    pairs = pair_results(model, probe, batch_size, with_corrupt)
    return ProbeAccuracy(
        task=probe.name,
        length=probe.length,
        n_pairs=len(probe),
        argmax=pairs["hit"].float().mean().item(),
        beats_wrong=pairs["beats"].float().mean().item(),
        mean_logit_diff=pairs["logit_diff"].mean().item(),
        corrupt_logit_diff=pairs["corrupt_logit_diff"].mean().item() if with_corrupt else None,
    )


def task_accuracies(
    model: nn.Module,
    make_probe: Callable[..., Probe],
    tokenizer: Any,
    tasks: Iterable[str],
    lengths: Iterable[int],
    n_pairs: int,
    batch_size: int = 16,
) -> list[ProbeAccuracy]:
    """``probe_accuracy`` for every task at every length.

    Args:
        make_probe: ``make_probe(name, tokenizer, length=..., n_pairs=...) -> Probe``.
        tasks, lengths: the grid to score.
        n_pairs: prompts per (task, length).
    Returns:
        One ``ProbeAccuracy`` per (task, length), tasks outer.
    """
    grid = [(task, length) for task in tasks for length in lengths]
    results = []
    for task, length in tqdm(grid, desc="probe accuracy", leave=False):
        probe = make_probe(task, tokenizer, length=length, n_pairs=n_pairs)
        results.append(probe_accuracy(model, probe, batch_size))
    return results


def embedding_similarity(model: nn.Module, tokenizer: Any, words: Iterable[str]) -> float:
    """Mean pairwise cosine similarity of the input embeddings of ``words`` (each must be one token).

    A health check for key matching: the keys of the needle and key-value tasks are never predictable, and
    with tied embeddings their embeddings collapse onto one direction (0.93 in the first demo model, which
    stayed at chance on every key-matching task); distinct keys stay well below that (values: ~0.2).
    """
    vocab = tokenizer.get_vocab()
    ids = [vocab[word] for word in words if word in vocab]
    if len(ids) < 2:
        raise ValueError("embedding_similarity needs at least two words of the vocabulary")
    emb = model.get_input_embeddings().weight.detach().float()[ids]
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = emb @ emb.T
    n = len(ids)
    return ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item()
