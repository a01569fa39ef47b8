"""Scoring speed: headscope's exact ``activation`` scorer vs TransformerLens, side by side in one run.

Model: random-init Qwen3 with Qwen3-1.7B's shape (28 layers, 16 query heads, 8 KV heads, head_dim 128,
hidden 2048, MLP 6144, vocab 151936), bf16 on CUDA. Probe: 32 pairs of 1024 random tokens whose
corrupt version differs in a block of 16 tokens. Both tools patch every head's output at all positions
(denoising) and normalise the same way; we report wall time, the ratio and the max score difference,
in bf16 at full size and in float32 on a shorter probe (the agreement check proper).

TransformerLens' bridge forces eager attention, so headscope is timed with eager attention too (same
kernels, the fair ratio) and with its default sdpa. TransformerLens imports ``datasets`` only for its
dataset helpers; the GPU box has no pyarrow, so when ``datasets`` is missing a stub module with the two
names TransformerLens imports is installed (it is never called here).

Screen vs exhaustive (sdpa, same probe): ``attribution`` alone and ``screen`` (AtP for every head, exact
activation patching of the top ``--top-k`` by |estimate|, default 112 = twice the 56-head budget) are timed
against the exhaustive exact run; we report the time ratios, the Spearman correlation of AtP with the
exact scores, and the overlap of the 56-head masks (top-56 by |score|) each selects with the exact one.

Usage (GPU): ``python benchmarks/scoring_speed.py [--pairs 32 --length 1024] [--top-k 56,112] [--skip-tl]``;
writes ``$OUT/scoring_speed.json`` and ``.md`` (OUT defaults to benchmarks/results). With ``--skip-tl`` the
committed results (TransformerLens numbers and their ratios) are kept under ``earlier_run_*`` keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch


RUN_SETTINGS = ("device", "torch", "pairs", "length", "layers", "heads", "kv_heads", "head_dim", "dtype")


def earlier_run_numbers(committed: dict) -> dict:
    """The committed results of a full run (TransformerLens included), kept beside a ``--skip-tl`` run under
    ``earlier_run_*`` keys: their ratios were measured side by side in that run, never mixed with this one's."""
    return {key if key.startswith("earlier_run_") else f"earlier_run_{key}": value
            for key, value in committed.items()
            if key not in RUN_SETTINGS and "screen" not in key and "attribution" not in key}


def head_counts(text: str) -> list[int]:
    """``--top-k``: comma-separated positive head counts."""
    counts = [int(part) for part in text.split(",") if part.strip().isdigit()]
    if not counts or len(counts) != len(text.split(",")) or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def stub_datasets_if_missing() -> None:
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


def qwen3_config(layers: int, tiny: bool):
    """Qwen3-1.7B's shape, or a tiny one (``--tiny``) to smoke-test this script on a CPU."""
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=8, max_position_embeddings=4096)
    return Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=1_000_000.0,
    )


