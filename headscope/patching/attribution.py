"""Attribution patching (AtP) and the ``screen`` mode: a gradient estimate for every head, then exact
patching of the heads that estimate ranks highest.

``attribution`` (Nanda 2023; Kramár et al. 2024, "AtP*"): the first-order Taylor estimate of what
patching a head's output would do. With ``z_h`` head ``h``'s output (its slice of the output projection's
input, at every position) and ``m`` the logit difference,

    m(patched) - m(base)  ~=  sum_{t, d} (z_source - z_base)_{h, t, d} * dm/dz_{h, t, d} |_base

averaged over pairs. One gradient pass of the base run gives ``dm/dz`` for every head at once (the
clean and corrupt runs are cached by ``prepare`` as for the exact scorers), so all heads cost about
two forwards and one backward. The gradient is the *total* derivative: a zero tensor added to every
head output at the output projection's input carries it, so paths through later heads count. The
estimate ``m(base) + delta`` is normalised exactly like an exact patched logit difference
(``ProbeRun.normalise``), so the scores are on the ``activation`` scale.

AtP is known to miss heads when attention saturates (the softmax is flat around the base point) and when
paths cancel; ``screen`` therefore scores everything with AtP and re-scores the top-K (by |estimate|)
with exact activation patching. Only AtP's plain form is implemented (no AtP* QK fix or GradDrop).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadScores, HeadscopeError
from headscope.models import LoadedModel
from headscope.patching.activation import activation_effects
from headscope.patching.batching import AdaptiveBatcher, default_batch_size
from headscope.patching.common import ProbeRun, prepare
from headscope.patching.sharding import agreed
from headscope.probes.base import Probe


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (ties get their average rank)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        order = torch.argsort(x)
        raw = torch.empty_like(x)
        raw[order] = torch.arange(len(x), dtype=x.dtype)
        _, group, counts = torch.unique(x, return_inverse=True, return_counts=True)
        return torch.zeros(len(counts), dtype=x.dtype).index_add_(0, group, raw)[group] / counts[group]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 0.0


def _grad_batch_size(run: ProbeRun, batch_size: int | None) -> int:
    """Pairs per gradient pass: the backward keeps every layer's activations, so divide the per-layer budget."""
    if batch_size is not None:
        return batch_size
    return max(1, default_batch_size(run.lm, run.probe.length) // max(1, run.lm.fingerprint.n_layers))


def attribution_deltas(run: ProbeRun, batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """First-order estimate of ``mean patched LD - mean base LD`` for every head.

    Args:
        run: the prepared probe (its cached clean/corrupt head outputs and layer calls).
        batch_size: pairs per gradient pass (default: the no-grad batch divided by the layer count).
        progress: progress bar over pairs.
    Returns:
        ``(n_layers, n_heads)`` float32 on the CPU.
    """
    fp, engine = run.lm.fingerprint, run.engine
    n_layers = fp.n_layers
    device = run.base_ids.device

    def run_batch(pairs: torch.Tensor, start: int) -> torch.Tensor:
        # Positions before ``start`` are the pairs' shared prefix: source and base outputs are equal there
        # (no contribution) and its keys/values do not depend on later head outputs, so the gradient
        # pass runs positions start..T-1 only, attending to the cached prefix.
        base_z = [run.base.z[l][pairs, start:] for l in range(n_layers)]  # each (B, T - start, H * D)
        carriers = [torch.zeros_like(z, requires_grad=True) for z in base_z]
        patches = {l: (lambda z, c=carriers[l]: z + c) for l in range(n_layers)}
        with torch.enable_grad():
            resid = engine.run_layers(0, n_layers, run.base.resid_pre[0][pairs, start:], patches, pairs, start)
            metric = engine.metric_from_resid(resid[:, -1], pairs)  # (B,)
            grads = torch.autograd.grad(metric.sum(), carriers)
        per_head = []
        for l in range(n_layers):
            diff = (run.source.z[l][pairs, start:] - base_z[l]).float()  # (B, T - start, H * D)
            product = (diff * grads[l].float()).view(len(pairs), diff.shape[1], fp.n_heads, fp.head_dim)
            per_head.append(product.sum(dim=(1, 3)))  # (B, H)
        return torch.stack(per_head, dim=1)  # (B, L, H)

    batcher = AdaptiveBatcher(_grad_batch_size(run, batch_size))
    with tqdm(total=run.n_pairs, desc=f"attribution {run.probe.name}", unit="pair", disable=not progress) as bar:
        per_pair = engine.run_items(batcher, torch.arange(run.n_pairs, device=device), run_batch, bar.update)  # (N, L, H)
    return per_pair.mean(0).cpu()


def _attribution_values(run: ProbeRun, batch_size: int | None, progress: bool) -> torch.Tensor:
    base_mean = float(run.base.metric.mean())
    return run.normalise(base_mean + attribution_deltas(run, batch_size, progress))


def attribution_scores(
    lm: LoadedModel,
    probe: Probe,
    *,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> HeadScores:
    """Attribution-patching estimate of every head's ``activation`` score.

    Args:
        lm: the model; its attention implementation must have a backward (sdpa and eager do).
        probe: clean/corrupt prompt pairs.
        noising: estimate patching corrupt into clean (gradient at the clean run) instead of the default.
        batch_size: pairs per gradient pass.
        progress: progress bar.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)`` on the ``activation`` scale (a linear estimate).
    """
    run = prepare(lm, probe, noising)
    return run.to_scores(_attribution_values(run, batch_size, progress), "attribution")


def screen_order(estimate: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` heads the screen verifies exactly: largest |estimate| first (ties: lower index first)."""
    return torch.argsort(estimate.abs().flatten(), descending=True, stable=True)[:k]


def screen_scores(
    lm: LoadedModel,
    probe: Probe,
    *,
    top_k: int | None = None,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> HeadScores:
    """Attribution estimates for every head, exact ``activation`` scores for the top-K of them.

    Args:
        top_k: how many heads (largest |estimate|) to verify exactly; default a quarter of all heads,
            twice the 7:1 full-attention budget.
        noising, batch_size, progress: as ``attribution_scores`` (``batch_size`` also sets the exact runs').
    Returns:
        ``HeadScores`` with exact values for ``meta["exact_heads"]`` (``[layer, head]`` pairs, best estimate
        first) and attribution estimates elsewhere; ``meta["screen_rank_correlation"]`` is the Spearman
        correlation of estimate and exact value over the verified heads.
    """
    fp = lm.fingerprint
    n_total = fp.n_layers * fp.n_heads
    k = n_total // 4 if top_k is None else top_k
    if not 1 <= k <= n_total:
        raise HeadscopeError(f"top_k must be between 1 and the number of heads ({n_total}), got {top_k}")
    run = prepare(lm, probe, noising)
    estimate = agreed(_attribution_values(run, batch_size, progress))  # under torchrun: rank 0's, so every rank checks the same heads
    order = screen_order(estimate, k)
    heads = [Head(int(i) // fp.n_heads, int(i) % fp.n_heads) for i in order]
    exact = activation_effects(run, heads, batch_size, progress)  # (k,)
    values = estimate.clone()
    values.view(-1)[order] = exact
    return run.to_scores(
        values, "screen", top_k=k, exact_heads=[[h.layer, h.head] for h in heads],
        screen_rank_correlation=rank_correlation(estimate.flatten()[order], exact) if k > 1 else 1.0,
    )
