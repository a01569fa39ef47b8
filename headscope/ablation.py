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
  a mask; the baseline is ``n_random`` seeded sets of ``k`` heads (``BASELINES``): ``uniform``, drawn from
  the heads *outside* the selected set; ``kv-matched``, as many heads in as many KV groups anywhere in
  the model (``headscope.mask.kv_matched_random_mask``); ``layer-matched``, as many heads and groups in
  every layer as the selected set (``layer_matched_random_mask``). Late layers matter more than early
  ones, so a set that beats uniform random heads may only have beaten them on *where* it sits:
  layer-matched sets ask whether these heads beat others of the same layers (they may share heads with
  the selected set: a layer whose heads are all selected is the same in every draw; each row records its
  ``overlap``).
* **Reported:** argmax accuracy and mean logit difference (answer - wrong) on fresh clean prompts,
  unablated, with the selected heads ablated, and per random set; per ``k`` the random sets' mean and
  sample standard deviation, and the empirical one-sided p-value of the selected set's logit difference,
  ``(1 + #{random sets at or below it}) / (n_random + 1)``: the smallest it can be is ``1 / (n_random + 1)``,
  so a claim at 0.05 needs ``n_random >= 19``.
* **How much p rests on the prompts drawn:** every row keeps its per-pair logit differences, and the summary
  gives ``p_resampled``, the 5th / 50th / 95th percentile of the same p over ``RESAMPLES`` bootstrap resamples
  of the evaluation pairs (one resample for every set of that k). A row whose p is 0.01 but whose 95th
  percentile is 0.2 won on a few prompts; another draw of the task's prompts may not confirm it.
"""

from __future__ import annotations

import random
import statistics
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadMask, HeadscopeError
from headscope.models import LoadedModel
from headscope.patching.engine import hooked, patched_head_outputs, write_heads
from headscope.probes.base import Probe
from headscope.zoo.evaluate import pair_results


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
            lm.model.base_model(input_ids=batch)  # (the decoder alone: no (b, T, vocab) logits to compute)
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


BASELINES = ("uniform", "kv-matched", "layer-matched")
RESAMPLES = 1000  # bootstrap resamples of the evaluation pairs behind the summary's p_resampled


def random_head_sets(all_heads: Sequence[Head], selected: Sequence[Head], k: int, n_sets: int, seed: int,
                     baseline: str = "uniform", fingerprint=None) -> list[list[Head]]:
    """``n_sets`` random sets of ``k`` heads (``BASELINES``), seeded per set: ``uniform`` draws from ``all_heads``
    minus ``selected``; ``kv-matched`` / ``layer-matched`` match ``selected`` (its ``k`` heads) on the model
    ``fingerprint``, as ``headscope.mask``'s random baselines do."""
    if baseline == "uniform":
        pool = sorted(set(all_heads) - set(selected))
        if k > len(pool):
            raise HeadscopeError(f"cannot draw {k} random heads from the {len(pool)} heads outside the selected set")
        return [sorted(random.Random(f"ablate/{seed}/{k}/{i}").sample(pool, k)) for i in range(n_sets)]
    from headscope.mask import kv_matched_random_mask, layer_matched_random_mask

    if baseline not in BASELINES or fingerprint is None:
        raise HeadscopeError(f"baseline {baseline!r}: expected one of {', '.join(BASELINES)} (matched ones need the model's fingerprint)")
    full = torch.zeros(fingerprint.shape, dtype=torch.bool)
    for head in selected:
        full[head.layer, head.head] = True
    draw = kv_matched_random_mask if baseline == "kv-matched" else layer_matched_random_mask
    return [draw(HeadMask(full, fingerprint), seed=zlib.crc32(f"ablate/{seed}/{k}/{i}".encode())).heads() for i in range(n_sets)]


def resampled_p(selected: list[float], randoms: list[list[float]], resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """5th, 50th and 95th percentile of the empirical p-value over bootstrap resamples of the evaluation pairs.

    Args:
        selected: the selected set's logit difference per pair ``(P,)``.
        randoms: each random set's, pairs in the same order ``(n, P)``.
    Returns:
        Three p-values (each one of the ``(1 + j) / (n + 1)`` a run can give; the percentiles are the order
        statistics at or below them, numpy's "lower"), or None where the rows lack their
        per-pair values (files written before they were kept) or there are fewer than 2 pairs.
    """
    if not randoms or len(selected) < 2 or any(len(r) != len(selected) for r in randoms):
        return None
    pairs = len(selected)
    diffs = torch.tensor([selected, *randoms], dtype=torch.float64)  # (1 + n, P)
    picks = torch.randint(pairs, (resamples, pairs), generator=torch.Generator().manual_seed(seed))  # (R, P)
    counts = torch.zeros(resamples, pairs, dtype=torch.float64).scatter_add_(1, picks, torch.ones(resamples, pairs, dtype=torch.float64))
    means = diffs @ counts.T / pairs  # (1 + n, R): each set's mean over each resample
    p = ((1 + (means[1:] <= means[:1]).sum(0)).double() / (len(randoms) + 1)).sort().values  # (R,)
    return [float(p[int(q * (resamples - 1))]) for q in (0.05, 0.5, 0.95)]  # the order statistics at or below each


@dataclass
class AblationRow:
    """The probe's accuracy with one set of heads mean-ablated."""

    k: int
    selection: str  # "none", "selected" or "random"
    set_index: int | None  # which random set (its draw is seeded by the run's seed, k and this index)
    heads: list[str]
    argmax: float
    logit_diff: float
    overlap: int = 0  # heads shared with the selected set of this k (matched baselines only)
    pair_logit_diffs: list[float] = field(default_factory=list)  # per evaluation pair, in the probe's order


@dataclass
class AblationResult:
    """Unablated, selected and random rows of one probe; ``summary()`` compares them per k."""

    probe: str
    length: int
    n_pairs: int
    source: str  # what the selection came from, in words (scores file / mask)
    baseline: str = "uniform"
    seed: int = 0  # the random sets' seed
    setup: dict = field(default_factory=dict)  # the model's fingerprint, the probes' settings (``to_dict``)
    rows: list[AblationRow] = field(default_factory=list)
    selected_from: dict | None = None  # the same, structured: "kind" (scores / mask / mask_ranking), "file", "sha256", ...

    def summary(self) -> list[dict]:
        """Per k: selected accuracy / logit diff against the random sets' mean and sample standard deviation
        (None with fewer than 2 sets), the selected set's one-sided empirical p-value on the logit difference
        and how many heads the random sets share with it on average."""
        def stats(values: list[float]) -> tuple[float, float | None]:
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

        base = next(r for r in self.rows if r.selection == "none")
        out = []
        for k in sorted({r.k for r in self.rows if r.selection == "selected"}):
            chosen = next(r for r in self.rows if r.selection == "selected" and r.k == k)
            rand = [r for r in self.rows if r.selection == "random" and r.k == k]
            acc_mean, acc_sd = stats([r.argmax for r in rand])
            ld_mean, ld_sd = stats([r.logit_diff for r in rand])
            at_or_below = sum(r.logit_diff <= chosen.logit_diff for r in rand)
            resampled = resampled_p(chosen.pair_logit_diffs, [r.pair_logit_diffs for r in rand])
            out.append({
                "k": k, "base_argmax": base.argmax, "base_logit_diff": base.logit_diff,
                "selected_argmax": chosen.argmax, "selected_logit_diff": chosen.logit_diff,
                "random_argmax_mean": acc_mean, "random_argmax_sd": acc_sd,
                "random_logit_diff_mean": ld_mean, "random_logit_diff_sd": ld_sd, "n_random": len(rand),
                "random_at_or_below": at_or_below, "p_logit_diff": (1 + at_or_below) / (len(rand) + 1),
                "random_overlap_mean": statistics.fmean(r.overlap for r in rand), "p_resampled": resampled,
            })
        return out

    def to_dict(self) -> dict:
        return {"kind": "headscope.ablation", "format_version": 1, "probe": self.probe, "length": self.length,
                "n_pairs": self.n_pairs, "source": self.source, **({"selected_from": self.selected_from} if self.selected_from else {}),
                "baseline": self.baseline, "seed": self.seed, **self.setup,
                "rows": [asdict(r) for r in self.rows], "summary": self.summary()}


def selection_label(run: dict) -> str:
    """The selection of an ablation file (``AblationResult.to_dict``) without the probe's name in it, so that one
    selection over several probes is one family: 'top k direct' for a scores file's top heads, the mask file's
    name for a mask. From the run's structured ``selected_from`` where it is complete, else from its ``source``
    words (files written before ``selected_from`` was kept)."""
    origin = run.get("selected_from") or {}
    kind, name = origin.get("kind"), origin.get("file")
    if kind == "scores" and origin.get("method"):
        return f"top k {origin['method']}"
    if kind == "mask" and name:
        return f"full-attention heads of {name}"
    if kind == "mask_ranking" and name:
        return f"top full-attention heads of {name} by its fused ranking"
    source = run["source"]
    if source.startswith("top heads of "):  # 'top heads of FILE (probe/method)'
        return "top k " + source.rsplit("/", 1)[-1].rstrip(")")
    return source


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
    baseline: str = "uniform",
    selected_from: dict | None = None,
) -> AblationResult:
    """Mean-ablate the top ``k`` of ``ranked`` and ``n_random`` random k-sets (``baseline``), for each ``k`` in ``ks``.

    Args:
        probe: evaluation pairs (fresh: not the ones the heads were scored on).
        reference: prompts the head means are taken over (``head_means``).
        ranked: heads best first (``HeadScores.top(k, by_magnitude=False)`` or a mask's heads).
        ks: set sizes (repeats are dropped); each at most ``len(ranked)``.
        baseline: how the random sets are drawn (``BASELINES``, see the module docstring).
        source, selected_from: where ``ranked`` came from, in words and as a dict (``headscope ablate`` writes the
            file's name and sha256 there, so a table can tell two files of one name apart).
    """
    ks = sorted(set(ks))
    if not ks or min(ks) < 1 or max(ks) > len(ranked):
        raise HeadscopeError(f"ablation sizes must be between 1 and {len(ranked)} (the selected heads), got {list(ks)}")
    fp = lm.fingerprint
    all_heads = [Head(layer, head) for layer in range(fp.n_layers) for head in range(fp.n_heads)]
    plan: list[tuple[int, str, int | None, list[Head]]] = [(0, "none", None, [])]
    for k in ks:  # (every set drawn before the forwards: a k that cannot be drawn fails at once)
        plan.append((k, "selected", None, list(ranked[:k])))
        sets = random_head_sets(all_heads, ranked[:k], k, n_random, seed, baseline, fp)
        plan += [(k, "random", i, heads) for i, heads in enumerate(sets)]
    means = head_means(lm, reference, batch_size)
    setup = {"model": fp.to_dict(), "probe_meta": dict(probe.meta), "pairs_sha256": probe.digest(),
             "reference_meta": dict(reference.meta), "reference_pairs_sha256": reference.digest()}
    result = AblationResult(probe.name, probe.length, len(probe), source, baseline, seed, setup, selected_from=selected_from)
    for k, role, index, heads in tqdm(plan, desc=f"ablate {probe.name}", disable=not progress, leave=False):
        with mean_ablated(lm, heads, means):
            pairs = pair_results(lm.model, probe, batch_size)  # (N,) each
        overlap = len(set(heads) & set(ranked[:k])) if role == "random" else 0
        result.rows.append(AblationRow(k, role, index, [str(h) for h in heads], pairs["hit"].float().mean().item(),
                                       pairs["logit_diff"].mean().item(), overlap, pairs["logit_diff"].tolist()))
    return result


def ablation_figure(result: AblationResult):
    """Accuracy per k: unablated, selected heads ablated, and each random set (points) with their mean."""
    import plotly.graph_objects as go

    summary = result.summary()
    ks = [str(row["k"]) for row in summary]
    fig = go.Figure()
    fig.add_bar(x=ks, y=[row["base_argmax"] for row in summary], name="unablated")
    fig.add_bar(x=ks, y=[row["selected_argmax"] for row in summary], name="selected heads ablated")
    fig.add_bar(x=ks, y=[row["random_argmax_mean"] for row in summary], name=f"{result.baseline} random heads ablated (mean)",
                error_y={"type": "data", "array": [row["random_argmax_sd"] or 0.0 for row in summary]})
    fig.update_layout(barmode="group", title=f"{result.probe}: mean ablation ({result.source})", xaxis_title="heads ablated (k)",
                      yaxis_title="argmax accuracy", yaxis_range=[0, 1.05], height=380)
    return fig