def random_probe(n_pairs: int, length: int, vocab: int, seed: int = 0):
    from headscope.probes.base import Probe, PromptPair

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(100, vocab, (n_pairs, length), generator=gen)
    corrupt = clean.clone()
    corrupt[:, length // 4 : length // 4 + 16] = torch.randint(100, vocab, (n_pairs, 16), generator=gen)
    answers = torch.randint(100, vocab, (n_pairs, 2), generator=gen)
    pairs = [PromptPair(tuple(c.tolist()), tuple(k.tolist()), int(a[0]), int(a[1])) for c, k, a in zip(clean, corrupt, answers)]
    return Probe("random_block", "retrieval", pairs)


def transformer_lens_scores(bridge, probe, device, patch_fn) -> torch.Tensor:
    """TransformerLens' all-position head-output patching with headscope's normalisation."""
    t = probe.tensors(device)
    rows = torch.arange(len(probe), device=device)

    def ld(logits):
        return (logits[rows, -1, t["answer"]].float() - logits[rows, -1, t["wrong"]].float()).mean()

    with torch.no_grad():
        clean_logits, cache = bridge.run_with_cache(t["clean"], names_filter=lambda name: name.endswith("attn.hook_z"))
        ld_clean, ld_corrupt = ld(clean_logits), ld(bridge(t["corrupt"]))
        metric = lambda logits: (ld(logits) - ld_corrupt) / (ld_clean - ld_corrupt)  # noqa: E731
        return patch_fn(bridge, t["corrupt"], cache, metric)


def float32_agreement(model_dir: str, n_pairs: int, length: int, device: str) -> dict:
    """Scores of both tools in float32 (eager attention) on the same model: bf16 rounding on a random
    model, whose clean/corrupt gap is small, swamps the comparison, so agreement is checked here."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    from headscope import load_model
    from headscope.patching import activation_scores

    probe = random_probe(n_pairs, length, vocab=512)
    lm = load_model(model_dir, dtype=torch.float32, device=device, attn_implementation="eager")
    ours = activation_scores(lm, probe, progress=False).values
    del lm
    bridge = TransformerBridge.boot_transformers(model_dir, device=device, dtype=torch.float32)
    theirs = transformer_lens_scores(bridge, probe, device, get_act_patch_attn_head_out_all_pos).float().cpu()
    return {"fp32_pairs": n_pairs, "fp32_length": length, "fp32_max_abs_diff": float((ours - theirs).abs().max()),
            "fp32_score_abs_max": float(theirs.abs().max())}


def mask_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Fraction of shared heads between the top-``k`` (by |score|) of ``a`` and of ``b``."""
    return len(set(a.abs().flatten().topk(k).indices.tolist()) & set(b.abs().flatten().topk(k).indices.tolist())) / k


def screen_vs_exhaustive(lm, probe, exact: torch.Tensor, exact_seconds: float, top_ks: list[int]) -> dict:
    """Time ``attribution`` and ``screen`` (once per verified-head count in ``top_ks``) against the
    exhaustive exact scores ``exact`` (sdpa). The exact check of K heads costs about K / n_heads of the
    exhaustive run, so the time ratio is bounded by n_heads / K: the K values show the speed/overlap trade."""
    from headscope.patching import attribution_scores, rank_correlation, screen_scores

    k = min(56, exact.numel() // 8)  # the 7:1 budget: 56 of 448 heads on the full-size model
    attribution, atp_seconds = timed(lambda: attribution_scores(lm, probe, progress=False))
    out = {
        "attribution_s": atp_seconds, "exhaustive_over_attribution": exact_seconds / atp_seconds,
        "attribution_spearman_vs_exact": rank_correlation(attribution.values, exact),
        f"attribution_top{k}_overlap": mask_overlap(attribution.values, exact, k),
    }
    print(f"attribution {atp_seconds:.1f} s vs exhaustive {exact_seconds:.1f} s; top-{k} mask overlap with exact "
          f"{out[f'attribution_top{k}_overlap']:.2f}; Spearman(AtP, exact) {out['attribution_spearman_vs_exact']:.3f}", flush=True)
    for top_k in sorted({min(t, exact.numel()) for t in top_ks}):
        screened, screen_seconds = timed(lambda: screen_scores(lm, probe, top_k=top_k, progress=False))
        verified_diff = max(abs(screened.values[l, h] - exact[l, h]) for l, h in screened.meta["exact_heads"])
        out.update({
            f"screen{top_k}_s": screen_seconds, f"exhaustive_over_screen{top_k}": exact_seconds / screen_seconds,
            f"screen{top_k}_top{k}_overlap": mask_overlap(screened.values, exact, k),
            f"screen{top_k}_verified_max_abs_diff": float(verified_diff),
        })
        print(f"screen (verify top {top_k}) {screen_seconds:.1f} s: {exact_seconds / screen_seconds:.1f}x faster; "
              f"top-{k} mask overlap with exact {out[f'screen{top_k}_top{k}_overlap']:.2f}", flush=True)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--skip-tl", action="store_true", help="time headscope only")
    parser.add_argument("--check-pairs", type=int, default=8, help="pairs of the float32 agreement check")
    parser.add_argument("--check-length", type=int, default=256, help="prompt length of the float32 agreement check")
    parser.add_argument("--agreement-only", action="store_true",
                        help="run only the float32 agreement check and merge it into an existing results file")
    parser.add_argument("--top-k", type=head_counts, default=[112], help="heads screen verifies exactly; a comma list times each (default 112)")
    parser.add_argument("--skip-screen", action="store_true", help="do not time attribution / screen")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU in float32 (smoke test of this script)")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)

    from transformers import Qwen3ForCausalLM

    from headscope import load_model
    from headscope.patching import activation_scores

    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    if args.agreement_only:
        torch.manual_seed(0)
        model_dir = "/tmp/qwen3_1p7b_random"
        Qwen3ForCausalLM(qwen3_config(args.layers, args.tiny)).save_pretrained(model_dir)
        stub_datasets_if_missing()
        results_file = out_dir / "scoring_speed.json"
        result = json.loads(results_file.read_text()) if results_file.is_file() else {}
        result.update(float32_agreement(model_dir, args.check_pairs, args.check_length, device))
        print(f"float32 agreement: max |headscope - TL| = {result['fp32_max_abs_diff']:.2e}", flush=True)
        write_results(out_dir, result)
        return
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config(args.layers, args.tiny)).to(device, dtype).eval()
    model_dir = "/tmp/qwen3_1p7b_random"
    model.save_pretrained(model_dir)
    probe = random_probe(args.pairs, args.length, model.config.vocab_size)
    result = {}
    committed = Path(__file__).parent / "results" / "scoring_speed.json"
    if args.skip_tl and not args.tiny and committed.is_file():
        result = earlier_run_numbers(json.loads(committed.read_text()))
    result |= {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "pairs": args.pairs, "length": args.length,
              "layers": args.layers, "heads": 16, "kv_heads": 8, "head_dim": model.config.head_dim, "dtype": str(dtype)}

    lm = load_model(model)
    activation_scores(lm, probe.subset(2), progress=False)  # warm-up: kernels, allocator
    timings, scores = {}, {}
    for impl in ("sdpa",) if args.skip_tl else ("sdpa", "eager"):  # eager only to match TransformerLens' kernels
        lm.set_attn_implementation(impl)
        run, seconds = timed(lambda: activation_scores(lm, probe, progress=False))
        timings[f"headscope_{impl}_s"], scores[impl] = seconds, run.values
        print(f"headscope activation ({impl}): {seconds:.1f} s  gap {run.meta['ld_clean'] - run.meta['ld_corrupt']:+.4f}", flush=True)
    result.update(timings)
    if device == "cuda":
        result["headscope_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not args.skip_screen:
        lm.set_attn_implementation("sdpa")
        result.update(screen_vs_exhaustive(lm, probe, scores["sdpa"], timings["headscope_sdpa_s"], args.top_k))
    del lm, model
    if device == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_tl:
        stub_datasets_if_missing()
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

        bridge = TransformerBridge.boot_transformers(model_dir, device=device, dtype=dtype)
        tl_scores, tl_seconds = timed(lambda: transformer_lens_scores(bridge, probe, device, get_act_patch_attn_head_out_all_pos))
        tl_scores = tl_scores.float().cpu()
        result["transformer_lens_s"] = tl_seconds
        print(f"TransformerLens get_act_patch_attn_head_out_all_pos: {tl_seconds:.1f} s", flush=True)
        for impl in ("sdpa", "eager"):
            result[f"speedup_{impl}"] = tl_seconds / timings[f"headscope_{impl}_s"]
            result[f"max_abs_diff_{impl}"] = float((scores[impl] - tl_scores).abs().max())
        result["tl_score_abs_max"] = float(tl_scores.abs().max())
        del bridge
        result.update(float32_agreement(model_dir, args.check_pairs, args.check_length, device))
        print(f"float32 agreement: max |headscope - TL| = {result['fp32_max_abs_diff']:.2e}", flush=True)
        k = min(56, tl_scores.numel() // 8)  # the 7:1 budget: 56 of 448 heads on the full-size model
        result[f"top{k}_overlap_eager"] = len(
            set(scores["eager"].abs().flatten().topk(k).indices.tolist()) & set(tl_scores.abs().flatten().topk(k).indices.tolist())
        ) / k

    write_results(out_dir, result)


def write_results(out_dir: Path, result: dict) -> None:
    (out_dir / "scoring_speed.json").write_text(json.dumps(result, indent=1))
    lines = ["| quantity | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
    (out_dir / "scoring_speed.md").write_text("# Scoring speed (exact activation patching)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
