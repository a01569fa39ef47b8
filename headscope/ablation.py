"""Ablation check: do the selected heads matter more than the same number of random heads?

This is the Retrieval_Head paper's test (Wu et al. 2024: masking the top retrieval heads breaks needle
retrieval, masking as many random heads does not), with mean ablation instead of zeroing. Patching
scores say how much of a probe's clean-corrupt gap one head carries on its own; the ablation check asks
the question a hybrid depends on: with a whole SET of heads knocked out, does the model still solve the
task? It costs forwards only, no training.

* **Mean ablation.** Head ``h`` of layer ``l`` contributes its slice of the output projection's input
  (the per-head attention output, TransformerLens' ``hook_z``). Ablating it replaces that slice, at every
  position of every prompt, with its mean over the positions of a set of *reference prompts* (the clean
  prompts of the same probe with another seed), so the residual stream stays on-distribution (zeroing
  adds a large, arbitrary shift) while the head's prompt-specific information is gone.
* **Selected vs random.** For each ``k`` the selected set is the ``k`` best heads of a scores file (by
  score, not magnitude: a head that works against the answer is not a retrieval head) or the FA heads of
  a mask; the baseline is ``n_random`` sets of ``k`` heads drawn uniformly from the heads *outside* the
  selected set (seeded), so any gap between the two is the selected heads' doing.
* **Reported:** argmax accuracy and mean logit difference (answer - wrong) on fresh clean prompts,
  unablated, with the selected heads ablated, and per random set (their mean and spread).
"""

from __future__ import annotations

import random
import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadscopeError
from headscope.models import LoadedModel
from headscope.patching.engine import hooked, patched_head_outputs, write_heads
from headscope.probes.base import Probe
from headscope.zoo.evaluate import ProbeAccuracy, probe_accuracy


@torch.no_grad()
def head_means(lm: LoadedModel, reference: Probe, batch_size: int = 16) -> torch.Tensor:
    """Every head's mean output over all positions of the reference probe's clean prompts.

    Returns:
        ``(n_layers, n_heads, head_dim)`` float32 means.
    """
    fp = lm.fingerprint
    sums = torch.zeros(fp.n_layers, fp.n_heads * fp.head_dim, dtype=torch.float64, device=lm.device)
    count = 0
    clean = reference.tensors(lm.device)["clean"]  # (N, T)

    def make_hook(layer: int):
        def hook(module, args):
            sums[layer] += args[0].reshape(-1, args[0].shape[-1]).double().sum(0)  # (H * D,)

        return hook

    with hooked([(lm.out_proj(layer), "pre", make_hook(layer)) for layer in range(fp.n_layers)]):
        for start in range(0, clean.shape[0], batch_size):
            batch = clean[start : start + batch_size]  # (b, T)
            lm.model(input_ids=batch)
            count += batch.numel()
    return (sums / count).float().view(fp.n_layers, fp.n_heads, fp.head_dim)


@contextmanager
def mean_ablated(lm: LoadedModel, heads: Sequence[Head], means: torch.Tensor) -> Iterator[None]:
    """Inside the block, the outputs of ``heads`` are their means (``head_means``) at every position."""
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        if not lm.fingerprint.has_head(head):
            raise HeadscopeError(f"head {head} is not in {lm.fingerprint.name} ({lm.fingerprint.n_layers} x {lm.fingerprint.n_heads})")
        by_layer.setdefault(head.layer, []).append(head.head)

    # (k, D) means broadcast over every row and position of the batch
    patches = {layer: write_heads(means[layer, hs], hs, lm.fingerprint.n_heads) for layer, hs in by_layer.items()}
    with patched_head_outputs(lm, patches):
        yield


def random_head_sets(all_heads: Sequence[Head], exclude: Sequence[Head], k: int, n_sets: int, seed: int) -> list[list[Head]]:
    """``n_sets`` sets of ``k`` heads drawn from ``all_heads`` minus ``exclude``, seeded per set."""
    pool = sorted(set(all_heads) - set(exclude))
    if k > len(pool):
        raise HeadscopeError(f"cannot draw {k} random heads from the {len(pool)} heads outside the selected set")
    return [sorted(random.Random(f"ablate/{seed}/{k}/{i}").sample(pool, k)) for i in range(n_sets)]


@dataclass
class AblationRow:
    """The probe's accuracy with one set of heads mean-ablated."""

    k: int
    selection: str  # "none", "selected" or "random"
    seed: int | None
    heads: list[str]
    argmax: float
    logit_diff: float


