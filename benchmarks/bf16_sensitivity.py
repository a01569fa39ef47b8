"""Is a hybrid's bf16 drift from its float32 self a kernel or component error, or the model's own sensitivity?

`generate_speed` checks each variant's greedy tokens against the same model run with float32 weights. The
untrained 7:1 hybrid of the real SmolLM2-135M fails that check (30/32 tokens within 0.1 nats at 4K x 1 on the
H200, 25/32 at 4K x 32), and so does its pure-torch path on the CPU. Two readings: a fault in the hybrid's
attention (the GDN branch, the fusion), or a model that amplifies any bf16 rounding. This benchmark tells them
apart on the CPU, for the original, its hybrid as built and the same hybrid with every head's ``gamma`` set to its
pretrained head's output RMS (``calibrate_gamma`` on the next ``--tokens`` tokens: where the transfer starts),
over ``--tokens`` tokens of a text file:

* ``float32``: next-token NLL and entropy (nats) of each model in float32: is the hybrid a language model yet?
* ``mixed``: KL(float32 || variant) per token and top-1 agreement, for three variants: everything in bf16;
  only the attention modules in bf16 (the rest float32); everything but the attention modules in bf16. A model
  that amplifies rounding drifts in all three; a faulty attention path drifts mostly in the second.
* ``residual``: the relative error of the residual stream after each decoder layer, all in bf16 against float32
  (where the drift grows), and the stream's largest magnitude on the first token and on the others (where the
  massive activations sit);
* ``local``: each layer's attention module fed the float32 run's own inputs (``forward_pre_hook``), once in
  float32 and once as a bf16 copy: the relative error ``|bf16 - float32| / |float32|`` of its output, of the
  GDN branch (``_gated_delta``), the FA branch (``_full_attention``) and the fused core (``core``). bf16 keeps
  8 bits of mantissa, so a healthy module sits at ~0.3-1%; a fault shows as one part far above that.

Usage: ``python benchmarks/bf16_sensitivity.py --model DIR --mask MASK.json [--text FILE --tokens 256]``
(``--random-mask SEED``: a random KV-aware 7:1 mask instead; ``--hybrid DIR``: a trained hybrid of the model,
``headscope transfer``'s ``final/``, against the original, instead of the built and calibrated ones); writes ``$OUT/bf16_sensitivity.{json,md}``
(OUT defaults to benchmarks/results). Bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MASSIVE = 10.0  # a token carries a massive activation when its largest |value| is this many times the median token's
BRANCHES = ("_gated_delta", "_full_attention", "core")  # HeadwiseHybridAttention methods whose outputs ``local`` compares
VARIANTS = {"all bf16": (torch.bfloat16, torch.bfloat16), "attention bf16 only": (torch.bfloat16, torch.float32),
            "all but attention bf16": (torch.float32, torch.bfloat16)}  # (attention dtype, dtype of the rest)


def cast(x, dtype: torch.dtype):
    """``x`` with its floating tensors (also inside tuples and dicts) in ``dtype``."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(cast(y, dtype) for y in x)
    if isinstance(x, dict):
        return {k: cast(v, dtype) for k, v in x.items()}
    return x


@contextmanager
def at_precision(model, attention: torch.dtype, rest: torch.dtype):
    """Inside the block, a copy of ``model`` (``model`` itself is left as it was) whose attention modules hold
    ``attention`` weights and see ``attention`` inputs, the rest ``rest`` weights, and whose rotary ``inv_freq``
    buffers stay float32 (as ``from_pretrained(dtype=...)`` and ``build_hybrid`` keep them: the model
    ``generate_speed`` runs)."""
    low = copy.deepcopy(model).to(rest)
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            owner, _, leaf = name.rpartition(".")
            low.get_submodule(owner)._buffers[leaf] = buffer.clone()
    hooks = []
    try:
        for layer in low.model.layers:
            layer.self_attn.to(attention)
            hooks.append(layer.self_attn.register_forward_pre_hook(lambda m, a, kw: (cast(a, attention), cast(kw, attention)), with_kwargs=True))
            hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out: cast(out, rest)))
        yield low
    finally:
        for hook in hooks:
            hook.remove()


def log_probs(model, ids: torch.Tensor, attention: torch.dtype = torch.float32, rest: torch.dtype = torch.float32) -> torch.Tensor:
    """``(1, T, V)`` float32 next-token log-probabilities of ``ids`` ``(1, T)`` at the given precisions (``model``
    itself when both are float32, else ``at_precision``'s copy of it)."""
    same = attention == rest == torch.float32
    with (nullcontext(model) if same else at_precision(model, attention, rest)) as run, torch.no_grad():
        return run(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)


def mixed(model, ids: torch.Tensor) -> dict:
    """The ``float32`` and ``mixed`` sections for one model (module docstring)."""
    ref = log_probs(model, ids)
    out = {"float32": {"nll": float(-ref[0, :-1].gather(-1, ids[0, 1:, None]).mean()), "entropy": float(-(ref.exp() * ref).sum(-1).mean())}}
    for name, dtypes in VARIANTS.items():
        lp = log_probs(model, ids, *dtypes)
        out[name] = {"kl": float((ref.exp() * (ref - lp)).sum(-1).mean()), "top1_agree": float((ref.argmax(-1) == lp.argmax(-1)).float().mean())}
    return out


