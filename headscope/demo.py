"""The main job (``headscope demo`` / ``make demo``): probes -> receivers -> senders -> fused mask ->
report -> hybrid, on the bundled demo model or any local Hugging Face model.

Steps, each written to ``OUT`` as it finishes (a rerun reuses the score files that already exist and
were made for the same model, probe length, pair count and seed):

1. run the retrieval and reasoning probes at the model's demo length (probes the model's tokenizer
   cannot express are skipped with a note);
2. score receivers with ``direct`` (the head's own effect on the answer) and senders with ``path``
   (effect routed through that probe's top receivers outside layer 0), one HeadScores JSON per probe
   and method;
3. on a RoPE model, score every solved probe (clean/corrupt gap >= 2) with ``rope`` and keep the heads that
   need RoPE for a probe (>= 0.25 of its gap lost without it) off full attention: the hybrid's FA heads
   are NoPE, and on the demo model putting one such head (L2H6) there took kv_recall from 0.88 to 0.03
   after transfer (``benchmarks/results/hybrid_quality_seeds``);
4. fuse the direct/path scores of every probe the model solves (clean - corrupt gap >= ``MIN_GAP``; on an unsolved
   probe the normalised scores are noise, divided by a near-zero gap) into one ranking (``fuse`` defaults: z-scored |score|, equal weight per
   capability), pick the full-attention heads at the 7:1 budget without the RoPE-dependent heads, write
   ``mask.json`` and ``report.html``;
5. build the 7:1 head-wise hybrid from the mask, calibrate its per-head output scales, align it briefly
   to the original model on the demo corpus (stage 1 of the transfer, CPU, a minute or two) and compare
   the argmax accuracy on the retrieval probes of the original, the hybrid as built and the aligned
   hybrid (written to ``hybrid.json``).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadMask, HeadScores, HeadscopeError, write_json_atomic, write_text_atomic
from headscope.models import LoadedModel, load_model, weights_digest
from headscope.probes import Probe, make_probe

RETRIEVAL_PROBES = ("needle_single", "needle_multikey", "kv_recall", "induction")
REASONING_PROBES = ("multihop", "ioi", "comparison")
STAGES = ("original", "hybrid_built", "hybrid_aligned")
# Everything the demo writes into its output directory (untrained-model: headscope.commands.demo.fallback_model).
OUTPUTS = ("scores", "mask.json", "report.html", "hybrid.json", "untrained-model")


@dataclass
class DemoSettings:
    """What the demo runs; the defaults keep ``make demo`` to a few minutes on 2 CPU cores.

    Attributes:
        length: probe length in tokens (cut to the model's context when longer).
        n_pairs: prompt pairs per probe for scoring.
        ratio: linear:full head budget of the mask.
        n_receivers: receivers (top direct heads outside layer 0) per probe for path scoring.
        align_steps, align_batch, align_length, align_lr: the stage-1 alignment run.
        eval_pairs: prompts per retrieval probe when comparing accuracies (a fresh seed).
        seed: probe, corpus and torch seed.
        probes: built-in probe names to run.
        build_hybrid: build, align and evaluate the hybrid after the mask.
        rope_aware: keep RoPE-dependent heads off full attention (``rope`` scores; RoPE models only).
        progress: show progress bars.
    """

    length: int = 256
    n_pairs: int = 8
    ratio: str = "7:1"
    n_receivers: int = 3
    align_steps: int = 60
    align_batch: int = 4
    align_length: int = 256
    align_lr: float = 1e-3
    eval_pairs: int = 16
    seed: int = 0
    probes: tuple[str, ...] = RETRIEVAL_PROBES + REASONING_PROBES
    build_hybrid: bool = True
    rope_aware: bool = True
    progress: bool = True


@dataclass
class DemoResult:
    """What ``run_demo`` made: scores, rope scores and the heads they kept off full attention, the mask, and
    (with the hybrid) accuracies and alignment losses.

    ``accuracies[stage][probe]`` is the argmax accuracy for each stage of ``STAGES``.
    """

    scores: list[HeadScores] = field(default_factory=list)
    rope_scores: list[HeadScores] = field(default_factory=list)
    excluded: list[Head] = field(default_factory=list)
    mask: HeadMask | None = None
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)
    align_losses: list[float] = field(default_factory=list)


def build_probes(lm: LoadedModel, names: tuple[str, ...], length: int, n_pairs: int, seed: int, log=print) -> list[Probe]:
    """The built-in probes ``names`` for ``lm``'s tokenizer; those it cannot express are skipped with a note.

    Args:
        lm: the model (its tokenizer builds the prompts).
        names: built-in probe names (already validated).
        length, n_pairs, seed: as ``make_probe``.
        log: where the skip notes go.
    Returns:
        The probes that could be built, in ``names`` order.
    Raises:
        HeadscopeError: none could be built.
    """
    probes, problems = [], []
    for name in names:
        try:
            probes.append(make_probe(name, lm.tokenizer, length=length, n_pairs=n_pairs, seed=seed))
        except HeadscopeError as err:
            problems.append(str(err))
            log(f"note: skipping probe {name}: {err}")
    if not probes:
        raise HeadscopeError(f"none of the probes can be built for this model's tokenizer ({problems[0]})")
    return probes


def probe_gaps(scores: list[HeadScores]) -> dict[str, float]:
    """Each scored probe's clean - corrupt logit-difference gap (how well the model solves it)."""
    return {s.probe: s.gap for s in scores}


def solved_scores(scores: list[HeadScores], log: Callable[[str], None]) -> list[HeadScores]:
    """The scores of probes with a clean - corrupt gap of at least ``MIN_GAP`` (the ones the mask is fused from,
    and the only ones the RoPE step scores); says which probes are left out and why."""
    from headscope.patching.rope import MIN_GAP

    unsolved = {name: gap for name, gap in probe_gaps(scores).items() if gap < MIN_GAP}
    kept = [s for s in scores if s.probe not in unsolved]
    if not kept:
        log(f"note: the model solves none of the probes (every clean - corrupt gap < {MIN_GAP:g}): the mask is fused from "
            "all of them and is noise")
        return scores
    if unsolved:
        log(f"not fused (clean - corrupt gap < {MIN_GAP:g}: their scores are noise): "
            + ", ".join(f"{name} ({value:+.2f})" for name, value in unsolved.items()))
    return kept


def _reusable(path: Path, lm: LoadedModel, probe: Probe, seed: int, receivers: list[str] | None = None) -> HeadScores | None:
    """The scores stored at ``path`` if they were made for this model and probe setting, else None."""
    if not path.is_file():
        return None
    scores = HeadScores.load(path)
    meta = scores.meta
    same = (lm.fingerprint.mismatch(scores.fingerprint) is None and scores.fingerprint.name == lm.fingerprint.name
            and meta.get("length") == probe.length and meta.get("n_pairs") == len(probe) and meta.get("seed") == seed
            and meta.get("pairs_sha256") == probe.digest() and meta.get("weights_digest") == weights_digest(lm.model)
            and (receivers is None or sorted(meta.get("receivers") or []) == sorted(receivers)))
    return scores if same else None


def _scores_file(path: Path, lm: LoadedModel, probe: Probe, seed: int, compute: Callable[[], HeadScores],
                 receivers: list[str] | None = None) -> tuple[HeadScores, bool]:
    """The scores at ``path`` when reusable (``_reusable``), else ``compute()`` saved there; and whether reused."""
    scores = _reusable(path, lm, probe, seed, receivers)
    if scores is not None:
        return scores, True
    scores = compute()
    scores.save(path)
    return scores, False


def score_probes(lm: LoadedModel, probes: list[Probe], out: Path, n_receivers: int, seed: int = 0, log=print,
                 progress: bool = True) -> list[HeadScores]:
    """Receivers (``direct``) and senders (``path`` through the top receivers) for every probe.

    Score files already in ``out/scores`` are reused when they match the model, the probe's length and
    pair count, ``seed`` and (for path scores) the receivers; others are recomputed and overwritten.

    Args:
        lm: the model.
        probes: the probes to score.
        out: the demo output directory (files go to ``out/scores/PROBE.METHOD.json``).
        n_receivers: receivers per probe: the top heads by |direct score| outside layer 0.
        seed: the probes' seed (checked against reused files).
        log: where reuse notes and a line per scored probe go (its gap and seconds: a real model on a CPU takes
            minutes per probe, also without progress bars).
        progress: show the scorers' progress bars.
    Returns:
        The HeadScores, direct then path for each probe (path only when the model has a layer past 0).
    """
    from headscope.patching import direct_scores
    from headscope.patching.path import Receiver, path_scores

    results, reused = [], 0
    for probe in probes:
        started = time.monotonic()
        direct, again = _scores_file(out / "scores" / f"{probe.name}.direct.json", lm, probe, seed,
                                     lambda: direct_scores(lm, probe, progress=progress))
        reused += again
        results.append(direct)
        chosen = [Receiver(h) for h in direct.top(lm.fingerprint.n_layers * lm.fingerprint.n_heads) if h.layer > 0][:n_receivers]
        if chosen:
            senders, again_path = _scores_file(out / "scores" / f"{probe.name}.path.json", lm, probe, seed,
                                               lambda: path_scores(lm, probe, receivers=chosen, progress=progress), [str(r) for r in chosen])
            reused += again_path
            results.append(senders)
            again = again and again_path
        if not again:
            log(f"scored {probe.name}: clean - corrupt gap {direct.gap:+.2f}, direct{' and path' if chosen else ''} "
                f"in {time.monotonic() - started:.0f} s")
    if reused:
        log(f"reused {reused} score files from {out / 'scores'}")
    return results


def rope_step(lm: LoadedModel, probes: list[Probe], scores: list[HeadScores], out: Path, settings: DemoSettings,
              log=print) -> tuple[list[HeadScores], list[Head]]:
    """``rope`` scores of the solved probes (``out/scores/PROBE.rope.json``, reused like the others) and the
    RoPE-dependent heads to keep off full attention; ``([], [])`` with a note where it cannot apply."""
    from headscope.mask import head_budget
    from headscope.patching.rope import MIN_GAP, rope_dependence_scores, rope_dependent_heads, rope_unsupported

    if problem := rope_unsupported(lm, settings.length):
        log(f"note: the mask is not RoPE-aware: {problem}")
        return [], []
    gaps = probe_gaps(scores)
    solved = [probe for probe in probes if gaps.get(probe.name, 0.0) >= MIN_GAP]
    rope, reused = [], 0
    for probe in solved:
        item, again = _scores_file(out / "scores" / f"{probe.name}.rope.json", lm, probe, settings.seed,
                                   lambda: rope_dependence_scores(lm, probe, progress=settings.progress))
        reused += again
        rope.append(item)
    if reused:
        log(f"reused {reused} rope score files")
    excluded = rope_dependent_heads(rope)
    fp = lm.fingerprint
    if fp.n_layers * fp.n_heads - len(excluded) < head_budget(fp, settings.ratio):
        log(f"note: {len(excluded)} RoPE-dependent heads leave fewer heads than the budget; none excluded")
        return rope, []
    log(f"RoPE-dependent heads kept off full attention (rope >= 0.25 on the {len(solved)} probes with a gap >= {MIN_GAP:g}): "
        f"{' '.join(str(h) for h in excluded) or 'none'}")
    return rope, excluded


def top_heads_by_capability(scores: list[HeadScores], k: int = 5) -> dict[str, list[str]]:
    """The ``k`` best heads of each capability (the fusion of that capability's scores), best first."""
    from headscope.fusion import fuse

    by_capability: dict[str, list[HeadScores]] = {}
    for s in scores:
        by_capability.setdefault(s.capability, []).append(s)
    return {cap: [str(h) for h in fuse(group).top(k)] for cap, group in by_capability.items()}


def probe_accuracy(model: torch.nn.Module, probes: list[Probe], label: str = "accuracy", progress: bool = True) -> dict[str, float]:
    """Argmax accuracy of ``model`` on each probe: the fraction of clean prompts whose top next token is the answer.

    Args:
        model: a causal LM (``model(input_ids).logits``).
        probes: the probes (only the clean prompts are read).
        label: the progress bar's label.
        progress: show a progress bar.
    Returns:
        ``{probe name: argmax accuracy}``.
    """
    from headscope.zoo.evaluate import probe_accuracy as accuracy

    return {p.name: accuracy(model, p).argmax for p in tqdm(probes, desc=label, disable=not progress, leave=False)}


def corpus_batches(tokenizer: Any, n_batches: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Rows of the demo model's training corpus (``headscope.zoo.corpus``), written the way the model's probes are.

    Row ``i`` is ``RowBuilder.build(row_rng(seed, i))`` (probe tasks and, for word-level tokenizers,
    multi-query recall documents, in haystack text, separated by the tokenizer's eos), so the batches depend on
    the seed alone. The surface is the probes' (``surface_for``): a word-level tokenizer gets the demo model's
    own PLAIN training mix (``sample_training_task``); a subword tokenizer (a real model) gets the probe tasks
    and the essay haystack in NATURAL wording, as its probes are written (the multi-query and hop-chain
    documents exist in PLAIN only and are left out), one task per document, its answer after a space (the
    probes' answer is the word's continuation token), so the hybrid is aligned on text like what it is
    evaluated on.

    Args:
        tokenizer: the model's Hugging Face tokenizer (any; the demo model's covers every corpus word).
        n_batches, batch_size, seq_len: the shape of the result.
        seed: the row stream's seed.
    Returns:
        ``(n_batches, batch_size, seq_len)`` int64 ids.
    Raises:
        HeadscopeError: the tokenizer has no eos, bos or pad token to separate documents.
    """
    from functools import partial

    from headscope.probes.surface import PLAIN, surface_for
    from headscope.probes.tasks import TASK_NAMES
    from headscope.zoo.corpus import DEFAULT_TASK_WEIGHTS, CorpusConfig, Haystack, RowBuilder, row_rng
    from headscope.zoo.multiquery import sample_training_task

    separator = next((i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None), None)
    if separator is None:
        raise HeadscopeError("the model's tokenizer has no eos, bos or pad token to separate corpus documents")
    core = getattr(tokenizer, "backend_tokenizer", None)
    if core is not None:
        encode: Callable[[str], list[int]] = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731
    else:
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    surface = surface_for(tokenizer)
    if surface is PLAIN:
        config = CorpusConfig(seq_len=seq_len - 1)
        sampler = sample_training_task
    else:
        config = CorpusConfig(seq_len=seq_len - 1, max_tasks_per_doc=1,
                              task_weights={k: w for k, w in DEFAULT_TASK_WEIGHTS.items() if k in TASK_NAMES})
        sampler = partial(_spaced_task_text, surface=surface)
    builder = RowBuilder(encode, separator, sampler, Haystack.essay(encode, surface=surface), config)
    rows = [torch.from_numpy(builder.build(row_rng(seed, i))[0]) for i in range(n_batches * batch_size)]
    return torch.stack(rows).view(n_batches, batch_size, seq_len)


def _spaced_task_text(name: str, rng, n_filler_words: int, surface) -> tuple[str, str]:
    """``sample_task_text`` with the answer after a space: in natural text it is the next word."""
    from headscope.probes.tasks import sample_task_text

    prompt, answer = sample_task_text(name, rng, n_filler_words, surface=surface)
    return prompt, " " + answer


def hybrid_unsupported(lm: LoadedModel) -> str | None:
    """Why ``lm`` cannot become a head-wise hybrid (its family), or None when it can."""
    from headscope.hybrid.configuration import family_of

    try:
        family_of(lm.model.config.model_type)
    except HeadscopeError as err:
        return str(err)
    return None


def run_demo(model_dir: str | Path, out: str | Path, settings: DemoSettings | None = None, log=print) -> DemoResult:
    """Run the whole pipeline on ``model_dir`` and write scores, mask, report (and hybrid.json) under ``out``.

    Args:
        model_dir: a local Hugging Face causal-LM directory (the bundled demo model by default).
        out: output directory (created).
        settings: ``DemoSettings``.
        log: where the summary lines go.
    Returns:
        ``DemoResult`` with the scores, the mask and (when the hybrid is built) accuracies and losses.
    Raises:
        HeadscopeError: unknown probe names, bad settings, or no probe usable with the model's tokenizer.
    """
    from headscope.fusion import fuse
    from headscope.mask import budget_note, select_mask
    from headscope.maskfile import save_mask
    from headscope.probes import BUILTIN_PROBES
    from headscope.reports import build_report_html

    settings = settings or DemoSettings()
    unknown = [name for name in settings.probes if name not in BUILTIN_PROBES]
    if unknown or not settings.probes:
        raise HeadscopeError(f"unknown probe {unknown[0] if unknown else '(none given)'!r}; built-in probes: {', '.join(BUILTIN_PROBES)}")
    if min(settings.length, settings.n_pairs, settings.align_steps, settings.align_batch, settings.align_length, settings.eval_pairs) < 1:
        raise HeadscopeError("demo lengths, pair counts, alignment steps and batch size must all be positive")
    out = Path(out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    lm = load_model(model_dir)
    fp = lm.fingerprint
    log(f"model {fp.name}: {fp.architecture}, {fp.n_layers} layers x {fp.n_heads} heads ({fp.n_kv_heads} KV heads), head_dim {fp.head_dim}")
    context = lm.max_context or settings.length
    if settings.length > context or settings.align_length > context:
        log(f"note: the model's context is {context} tokens; probes and alignment rows are cut to it")
        settings = replace(settings, length=min(settings.length, context), align_length=min(settings.align_length, context))
    probes = build_probes(lm, settings.probes, settings.length, settings.n_pairs, settings.seed, log)
    settings = replace(settings, probes=tuple(probe.name for probe in probes))  # the hybrid step skips the same ones
    result = DemoResult()
    result.scores = score_probes(lm, probes, out, settings.n_receivers, settings.seed, log, settings.progress)

    solved = solved_scores(result.scores, log)
    if settings.rope_aware:
        result.rope_scores, result.excluded = rope_step(lm, probes, result.scores, out, settings, log)
    ranking = fuse(solved)
    mask = select_mask(ranking, fp, ratio=settings.ratio, exclude=result.excluded)
    result.mask = mask
    save_mask(mask, out / "mask.json")
    write_text_atomic(out / "report.html", build_report_html(solved + result.rope_scores, mask, ranking))

    log("\ntop heads per capability (fused over probes and methods):")
    for capability, heads in top_heads_by_capability(solved).items():
        log(f"  {capability:9s} {' '.join(heads)}")
    log(f"\nmask {mask.provenance['ratio']} linear:full -> {mask.n_full} of {fp.n_layers * fp.n_heads} heads at full attention: "
        f"{' '.join(str(h) for h in mask.heads())}")
    if note := budget_note(mask):
        log(note)
    log(f"KV-cache kept: {mask.kv_fraction:.1%} of the full model's (head share {mask.head_fraction:.1%})")
    log(f"wrote {out / 'mask.json'}, {out / 'report.html'}, {len(result.scores)} score files in {out / 'scores'}")

    (out / "hybrid.json").unlink(missing_ok=True)  # an earlier run's would sit beside another mask
    if settings.build_hybrid:
        problem = hybrid_unsupported(lm)
        if problem is not None:
            log(f"\nnote: skipping the hybrid: {problem}")
        else:
            result.accuracies, result.align_losses = hybrid_step(lm, mask, settings, log)
            write_json_atomic(out / "hybrid.json", {"metric": "argmax accuracy", "accuracies": result.accuracies,
                                                    "align_losses": result.align_losses, "align_steps": settings.align_steps,
                                                    "align_batch": settings.align_batch, "align_length": settings.align_length})
    return result


def hybrid_step(lm: LoadedModel, mask: HeadMask, settings: DemoSettings, log=print) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Build the hybrid from ``mask``, align it briefly on CPU, compare retrieval accuracy with the original.

    The hybrid's per-head output scales are calibrated to the original heads' RMS on the first batch
    (``calibrate_gamma``), then ``align_hybrid`` trains its attention for ``settings.align_steps`` steps
    on demo-corpus rows (``corpus_batches``: in the probes' wording, seeded by ``settings.seed``).

    Args:
        lm: the original model.
        mask: the full-attention heads.
        settings: ``DemoSettings`` (probes, alignment run, evaluation pairs and seed).
        log: where the comparison table goes.
    Returns:
        ``(accuracies, losses)``: ``accuracies[stage][probe]`` argmax accuracy for every stage of ``STAGES``
        and retrieval probe the tokenizer can express (empty when there is none), and the alignment loss
        of every step.
    """
    from headscope.hybrid.builder import build_hybrid, calibrate_gamma
    from headscope.transfer import align_hybrid

    log(f"\nbuilding the head-wise hybrid ({mask.n_full} FA heads, the rest Gated DeltaNet) ...")
    hybrid = build_hybrid(lm, mask)
    names = tuple(name for name in settings.probes if name in RETRIEVAL_PROBES)
    eval_probes = build_probes(lm, names, settings.length, settings.eval_pairs, settings.seed + 1, log) if names else []
    accuracies = {"original": probe_accuracy(lm.model, eval_probes, "accuracy original", settings.progress),
                  "hybrid_built": probe_accuracy(hybrid, eval_probes, "accuracy hybrid", settings.progress)}
    batches = corpus_batches(lm.tokenizer, settings.align_steps, settings.align_batch, settings.align_length, settings.seed)
    log(f"stage-1 alignment: output scales calibrated, then {settings.align_steps} steps of {settings.align_batch} x "
        f"{settings.align_length} tokens of the demo corpus, lr {settings.align_lr:g} (CPU) ...")
    calibrate_gamma(hybrid, lm, batches[0])
    losses = align_hybrid(hybrid, lm.model, batches, settings.align_steps, settings.align_lr, progress=settings.progress)
    accuracies["hybrid_aligned"] = probe_accuracy(hybrid, eval_probes, "accuracy aligned", settings.progress)
    window = max(1, min(10, len(losses) // 2))
    log(f"alignment loss (sum over layers of the output MSE), median of the first {window} steps "
        f"{statistics.median(losses[:window]):.4g}, of the last {window} {statistics.median(losses[-window:]):.4g}")
    if not eval_probes:
        log("no retrieval probe to compare accuracies on")
        return {stage: {} for stage in STAGES}, losses
    log(f"\nretrieval accuracy, argmax (the answer is the top next token), {settings.eval_pairs} held-out prompts per probe:")
    log(f"  {'probe':16s} {'original':>9s} {'hybrid, built':>14s} {'hybrid, aligned':>16s}")
    for probe in eval_probes:
        log(f"  {probe.name:16s} {accuracies['original'][probe.name]:9.2f} {accuracies['hybrid_built'][probe.name]:14.2f} "
            f"{accuracies['hybrid_aligned'][probe.name]:16.2f}")
    return accuracies, losses