@dataclass
class AblationResult:
    """Unablated, selected and random rows of one probe; ``summary()`` compares them per k."""

    probe: str
    length: int
    n_pairs: int
    source: str  # what the selection came from (scores file / mask)
    rows: list[AblationRow] = field(default_factory=list)

    def summary(self) -> list[dict]:
        """Per k: selected accuracy / logit diff against the random sets' mean and standard deviation."""
        def stats(values: list[float]) -> tuple[float, float]:
            return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0

        base = next(r for r in self.rows if r.selection == "none")
        out = []
        for k in sorted({r.k for r in self.rows if r.selection == "selected"}):
            chosen = next(r for r in self.rows if r.selection == "selected" and r.k == k)
            rand = [r for r in self.rows if r.selection == "random" and r.k == k]
            acc_mean, acc_sd = stats([r.argmax for r in rand])
            ld_mean, ld_sd = stats([r.logit_diff for r in rand])
            out.append({
                "k": k, "base_argmax": base.argmax, "base_logit_diff": base.logit_diff,
                "selected_argmax": chosen.argmax, "selected_logit_diff": chosen.logit_diff,
                "random_argmax_mean": acc_mean, "random_argmax_sd": acc_sd,
                "random_logit_diff_mean": ld_mean, "random_logit_diff_sd": ld_sd, "n_random": len(rand),
            })
        return out

    def to_dict(self) -> dict:
        return {"probe": self.probe, "length": self.length, "n_pairs": self.n_pairs, "source": self.source,
                "rows": [asdict(r) for r in self.rows], "summary": self.summary()}


def ablation_check(
    lm: LoadedModel,
    probe: Probe,
    reference: Probe,
    ranked: Sequence[Head],
    ks: Sequence[int],
    n_random: int = 5,
    seed: int = 0,
    source: str = "",
    batch_size: int = 16,
    progress: bool = True,
) -> AblationResult:
    """Mean-ablate the top ``k`` of ``ranked`` and ``n_random`` random k-sets, for each ``k`` in ``ks``.

    Args:
        probe: evaluation pairs (fresh: not the ones the heads were scored on).
        reference: prompts the head means are taken over (``head_means``).
        ranked: heads best first (``HeadScores.top(k, by_magnitude=False)`` or a mask's heads).
        ks: set sizes; each at most ``len(ranked)``.
    """
    if not ks or min(ks) < 1 or max(ks) > len(ranked):
        raise HeadscopeError(f"ablation sizes must be between 1 and {len(ranked)} (the selected heads), got {list(ks)}")
    means = head_means(lm, reference, batch_size)
    all_heads = [Head(layer, head) for layer in range(lm.fingerprint.n_layers) for head in range(lm.fingerprint.n_heads)]
    plan: list[tuple[int, str, int | None, list[Head]]] = [(0, "none", None, [])]
    for k in ks:
        plan.append((k, "selected", None, list(ranked[:k])))
        plan += [(k, "random", i, heads) for i, heads in enumerate(random_head_sets(all_heads, ranked[:k], k, n_random, seed))]
    result = AblationResult(probe.name, probe.length, len(probe), source)
    for k, selection, set_seed, heads in tqdm(plan, desc=f"ablate {probe.name}", disable=not progress, leave=False):
        with mean_ablated(lm, heads, means):
            accuracy: ProbeAccuracy = probe_accuracy(lm.model, probe, batch_size)
        result.rows.append(AblationRow(k, selection, set_seed, [str(h) for h in heads], accuracy.argmax, accuracy.mean_logit_diff))
    return result


def ablation_figure(result: AblationResult):
    """Accuracy per k: unablated, selected heads ablated, and each random set (points) with their mean."""
    import plotly.graph_objects as go

    summary = result.summary()
    ks = [str(row["k"]) for row in summary]
    fig = go.Figure()
    fig.add_bar(x=ks, y=[row["base_argmax"] for row in summary], name="unablated")
    fig.add_bar(x=ks, y=[row["selected_argmax"] for row in summary], name="selected heads ablated")
    fig.add_bar(x=ks, y=[row["random_argmax_mean"] for row in summary], name="random heads ablated (mean)",
                error_y={"type": "data", "array": [row["random_argmax_sd"] for row in summary]})
    fig.update_layout(barmode="group", title=f"{result.probe}: mean ablation ({result.source})", xaxis_title="heads ablated (k)",
                      yaxis_title="argmax accuracy", yaxis_range=[0, 1.05], height=380)
    return fig