def hooked_forward(model, ids: torch.Tensor, hooks: list) -> None:
    """One forward of ``ids`` (no grad, no cache) with ``hooks`` (handles) in place; they are removed after it."""
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()


def layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output (the residual stream after it) of one forward, in float32."""
    outputs = []
    hooked_forward(model, ids, [layer.register_forward_hook(lambda m, a, out: outputs.append((out[0] if isinstance(out, tuple) else out).float()))
                                for layer in model.model.layers])
    return outputs


def residual(model, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per decoder layer (the ``residual`` section): ``drift``, the relative error of the residual stream after it,
    all in bf16 against float32 (where a model's drift grows); and from the float32 run its largest magnitude on
    the first token and on the others (``first_token_max``, ``other_tokens_max``) and how many tokens carry a massive
    activation (``massive_tokens``: largest |value| above ``MASSIVE`` times the median token's): a pretrained
    model parks its massive activations on the first token (the attention sink), and where they spread to other
    tokens, bf16's relative rounding of values in the thousands dominates the stream's error."""
    want = layer_outputs(model, ids)  # each (1, T, C)
    with at_precision(model, torch.bfloat16, torch.bfloat16) as low:
        got = layer_outputs(low, ids)
    peaks = [w[0].abs().amax(-1) for w in want]  # (T,) each token's largest |value|
    return {"drift": [relative(g, w) for g, w in zip(got, want)], "first_token_max": [float(p[0]) for p in peaks],
            "other_tokens_max": [float(p[1:].max()) if len(p) > 1 else 0.0 for p in peaks],
            "massive_tokens": [int((p > MASSIVE * p.median()).sum()) for p in peaks]}


@contextmanager
def recorded(attention_class):
    """Inside the block each call of the ``BRANCHES`` that ``attention_class`` has (none on a plain family
    attention) also stores its float32 output in the yielded dict (by method name; the last call wins)."""
    record, saved = {}, {name: attention_class.__dict__.get(name) for name in BRANCHES if hasattr(attention_class, name)}

    def wrap(name, method):
        def wrapped(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            record[name] = out.float().clone()
            return out
        return wrapped

    try:
        for name in saved:
            setattr(attention_class, name, wrap(name, getattr(attention_class, name)))
        yield record
    finally:
        for name, method in saved.items():  # the class's own methods back; an inherited one's wrapper removed
            if method is None:
                delattr(attention_class, name)
            else:
                setattr(attention_class, name, method)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


def local(model, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per layer: the relative error of its attention output and branches in ``dtype`` against float32, both fed
    the float32 forward's own inputs to that layer (the ``local`` section)."""
    inputs = {}
    hooked_forward(model, ids, [layer.self_attn.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, (a, kw)), with_kwargs=True)
                                for i, layer in enumerate(model.model.layers)])
    rows = []
    for i, layer in enumerate(model.model.layers):
        attention, (args, kwargs) = layer.self_attn, inputs[i]
        low = copy.deepcopy(attention).to(dtype)
        with recorded(type(attention)) as record, torch.no_grad():
            want = attention(*args, **kwargs)
            want_parts = dict(record)
            record.clear()
            got = low(*cast(args, dtype), **cast(kwargs, dtype))
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        row = {"layer": i, "out": relative(first(got), first(want).float())}
        spec = getattr(attention, "spec", None)
        if spec is not None:
            row.update(n_fa=spec.n_fa_heads, n_gdn=spec.n_gdn_heads)
        row.update({name: relative(record[name], part) for name, part in want_parts.items() if name in record})
        rows.append(row)
    return rows


