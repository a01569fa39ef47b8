"""Scoring speed: headscope's exact ``activation`` scorer vs TransformerLens, row by row, resumable.

Model: random-init Qwen3 with Qwen3-1.7B's shape (28 layers, 16 query heads, 8 KV heads, head_dim 128,
hidden 2048, MLP 6144, vocab 151936, context 40960), bf16 on CUDA, probes built with the demo model's
tokenizer; or ``--model DIR``, a local Hugging Face model directory with its own tokenizer (e.g.
SmolLM2-135M). Both tools patch every head's output at all positions (denoising) and normalise the same
way. TransformerLens' bridge forces eager attention; headscope runs its default sdpa.

Rows (each one JSON file, written atomically; a row already done is skipped, so the same command
can be repeated until every row is done, one 10-minute call at a time):

* ``<probe>`` (each built-in probe) and ``mix`` (the built-in probes' pairs interleaved, one probe):
  wall time of headscope (bf16, shared-prefix reuse), of headscope without prefix reuse (the previous
  engine path, ``--no-baseline`` skips it) and of TransformerLens' ``get_act_patch_attn_head_out_all_pos``,
  side by side in one process; their ratios; the shared prefix (first differing position / length);
  the max |difference| of the scores.
* ``truth:<probe>`` / ``truth:mix``: headscope bf16 against float32 truth (headscope float32, which the
  ``agreement`` row and the tests tie to TransformerLens) on the same first ``--truth-pairs`` pairs:
  max relative difference = max |bf16 - fp32| / max |fp32|, and the top-``budget`` mask overlap.
* ``long:<T>`` for each ``--long-lengths`` (mix, ``--long-pairs`` pairs): headscope only, with the
  batch chosen automatically (initial and final after any CUDA OOM), peak memory. TransformerLens is
  *estimated*, not run: its loop is one full forward per head, so one measured forward of the same
  prompts times (heads + 2); where that single eager forward does not fit, it is marked not run (OOM).
* ``screen``: on the mix, the exhaustive exact run, AtP alone and ``screen`` for each ``--top-k`` (time,
  exhaustive / screen, overlap of the top-``budget`` mask with the exhaustive one): the K / speed /
  overlap trade-off curve, all timed in the same process.
* ``agreement``: float32 scores of both tools on a short mix (``--check-length``), max |difference|.

Usage on the GPU (``. benchmarks/gpu_setup.sh`` first; it installs the carried TransformerLens wheels)::

    python benchmarks/scoring_speed.py --rows mix,screen        # a comma list of rows, or all pending
    python benchmarks/scoring_speed.py --model /path/SmolLM2-135M --rows mix

Rows are read from and written to ``--rows-dir`` (default ``benchmarks/results/scoring_speed_rows``,
or ``..._<model dir name>`` with ``--model``); the summary goes to ``$OUT/scoring_speed[_<model dir
name>].json`` and ``.md`` (OUT defaults to benchmarks/results), rebuilt from every row file after each
row, and ``$OUT`` also gets a copy of the row files (copy them back into the rows dir between calls on
a machine that does not keep them). A row is not started when the time since start plus the longest
earlier row of its kind would pass ``--budget`` seconds. ``--quick``: a tiny Qwen3 on the CPU in
float32, short prompts (the smoke test; results under /tmp/headscope_scoring_speed_quick).

Estimated H200 times at the defaults on the Qwen3-1.7B shape, from the H100 run of the previous engine
(32 x 1024: headscope 68.6 s, TransformerLens 281 s, i.e. 2.1 and 8.8 s per pair) and a prefix-reuse
gain of ~2.4x on the mix: ``mix`` ~3.5 min (TransformerLens 16 pairs ~140 s, headscope ~15 s, without
prefix reuse ~35 s), ``screen`` ~1 min, each probe row ~1.7 min (TransformerLens 8 pairs ~70 s),
``truth:*`` ~1 min each (float32 is ~10x slower than bf16), ``long:8192`` ~0.5 min, ``long:32768``
~3 min, ``agreement`` ~2.5 min (TransformerLens in float32); plus ~1.5 min per call for the wheels,
the model and the bridge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def stub_datasets_if_missing() -> None:
    """TransformerLens imports ``datasets`` for its dataset helpers only; the GPU box has no pyarrow, so
    a stub with the names it imports stands in (never called here)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        for sub, names in {"arrow_dataset": ["Dataset"], "iterable_dataset": ["IterableDataset"], "load": ["load_dataset"]}.items():
            module = types.ModuleType(f"datasets.{sub}")
            for name in names:
                setattr(module, name, type(name, (), {}))
                setattr(stub, name, getattr(module, name))
            sys.modules[f"datasets.{sub}"] = module
        sys.modules["datasets"] = stub


