"""The main job (``headscope demo`` / ``make demo``): probes -> receivers -> senders -> fused mask ->
report -> hybrid, on the bundled demo model or any local Hugging Face model.

Steps, each written to ``OUT`` as it finishes (a rerun skips the score files that already exist):

1. run the retrieval and reasoning probes at the model's demo length;
2. score receivers with ``direct`` (the head's own effect on the answer) and senders with ``path``
   (effect routed through that probe's top receivers), one HeadScores JSON per probe and method;
3. fuse every score into one ranking (rank-normalised, equal weight per capability), pick the
   full-attention heads at the 7:1 budget, write ``mask.json`` and ``report.html``;
4. build the 7:1 head-wise hybrid from the mask, align it briefly to the original model (stage 1 of the
   transfer, CPU, a minute or two) and compare retrieval accuracy of the original and the hybrid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headscope.heads import HeadMask, HeadScores, write_text_atomic
from headscope.models import LoadedModel, load_model
from headscope.probes import Probe, make_probe

RETRIEVAL_PROBES = ("needle_single", "needle_multikey", "kv_recall", "induction")
REASONING_PROBES = ("multihop", "ioi", "comparison")


@dataclass
class DemoSettings:
    """What the demo runs; the defaults keep ``make demo`` to a few minutes on 2 CPU cores."""

    length: int = 256
    n_pairs: int = 8
    ratio: str = "7:1"
    n_receivers: int = 3
    align_steps: int = 60
    align_length: int = 256
    eval_pairs: int = 16
    seed: int = 0
    probes: tuple[str, ...] = RETRIEVAL_PROBES + REASONING_PROBES
    build_hybrid: bool = True


@dataclass
class DemoResult:
    scores: list[HeadScores] = field(default_factory=list)
    mask: HeadMask | None = None
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)


def _score_or_load(path: Path, compute) -> HeadScores:
    if path.is_file():
        return HeadScores.load(path)
    scores = compute()
    scores.save(path)
    return scores


def score_probes(lm: LoadedModel, probes: list[Probe], out: Path, n_receivers: int) -> list[HeadScores]:
    """Receivers (``direct``) and senders (``path`` through the top receivers) for every probe."""
    from headscope.patching import direct_scores
    from headscope.patching.path import Receiver, path_scores

    results = []
    for probe in probes:
        receivers = _score_or_load(out / "scores" / f"{probe.name}.direct.json", lambda: direct_scores(lm, probe))
        chosen = [Receiver(head) for head in receivers.top(n_receivers) if head.layer > 0]
        results.append(receivers)
        if chosen:
            results.append(_score_or_load(out / "scores" / f"{probe.name}.path.json", lambda: path_scores(lm, probe, receivers=chosen)))
    return results


def top_heads_by_capability(scores: list[HeadScores], k: int = 5) -> dict[str, list[str]]:
    from headscope.fusion import fuse

    by_capability: dict[str, list[HeadScores]] = {}
    for s in scores:
        by_capability.setdefault(s.capability, []).append(s)
    return {cap: [str(h) for h in fuse(group).top(k)] for cap, group in by_capability.items()}


def probe_accuracy(model, probes: list[Probe]) -> dict[str, float]:
    """Fraction of clean prompts whose next-token logit prefers the answer to the wrong token."""
    from headscope.zoo.evaluate import probe_accuracy as accuracy

    return {probe.name: accuracy(model, probe).accuracy for probe in probes}


def run_demo(model_dir: str | Path, out: str | Path, settings: DemoSettings | None = None, log=print) -> DemoResult:
    """Run the whole pipeline on ``model_dir`` and write scores, mask and report under ``out``.

    Args:
        model_dir: a local Hugging Face causal-LM directory (the bundled demo model by default).
        out: output directory (created).
        settings: ``DemoSettings``.
        log: where progress lines go.
    Returns:
        ``DemoResult`` with the scores, the mask and (when the hybrid is built) accuracies.
    """
    from headscope.fusion import fuse
    from headscope.mask import select_mask
    from headscope.maskfile import save_mask
    from headscope.reports import build_report_html

    settings = settings or DemoSettings()
    out = Path(out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    lm = load_model(model_dir)
    fp = lm.fingerprint
    log(f"model {fp.name}: {fp.architecture}, {fp.n_layers} layers x {fp.n_heads} heads ({fp.n_kv_heads} KV heads), head_dim {fp.head_dim}")
    probes = [make_probe(name, lm.tokenizer, length=settings.length, n_pairs=settings.n_pairs, seed=settings.seed) for name in settings.probes]
    result = DemoResult()
    result.scores = score_probes(lm, probes, out, settings.n_receivers)

    ranking = fuse(result.scores)
    mask = select_mask(ranking, fp, ratio=settings.ratio)
    result.mask = mask
    save_mask(mask, out / "mask.json")
    write_text_atomic(out / "report.html", build_report_html(result.scores, mask, ranking))

    log("\ntop heads per capability (fused over probes and methods):")
    for capability, heads in top_heads_by_capability(result.scores).items():
        log(f"  {capability:9s} {' '.join(heads)}")
    log(f"\nmask {settings.ratio} linear:full -> {mask.n_full} of {fp.n_layers * fp.n_heads} heads at full attention: "
        f"{' '.join(str(h) for h in mask.heads())}")
    log(f"KV-cache kept: {mask.kv_fraction:.1%} of the full model's (head share {mask.head_fraction:.1%})")
    log(f"wrote {out / 'mask.json'}, {out / 'report.html'}, {len(result.scores)} score files in {out / 'scores'}")

    if settings.build_hybrid:
        result.accuracies = hybrid_step(lm, mask, settings, log)
    return result


def hybrid_step(lm: LoadedModel, mask: HeadMask, settings: DemoSettings, log=print) -> dict[str, dict[str, float]]:
    """Build the hybrid from ``mask``, align it briefly on CPU, compare retrieval accuracy."""
    from headscope.hybrid.builder import build_hybrid
    from headscope.transfer import align_hybrid

    log(f"\nbuilding the head-wise hybrid ({mask.n_full} FA heads, the rest Gated DeltaNet) ...")
    hybrid = build_hybrid(lm, mask)
    eval_probes = [
        make_probe(name, lm.tokenizer, length=settings.length, n_pairs=settings.eval_pairs, seed=settings.seed + 1)
        for name in settings.probes if name in RETRIEVAL_PROBES
    ]
    before = probe_accuracy(hybrid, eval_probes)
    log(f"stage-1 alignment: {settings.align_steps} steps at {settings.align_length} tokens on the demo corpus (CPU) ...")
    align_hybrid(hybrid, lm.model, steps=settings.align_steps, seq_len=settings.align_length, seed=settings.seed)
    accuracies = {"original": probe_accuracy(lm.model, eval_probes), "hybrid_unaligned": before, "hybrid_aligned": probe_accuracy(hybrid, eval_probes)}
    log("\nretrieval accuracy (answer beats wrong token):")
    log(f"  {'probe':16s} {'original':>9s} {'hybrid, built':>14s} {'hybrid, aligned':>16s}")
    for probe in eval_probes:
        log(f"  {probe.name:16s} {accuracies['original'][probe.name]:9.2f} {accuracies['hybrid_unaligned'][probe.name]:14.2f} "
            f"{accuracies['hybrid_aligned'][probe.name]:16.2f}")
    return accuracies