def markdown(meta: dict, results: dict) -> str:
    lines = ["# bf16 sensitivity: the original and its hybrid against their float32 selves", "",
             f"Model `{meta['model']}`, mask `{meta['mask']}`, {meta['tokens']} tokens of `{meta['text']}`, CPU, torch {meta['torch']}. "
             "KL in nats per token (float32 || variant); `local`: relative error of each layer's attention in bf16 fed the float32 "
             "run's inputs (`benchmarks/bf16_sensitivity.py` docstring).", "",
             "| model | float32 NLL | float32 entropy | " + " | ".join(f"{name}: KL / top-1" for name in VARIANTS) + " | local out max (layer) |",
             "|---|---:|---:|" + "---:|" * (len(VARIANTS) + 1)]
    for name, result in results.items():
        worst = max(result["local"], key=lambda r: r["out"])
        lines.append(f"| {name} | {result['float32']['nll']:.3f} | {result['float32']['entropy']:.3f} | "
                     + " | ".join(f"{result[v]['kl']:.4f} / {result[v]['top1_agree']:.3f}" for v in VARIANTS)
                     + f" | {worst['out']:.4f} ({worst['layer']}) |")
    names = list(results)
    lines += ["", "## Residual stream after each layer: drift (all bf16, relative error against float32); in float32, the largest "
              f"|value| on the first token / on the others, and the tokens carrying a massive activation (largest |value| over {MASSIVE:g}x "
              "the median token's)", "",
              "| layer | " + " | ".join(f"{n}: drift | {n}: max first / others (massive tokens)" for n in names) + " |",
              "|---:|" + "---:|---:|" * len(names)]
    for i in range(len(results[names[0]]["residual"]["drift"])):
        cells = [f"{r['drift'][i]:.4f} | {r['first_token_max'][i]:.0f} / {r['other_tokens_max'][i]:.0f} ({r['massive_tokens'][i]})"
                 for r in (results[n]["residual"] for n in names)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    name = "hybrid" if "hybrid" in results else "hybrid, trained"
    hybrid = results.get(name, {}).get("local", [])
    if hybrid:
        lines += ["", f"## {'Hybrid as built' if name == 'hybrid' else 'Trained hybrid'}, per layer: local relative error in bf16", "", "| layer | FA heads | GDN heads | attention out | GDN branch | FA branch | core |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        cell = lambda row, key: f"{row[key]:.4f}" if key in row else "-"  # noqa: E731
        lines += [f"| {r['layer']} | {r.get('n_fa', '-')} | {r.get('n_gdn', '-')} | {r['out']:.4f} | {cell(r, '_gated_delta')} | "
                  f"{cell(r, '_full_attention')} | {cell(r, 'core')} |" for r in hybrid]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from headscope.heads import HeadscopeError, write_json_atomic, write_text_atomic
    from headscope.hybrid import build_hybrid, calibrate_gamma
    from headscope.mask import random_mask
    from headscope.maskfile import load_mask
    from headscope.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory (Llama/Mistral/Qwen2/Qwen3)")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--mask", help="the head mask (JSON) to build the hybrid from")
    choice.add_argument("--random-mask", type=int, metavar="SEED", help="a random KV-aware 7:1 mask with this seed instead")
    choice.add_argument("--hybrid", help="a trained hybrid of --model (`headscope transfer`'s final/) instead of one built here")
    parser.add_argument("--text", default=str(ROOT / "data" / "haystack" / "essay.txt"), help="text whose first --tokens tokens are scored")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.exit(2, "bf16_sensitivity: --tokens must be at least 2\n")
    for flag, path in (("--model", args.model), ("--mask", args.mask), ("--hybrid", args.hybrid), ("--text", args.text)):
        if path is not None and not Path(path).exists():
            parser.exit(2, f"bf16_sensitivity: {flag} {path} does not exist\n")
    torch.manual_seed(0)
    try:
        text = Path(args.text).read_text()
        lm = load_model(args.model, dtype=torch.float32)
        if args.hybrid:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from generate_speed_models import trained_hybrid

            trained, mask, source = trained_hybrid(args.hybrid, lm.model, lm.fingerprint, torch.device("cpu"), torch.float32)
        else:
            mask = (load_mask(args.mask, expect=lm.fingerprint) if args.mask
                    else random_mask(lm.fingerprint, "7:1", seed=args.random_mask, kv_aware=True))
    except (OSError, HeadscopeError) as err:
        parser.exit(2, f"bf16_sensitivity: {err}\n")
    tokens = lm.tokenizer(text, return_tensors="pt").input_ids
    ids = tokens[:, : args.tokens]
    if ids.shape[1] < 2:
        parser.exit(2, f"bf16_sensitivity: {args.text} has fewer than 2 tokens\n")
    calibration = tokens[:, args.tokens : 2 * args.tokens] if tokens.shape[1] >= 2 * args.tokens else ids
    if args.hybrid:
        models = {"original": lm.model.eval(), "hybrid, trained": trained}
    else:
        calibrated = build_hybrid(lm, mask).eval()
        calibrate_gamma(calibrated, lm, calibration)  # the transfer's starting point: every head at its pretrained scale
        models = {"original": lm.model.eval(), "hybrid": build_hybrid(lm, mask).eval(), "hybrid, gamma calibrated": calibrated}
    results = {}
    for name, model in models.items():
        results[name] = {**mixed(model, ids), "local": local(model, ids), "residual": residual(model, ids)}
        print(name, {k: v for k, v in results[name].items() if k != "local"}, flush=True)
    shown = lambda path: os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else path  # noqa: E731
    mask_text = source if args.hybrid else shown(args.mask) if args.mask else f"random KV-aware 7:1, seed {args.random_mask}"
    meta = {"model": args.model, "mask": mask_text, "text": shown(args.text), "tokens": int(ids.shape[1]), "torch": torch.__version__}
    if not args.hybrid:
        meta["calibration"] = "the next tokens of the text" if calibration is not ids else "the scored tokens (the text is too short for more)"
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    write_json_atomic(out / "bf16_sensitivity.json", {"meta": meta, "results": results})
    report = markdown(meta, results)
    write_text_atomic(out / "bf16_sensitivity.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