def counts(text: str) -> list[int]:
    """A comma list of positive integers."""
    values = [int(part) for part in text.split(",") if part.strip().isdigit()]
    if not values or len(values) != len(text.split(",")) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def qwen3_config(quick: bool):
    """Qwen3-1.7B's shape, or a tiny one for ``--quick``."""
    from transformers import Qwen3Config

    if quick:
        return Qwen3Config(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                       rope_theta=1_000_000.0)


def mix_probe(tokenizer, length: int, n_pairs: int, seed: int = 0):
    """``n_pairs`` pairs taken in turn from every built-in probe (one probe named ``mix``)."""
    from headscope.probes import Probe, make_probe
    from headscope.probes.tasks import TASK_NAMES

    per_probe = math.ceil(n_pairs / len(TASK_NAMES))
    probes = [make_probe(name, tokenizer, length=length, n_pairs=per_probe, seed=seed).pairs for name in TASK_NAMES]
    pairs = [probes[i % len(probes)][i // len(probes)] for i in range(n_pairs)]
    return Probe("mix", "retrieval", pairs, meta={"length": length, "probes": list(TASK_NAMES)})


def max_rel_diff(values: torch.Tensor, truth: torch.Tensor) -> float:
    """max |values - truth| / max |truth| (the score scale; elementwise ratios explode at zero scores)."""
    return float((values - truth).abs().max() / truth.abs().max())


def mask_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Fraction of shared heads between the top-``k`` (by |score|) of ``a`` and of ``b``."""
    return len(set(a.abs().flatten().topk(k).indices.tolist()) & set(b.abs().flatten().topk(k).indices.tolist())) / k


class Bench:
    """The model, tokenizer and TransformerLens bridge of one call (``model_dir``: where a random model
    is saved for TransformerLens and the float32 truth to load)."""

    def __init__(self, args, model_dir: Path) -> None:
        from headscope import load_model

        self.args = args
        self.device, self.dtype = ("cpu", torch.float32) if args.quick else ("cuda", torch.bfloat16)
        torch.manual_seed(0)
        if args.model:
            self.model_dir = Path(args.model)
            self.lm = load_model(self.model_dir, dtype=self.dtype, device=self.device)
            self.tokenizer = self.lm.tokenizer
        else:
            from transformers import AutoTokenizer, Qwen3ForCausalLM

            from headscope.zoo import demo_model_path

            with torch.device(self.device):
                model = Qwen3ForCausalLM(qwen3_config(args.quick)).to(self.dtype).eval()
            digest = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:12]
            self.model_dir = model_dir / f"qwen3_{digest}"  # the weights TransformerLens and float32 truth load
            marker = self.model_dir / "headscope_seed0"
            if not marker.is_file():  # the box may keep /tmp between calls; the init is seeded either way
                model.save_pretrained(self.model_dir)
                marker.touch()
            self.lm = load_model(model)
            self.lm.set_attn_implementation("sdpa")
            self.tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
        fp = self.lm.fingerprint
        self.n_heads = fp.n_layers * fp.n_heads
        self.budget = max(1, self.n_heads // 8)  # the 7:1 full-attention budget
        self._bridge = None
        self._warm = False

    def probe(self, name: str, length: int, n_pairs: int):
        from headscope.probes import make_probe

        return mix_probe(self.tokenizer, length, n_pairs) if name == "mix" else make_probe(name, self.tokenizer, length=length, n_pairs=n_pairs)

    def headscope(self, probe, reuse_prefix: bool = True, lm=None):
        """(scores, seconds) of exact activation patching; ``reuse_prefix=False``: the previous engine path."""
        import headscope.patching.common as common
        from headscope.patching import activation_scores

        lm = lm or self.lm
        self.warm()
        shared_prefix = common.shared_prefix
        if not reuse_prefix:
            common.shared_prefix = lambda clean, corrupt: torch.zeros(len(clean), dtype=torch.long)
        try:
            scores, seconds = timed(lambda: activation_scores(lm, probe, progress=False))
        finally:
            common.shared_prefix = shared_prefix
        return scores.values, seconds

    def warm(self) -> None:
        """One small scoring run (2 pairs of the mix at ``--length``) before the first timed one (kernels, allocator)."""
        from headscope.patching import activation_scores

        if not self._warm:
            activation_scores(self.lm, self.probe("mix", self.args.length, 2), progress=False)
            self._warm = True

    def bridge(self, dtype=None):
        """TransformerLens' bridge on the same weights (``dtype``: default the bench's)."""
        stub_datasets_if_missing()
        from transformer_lens.model_bridge import TransformerBridge

        dtype = dtype or self.dtype
        if dtype != self.dtype:
            return TransformerBridge.boot_transformers(str(self.model_dir), device=self.device, dtype=dtype)
        if self._bridge is None:
            self._bridge = TransformerBridge.boot_transformers(str(self.model_dir), device=self.device, dtype=dtype)
        return self._bridge

    def transformer_lens(self, probe, bridge=None):
        """(scores, seconds) of TransformerLens' all-position head-output patching, headscope's normalisation."""
        stub_datasets_if_missing()  # before any transformer_lens import
        from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

        bridge = bridge or self.bridge()
        t = probe.tensors(self.device)
        rows = torch.arange(len(probe), device=self.device)

        def ld(logits):
            return (logits[rows, -1, t["answer"]].float() - logits[rows, -1, t["wrong"]].float()).mean()

        def run():
            with torch.no_grad():
                clean_logits, cache = bridge.run_with_cache(t["clean"], names_filter=lambda name: name.endswith("attn.hook_z"))
                ld_clean, ld_corrupt = ld(clean_logits), ld(bridge(t["corrupt"]))
                metric = lambda logits: (ld(logits) - ld_corrupt) / (ld_clean - ld_corrupt)  # noqa: E731
                return get_act_patch_attn_head_out_all_pos(bridge, t["corrupt"], cache, metric)

        scores, seconds = timed(run)
        return scores.float().cpu(), seconds


def shared_fraction(probe) -> dict:
    from headscope.patching.prefix import shared_prefix

    t = probe.tensors()
    share = shared_prefix(t["clean"], t["corrupt"]).float() / probe.length
    return {"shared_prefix_mean": float(share.mean()), "shared_prefix_min": float(share.min()), "shared_prefix_max": float(share.max())}


def row_probe(bench: Bench, name: str) -> dict:
    args = bench.args
    n_pairs = args.mix_pairs if name == "mix" else args.pairs
    probe = bench.probe(name, args.length, n_pairs)
    out = {"pairs": n_pairs, "length": args.length, **shared_fraction(probe)}
    ours, out["headscope_s"] = bench.headscope(probe)
    if not args.no_baseline:
        previous, out["headscope_no_prefix_s"] = bench.headscope(probe, reuse_prefix=False)
        out["prefix_reuse_gain"] = out["headscope_no_prefix_s"] / out["headscope_s"]
        out["max_abs_diff_vs_no_prefix"] = float((ours - previous).abs().max())
    theirs, out["transformer_lens_s"] = bench.transformer_lens(probe)
    out["speedup_vs_tl"] = out["transformer_lens_s"] / out["headscope_s"]
    out["max_abs_diff_vs_tl"] = float((ours - theirs).abs().max())
    out["score_abs_max"] = float(theirs.abs().max())
    out[f"top{bench.budget}_overlap_vs_tl"] = mask_overlap(ours, theirs, bench.budget)
    out["scores"] = ours.tolist()
    print(f"{name}: headscope {out['headscope_s']:.1f} s, TransformerLens {out['transformer_lens_s']:.1f} s "
          f"({out['speedup_vs_tl']:.1f}x); shared prefix {out['shared_prefix_mean']:.2f}", flush=True)
    return out


def row_truth(bench: Bench, name: str) -> dict:
    from headscope import load_model

    args = bench.args
    probe = bench.probe(name, args.length, args.mix_pairs if name == "mix" else args.pairs).subset(args.truth_pairs)
    bf16, seconds = bench.headscope(probe)
    truth_lm = load_model(bench.model_dir, dtype=torch.float32, device=bench.device)
    truth, truth_seconds = bench.headscope(probe, lm=truth_lm)
    del truth_lm
    out = {"pairs": len(probe), "length": args.length, "dtype": str(bench.dtype), "headscope_s": seconds, "fp32_s": truth_seconds,
           "max_rel_diff_vs_fp32": max_rel_diff(bf16, truth), "max_abs_diff_vs_fp32": float((bf16 - truth).abs().max()),
           "fp32_score_abs_max": float(truth.abs().max()), f"top{bench.budget}_overlap_vs_fp32": mask_overlap(bf16, truth, bench.budget)}
    print(f"truth:{name}: max relative difference of headscope {bench.dtype} vs float32 {out['max_rel_diff_vs_fp32']:.2e}", flush=True)
    return out


def row_long(bench: Bench, length: int) -> dict:
    import headscope.patching.activation as activation
    from headscope.heads import HeadscopeError
    from headscope.patching.batching import AdaptiveBatcher

    args = bench.args
    try:
        probe = bench.probe("mix", length, args.long_pairs)
        probe.check_fits(bench.lm.max_context)
    except HeadscopeError as err:
        print(f"long:{length}: not run ({err})", flush=True)
        return {"length": length, "not_run": str(err)}
    made: list[AdaptiveBatcher] = []

    class Recording(AdaptiveBatcher):
        def __init__(self, batch_size: int) -> None:
            super().__init__(batch_size)
            self.initial = batch_size
            made.append(self)

    bench.warm()
    if bench.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    activation.AdaptiveBatcher = Recording
    try:
        _, seconds = bench.headscope(probe)
    finally:
        activation.AdaptiveBatcher = AdaptiveBatcher
    out = {"length": length, "pairs": len(probe), **shared_fraction(probe), "headscope_s": seconds,
           "batch_initial_rows": made[0].initial, "batch_final_rows": made[0].batch_size}
    if bench.device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ids = probe.tensors(bench.device)["corrupt"]
    try:
        with torch.no_grad():
            _, forward_s = timed(lambda: bench.bridge()(ids))
        out["transformer_lens_estimated_s"] = forward_s * (bench.n_heads + 2)
        out["transformer_lens"] = f"estimated: one measured forward ({forward_s:.2f} s) x (heads + 2); not run"
        out["speedup_vs_tl_estimated"] = out["transformer_lens_estimated_s"] / seconds
    except torch.cuda.OutOfMemoryError:
        out["transformer_lens"] = "not run: one eager forward of these prompts does not fit (CUDA OOM)"
    if bench.device == "cuda":
        torch.cuda.empty_cache()
    print(f"long:{length}: headscope {seconds:.1f} s; TransformerLens {out['transformer_lens']}", flush=True)
    return out


def row_screen(bench: Bench) -> dict:
    from headscope.patching import attribution_scores, rank_correlation, screen_scores

    args = bench.args
    probe = bench.probe("mix", args.length, args.mix_pairs)
    exact, exact_s = bench.headscope(probe)
    attribution, atp_s = timed(lambda: attribution_scores(bench.lm, probe, progress=False))
    out = {"pairs": len(probe), "length": args.length, "budget": bench.budget, "exhaustive_s": exact_s, "attribution_s": atp_s,
           "exhaustive_over_attribution": exact_s / atp_s, "attribution_spearman_vs_exact": rank_correlation(attribution.values, exact),
           "attribution_overlap": mask_overlap(attribution.values, exact, bench.budget), "curve": []}
    for k in sorted({min(k, bench.n_heads) for k in args.top_k}):
        screened, seconds = timed(lambda: screen_scores(bench.lm, probe, top_k=k, progress=False))
        verified = max(abs(float(screened.values[l, h] - exact[l, h])) for l, h in screened.meta["exact_heads"])
        out["curve"].append({"top_k": k, "screen_s": seconds, "exhaustive_over_screen": exact_s / seconds,
                             "overlap": mask_overlap(screened.values, exact, bench.budget), "verified_max_abs_diff": verified})
        print(f"screen K={k}: {seconds:.1f} s ({exact_s / seconds:.1f}x faster than exhaustive), top-{bench.budget} overlap "
              f"{out['curve'][-1]['overlap']:.2f}", flush=True)
    return out


def row_agreement(bench: Bench) -> dict:
    from headscope import load_model

    args = bench.args
    probe = bench.probe("mix", args.check_length, args.check_pairs)
    lm = load_model(bench.model_dir, dtype=torch.float32, device=bench.device, attn_implementation="eager")
    ours, _ = bench.headscope(probe, lm=lm)
    del lm
    theirs, _ = bench.transformer_lens(probe, bench.bridge(torch.float32))
    out = {"pairs": len(probe), "length": args.check_length, **shared_fraction(probe),
           "fp32_max_abs_diff_vs_tl": float((ours - theirs).abs().max()), "fp32_score_abs_max": float(theirs.abs().max())}
    print(f"agreement: float32 max |headscope - TL| = {out['fp32_max_abs_diff_vs_tl']:.2e}", flush=True)
    return out


def all_rows(args) -> list[str]:
    from headscope.probes.tasks import TASK_NAMES

    return (["mix", "screen"] + list(TASK_NAMES) + [f"long:{n}" for n in args.long_lengths] + ["truth:mix", "agreement"]
            + [f"truth:{name}" for name in TASK_NAMES])


def run_row(bench: Bench, row: str) -> dict:
    kind, _, arg = row.partition(":")
    if kind == "long":
        return row_long(bench, int(arg))
    if kind == "truth":
        return row_truth(bench, arg)
    if kind == "screen":
        return row_screen(bench)
    if kind == "agreement":
        return row_agreement(bench)
    return row_probe(bench, row)


def row_file(rows_dir: Path, row: str) -> Path:
    return rows_dir / f"{row.replace(':', '_')}.json"


def row_kind(row: str) -> str:
    return row.partition(":")[0] if ":" in row else ("probe" if row not in ("screen", "agreement") else row)


def write_summary(out_dir: Path, rows_dir: Path, settings: dict, order: list[str], stem: str) -> None:
    from headscope.heads import write_json_atomic, write_text_atomic

    rows = {row: json.loads(row_file(rows_dir, row).read_text()) for row in order if row_file(rows_dir, row).is_file()}
    write_json_atomic(out_dir / f"{stem}.json", {"settings": settings, "rows": rows})
    lines = ["# Scoring speed: exact activation patching, headscope vs TransformerLens", "",
             f"Model: {settings['model']} ({settings['device']}, {settings['dtype']}, torch {settings['torch']}). Headscope: sdpa, "
             "shared-prefix reuse; TransformerLens: its bridge (eager). Ratios within a row are measured in one process.", "",
             "| row | pairs x tokens | shared prefix mean (min-max) | headscope s | w/o prefix reuse s | TransformerLens s | speed-up vs TL | prefix-reuse gain | max abs diff vs TL |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, r in rows.items():
        if row_kind(row) == "probe":
            lines.append(f"| {row} | {r['pairs']} x {r['length']} | {r['shared_prefix_mean']:.2f} ({r['shared_prefix_min']:.2f}-{r['shared_prefix_max']:.2f}) | "
                         f"{r['headscope_s']:.1f} | {r.get('headscope_no_prefix_s', float('nan')):.1f} | {r['transformer_lens_s']:.1f} | "
                         f"**{r['speedup_vs_tl']:.1f}x** | {r.get('prefix_reuse_gain', float('nan')):.2f}x | {r['max_abs_diff_vs_tl']:.2g} |")
    long_rows = {row: r for row, r in rows.items() if row_kind(row) == "long"}
    if long_rows:
        lines += ["", "| long row | pairs | headscope s | batch rows (initial -> final) | peak GiB | TransformerLens |", "|---|---:|---:|---|---:|---|"]
        for row, r in long_rows.items():
            if "not_run" in r:
                lines.append(f"| {row} | - | not run | - | - | {r['not_run']} |")
            else:
                estimate = f" ({r['transformer_lens_estimated_s']:.0f} s, {r['speedup_vs_tl_estimated']:.0f}x)" if "transformer_lens_estimated_s" in r else ""
                lines.append(f"| {row} | {r['pairs']} | {r['headscope_s']:.1f} | {r['batch_initial_rows']} -> {r['batch_final_rows']:.3g} | "
                             f"{r.get('peak_gib', float('nan')):.1f} | {r['transformer_lens']}{estimate} |")
    truth = {row: r for row, r in rows.items() if row_kind(row) == "truth"}
    if truth:
        lines += ["", "| precision row | pairs | max rel diff vs float32 (max abs / max abs score) | max abs diff | top-budget overlap |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {row} | {r['pairs']} | {r['max_rel_diff_vs_fp32']:.2e} | {r['max_abs_diff_vs_fp32']:.2e} | "
                  f"{next(v for k, v in r.items() if k.endswith('_overlap_vs_fp32')):.2f} |" for row, r in truth.items()]
    if "screen" in rows:
        r = rows["screen"]
        lines += ["", f"Screen on the mix ({r['pairs']} x {r['length']}): exhaustive {r['exhaustive_s']:.1f} s; AtP alone {r['attribution_s']:.1f} s "
                  f"({r['exhaustive_over_attribution']:.1f}x), Spearman(AtP, exact) {r['attribution_spearman_vs_exact']:.3f}, top-{r['budget']} "
                  f"overlap {r['attribution_overlap']:.2f}.", "", "| K verified | screen s | exhaustive / screen | top-budget overlap | verified max abs diff |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['top_k']} | {c['screen_s']:.1f} | {c['exhaustive_over_screen']:.2f}x | {c['overlap']:.2f} | {c['verified_max_abs_diff']:.1e} |" for c in r["curve"]]
    if "agreement" in rows:
        r = rows["agreement"]
        lines += ["", f"Float32 agreement ({r['pairs']} x {r['length']} mix, eager): max |headscope - TransformerLens| = "
                  f"{r['fp32_max_abs_diff_vs_tl']:.2e} (scores up to {r['fp32_score_abs_max']:.2f})."]
    write_text_atomic(out_dir / f"{stem}.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local Hugging Face model directory (default: random Qwen3-1.7B shape)")
    parser.add_argument("--rows", default=None, help="comma list of rows to run (default: every row not yet done)")
    parser.add_argument("--rows-dir", default=None, help="where row results are read and written")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of each per-probe row")
    parser.add_argument("--mix-pairs", type=int, default=16, help="pairs of the mix rows")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--long-lengths", type=counts, default=[8192, 32768])
    parser.add_argument("--long-pairs", type=int, default=2)
    parser.add_argument("--truth-pairs", type=int, default=4, help="pairs of the float32 truth rows (the first of the row's probe)")
    parser.add_argument("--top-k", type=counts, default=[28, 56, 112, 224], help="heads screen verifies exactly, one curve point each")
    parser.add_argument("--check-pairs", type=int, default=8)
    parser.add_argument("--check-length", type=int, default=256)
    parser.add_argument("--no-baseline", action="store_true", help="do not time headscope without prefix reuse")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds: start no row that would likely end after this")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU in float32, short prompts (smoke test)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.length, args.pairs, args.mix_pairs, args.truth_pairs = 64, 2, 7, 2
        args.long_lengths, args.long_pairs, args.check_pairs, args.check_length, args.top_k = [128, 256], 1, 2, 64, [2, 4]
    from headscope.heads import write_json_atomic

    suffix = ("_quick" if args.quick else "") + (f"_{Path(args.model).name}" if args.model else "")
    stem = f"scoring_speed{suffix}"
    results = Path("/tmp/headscope_scoring_speed_quick") if args.quick else ROOT / "benchmarks" / "results"  # a smoke run stays out of the repo
    rows_dir = Path(args.rows_dir or results / f"scoring_speed_rows{suffix}")
    out_dir = Path(os.environ.get("OUT", results))
    order = all_rows(args)
    wanted = args.rows.split(",") if args.rows else order
    unknown = [row for row in wanted if row not in order and not row.startswith(("truth:", "long:"))]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(order)}")
    order += [row for row in wanted if row not in order]
    pending = [row for row in wanted if not row_file(rows_dir, row).is_file()]
    print(f"{len(wanted) - len(pending)} of {len(wanted)} rows done in {rows_dir}; running {pending or 'none'}", flush=True)
    bench = Bench(args, rows_dir.parent / "random_model" if args.quick else Path("/tmp/headscope_scoring_speed_model")) if pending else None
    settings = {"model": args.model or ("tiny random Qwen3" if args.quick else "random Qwen3-1.7B shape"),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
                "dtype": "torch.float32" if args.quick else "torch.bfloat16", "torch": torch.__version__}
    for row in pending:
        earlier = [json.loads(f.read_text()).get("wall_s", 0.0) for f in rows_dir.glob("*.json")
                   if row_kind(json.loads(f.read_text()).get("row", "")) == row_kind(row)]
        elapsed = time.perf_counter() - started
        if earlier and elapsed + max(earlier) > args.budget:
            print(f"{row}: not started ({elapsed:.0f} s used, rows of this kind took up to {max(earlier):.0f} s, budget "
                  f"{args.budget:.0f} s); run again", flush=True)
            continue
        row_started = time.perf_counter()
        result = run_row(bench, row)
        result.update(row=row, wall_s=time.perf_counter() - row_started, **settings)
        write_json_atomic(row_file(rows_dir, row), result)
        write_summary(out_dir, rows_dir, settings, order, stem)
    if out_dir.resolve() != rows_dir.parent.resolve() and rows_dir.is_dir():
        shutil.copytree(rows_dir, out_dir / rows_dir.name, dirs_exist_ok=True)
    write_summary(out_dir, rows_dir, settings, order, stem)
    left = [row for row in wanted if not row_file(rows_dir, row).is_file()]
    print(f"rows left: {', '.join(left)}" if left else "all rows done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
