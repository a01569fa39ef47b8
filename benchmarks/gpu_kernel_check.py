"""GPU check of headscope's kernels: fla GDN and the Triton epilogue against float32 references, plus timings.

Sections (each runs inside try/except; a failure prints its traceback and the next section still runs):

a. Gated DeltaNet: fla ``chunk_gated_delta_rule`` (forward and backward: dq, dk, dv, dg, dbeta, dh0) and
   ``fused_recurrent_gated_delta_rule`` (decode from a prefilled state) against
   :func:`headscope.kernels.gdn.naive.naive_recurrent_gated_delta_rule` (float32, on the same
   bf16-rounded inputs), at a few shapes including H=14, D=128, T=1024 in bf16. Also the dispatcher
   ``headscope.kernels.gdn.ops.gated_delta_rule`` (prefill + decode continuation, T == 1 with grads) and
   the pure-torch chunk path on the GPU.
b. Epilogue: the Triton forward/backward against autograd through the float32 reference.
c. Epilogue timing: fused Triton vs the unfused torch reference (and torch.compile of it), forward and
   forward+backward at B=1, T=131072, H=16, D=128 bf16, and forward at decode B=32, T=1.
d. RoPE + L2 norm of the GDN q/k (``rope_norm``): the dispatcher (Triton on CUDA) against the float32 torch
   composition (forward and dx) at B=1 T=4096 H=14 D=128 bf16 and two more shapes, ``x`` a view of the
   short-conv output as in the layer; the former bf16 composition's own error for comparison. Timing at
   B=1, T=131072, H=14, D=128 bf16 (one of the layer's two calls): fused vs the composition vs
   torch.compile of it, forward and forward+backward, GB/s over the fused minimum (read x, cos, sin;
   write y).
e. GDN input preparation (``gdn_prep``, :mod:`gdn_prep_check`): the fused conv + SiLU + RoPE + L2 norm
   against the float32 composition (q/k/v sliced from projections, conv state, padding mask, chunked
   prefill + decode); timing at B=1, T=131072, H=14, D=128 bf16 of the fused kernel (and a sweep of its
   tilings) vs the composition, and of the whole GDN branch ``_gated_delta`` with either, prefill and
   decode at B=32.

Errors are fla's relative RMS (RMS(diff)/RMS(ref)); the pass column uses fla's tolerances (0.005 for
outputs/states, 0.008 for dq/dk/dv/dh0, 0.02 for dg/dbeta) except where the row says otherwise.

Usage (GPU box, fla wheels from .whl/):
    . benchmarks/gpu_setup.sh && OUT=/tmp/out python benchmarks/gpu_kernel_check.py
CPU smoke test of the harness (tiny shapes; the dispatcher takes the torch paths, no fla kernels):
    TRITON_INTERPRET=1 python benchmarks/gpu_kernel_check.py --tiny
Writes ``$OUT/gpu_kernel_check.json`` and ``.md`` (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.gdn.chunk import chunk_gated_delta_rule as torch_chunk
from headscope.kernels.gdn.naive import naive_recurrent_gated_delta_rule
from headscope.kernels.gdn.ops import fla_backward_broken, gated_delta_rule
from headscope.kernels.metrics import relative_rms_error as rel
from headscope.kernels.rope_norm.naive import rope_l2norm_reference

TOLERANCES = {"o": 0.005, "state": 0.005, "dq": 0.008, "dk": 0.008, "dv": 0.008, "dh0": 0.008, "dg": 0.02, "dbeta": 0.02}
ROWS: list[dict] = []  # the error table
TIMINGS: list[dict] = []
FAILURES: list[str] = []


def record(section: str, case: str, quantity: str, error: float, tol: float | None = None) -> None:
    tol = TOLERANCES.get(quantity, 0.005) if tol is None else tol
    row = dict(section=section, case=case, quantity=quantity, rel_rms=error, tol=tol, ok=bool(error <= tol))
    ROWS.append(row)
    print(f"  {section:<10} {case:<42} {quantity:<7} {error:10.3e}  (tol {tol:g}) {'ok' if row['ok'] else 'FAIL'}", flush=True)


def gdn_inputs(batch, length, heads, dim, dtype, device, seed):
    """L2-normalised q/k, sigmoid beta, GDN-like log-decay; rounded to ``dtype`` except g (float32)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q = F.normalize(randn(batch, length, heads, dim), dim=-1).to(dtype)
    k = F.normalize(randn(batch, length, heads, dim), dim=-1).to(dtype)
    v = randn(batch, length, heads, dim).to(dtype)
    g = F.logsigmoid(randn(batch, length, heads) + 3.0)  # float32, mostly mild decay
    beta = torch.sigmoid(randn(batch, length, heads)).to(dtype)
    h0 = randn(batch, heads, dim, dim) * 0.1
    return q, k, v, g, beta, h0


def grads_of(fn, inputs, do, dht):
    """Forward + backward of fn(q, k, v, g, beta, initial_state=h0) against fixed cotangents."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    loss = (o.float() * do).sum() + (ht.float() * dht).sum()
    return o.detach(), ht.detach(), torch.autograd.grad(loss, leaves)


def section_gdn(device: str, tiny: bool) -> None:
    print("\n[a] Gated DeltaNet vs float32 naive recurrent reference", flush=True)
    impls = {"torch_chunk": torch_chunk}
    if device == "cuda":
        import importlib.util

        import triton

        if fla_backward_broken(triton.__version__, torch.cuda.get_device_capability(), importlib.util.find_spec("tilelang") is not None):
            from headscope.kernels.gdn.fla_dqkwg import register_fla_backend

            register_fla_backend()
            print("  fla refuses its chunk_bwd_dqkwg kernel here (Hopper, Triton in [3.4, 3.7.1), fla #640): fla_chunk's"
                  " backward runs with headscope's torch chunk_bwd_dqkwg, as the dispatcher's does", flush=True)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        impls["fla_chunk"] = lambda *a, **kw: chunk_gated_delta_rule(
            q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4], use_qk_l2norm_in_kernel=False, **kw)
    shapes = [(2, 70, 2, 16, torch.float32)] if tiny else [
        (2, 300, 4, 64, torch.float32), (2, 1000, 4, 128, torch.bfloat16), (1, 1024, 14, 128, torch.bfloat16)]
    for seed, (batch, length, heads, dim, dtype) in enumerate(shapes):
        case = f"B{batch} T{length} H{heads} D{dim} {str(dtype)[6:]}"
        try:
            inputs = gdn_inputs(batch, length, heads, dim, dtype, device, seed)
            gen = torch.Generator(device="cpu").manual_seed(100 + seed)
            do = torch.randn(batch, length, heads, dim, generator=gen).to(device)
            dht = torch.randn(batch, heads, dim, dim, generator=gen).to(device)
            ref_inputs = [x.float() for x in inputs]  # same rounded values, float32 math
            o_ref, s_ref, g_ref = grads_of(naive_recurrent_gated_delta_rule, ref_inputs, do, dht)
            for name, fn in impls.items():
                if name == "torch_chunk" and length > 1000:
                    continue  # exact in float32 (CPU tests); skip the big shape to save time
                o, s, grads = grads_of(fn, inputs, do, dht)
                record("gdn", f"{name} {case}", "o", rel(o, o_ref))
                record("gdn", f"{name} {case}", "state", rel(s, s_ref))
                for quantity, got, want in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, g_ref):
                    record("gdn", f"{name} {case}", quantity, rel(got, want))
            del o_ref, s_ref, g_ref
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception:
            FAILURES.append(f"gdn {case}")
            traceback.print_exc()

    # decode: prefill with the dispatcher, then T == 1 steps (fused_recurrent on CUDA) vs the full reference
    for seed, (batch, heads, dim, dtype) in enumerate([(2, 2, 16, torch.float32)] if tiny else
                                                      [(4, 14, 128, torch.bfloat16), (32, 14, 128, torch.float32)]):
        prefill, steps = (40, 4) if tiny else (500, 8)
        case = f"decode B{batch} H{heads} D{dim} {str(dtype)[6:]} {prefill}+{steps}"
        try:
            q, k, v, g, beta, h0 = gdn_inputs(batch, prefill + steps, heads, dim, dtype, device, 50 + seed)
            o_ref, s_ref = naive_recurrent_gated_delta_rule(
                q.float(), k.float(), v.float(), g, beta.float(), initial_state=h0, output_final_state=True)
            with torch.no_grad():
                sl = slice(0, prefill)
                o_pre, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                                initial_state=h0, output_final_state=True)
                outs = [o_pre]
                for t in range(prefill, prefill + steps):
                    sl = slice(t, t + 1)
                    o_t, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                                  initial_state=state, output_final_state=True)
                    outs.append(o_t)
            record("gdn", case, "o", rel(torch.cat(outs, 1)[:, prefill:], o_ref[:, prefill:]))
            record("gdn", case, "state", rel(state, s_ref))
            if device == "cuda":
                o_fr, s_fr = fused_recurrent_gated_delta_rule(
                    q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                    use_qk_l2norm_in_kernel=False)
                record("gdn", f"fused_recurrent full {case}", "o", rel(o_fr, o_ref))
                record("gdn", f"fused_recurrent full {case}", "state", rel(s_fr, s_ref))
        except Exception:
            FAILURES.append(f"gdn {case}")
            traceback.print_exc()

    case = "dispatch T==1 with grads (chunk path)"
    try:
        inputs = gdn_inputs(3, 1, 4, 64, torch.float32, device, 77)
        do = torch.randn(3, 1, 4, 64, device=device)
        dht = torch.randn(3, 4, 64, 64, device=device)
        _, _, want = grads_of(naive_recurrent_gated_delta_rule, inputs, do, dht)
        _, _, got = grads_of(gated_delta_rule, inputs, do, dht)
        for quantity, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got, want):
            record("gdn", case, quantity, rel(a, b))
    except Exception:
        FAILURES.append(f"gdn {case}")
        traceback.print_exc()


def epilogue_inputs(batch, length, heads, dim, n_gated, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    o = (torch.randn(batch, length, heads, dim, generator=gen) * 2).to(device, dtype)
    gamma = (torch.rand(heads, generator=gen) + 0.5).to(device)
    gate = torch.randn(batch, length, n_gated, dim, generator=gen).to(device, dtype) if n_gated else None
    return o, gamma, gate


def section_epilogue_correctness(device: str, tiny: bool) -> None:
    print("\n[b] Triton epilogue vs float32 reference (fwd + bwd)", flush=True)
    from headscope.kernels.epilogue.triton_epilogue import triton_head_epilogue

    cases = [(2, 5, 5, 24, 2, torch.float32), (1, 3, 20, 128, 17, torch.bfloat16)] if tiny else [
        (2, 37, 16, 128, 2, torch.float32), (2, 37, 16, 128, 2, torch.bfloat16), (1, 513, 14, 64, 3, torch.bfloat16),
        (3, 100, 16, 128, 0, torch.bfloat16), (2, 64, 16, 128, 16, torch.float16), (1, 4096, 24, 96, 5, torch.bfloat16)]
    for seed, (batch, length, heads, dim, n_gated, dtype) in enumerate(cases):
        case = f"B{batch} T{length} H{heads} D{dim} Hg{n_gated} {str(dtype)[6:]}"
        try:
            o, gamma, gate = epilogue_inputs(batch, length, heads, dim, n_gated, dtype, device, seed)
            dy = torch.randn_like(o)
            leaves = [o.requires_grad_(), gamma.requires_grad_()] + ([gate.requires_grad_()] if n_gated else [])
            y = triton_head_epilogue(o, gamma, gate)
            got = torch.autograd.grad(y, leaves, dy)
            ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
            y_ref = head_epilogue_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if n_gated else None)
            want = torch.autograd.grad(y_ref, ref_leaves, dy.float())
            tol = 1e-5 if dtype == torch.float32 else 0.008
            record("epilogue", case, "y", rel(y, y_ref), tol)
            for quantity, a, b in zip(("do", "dgamma", "dgate"), got, want):
                record("epilogue", case, quantity, rel(a, b), tol)
        except Exception:
            FAILURES.append(f"epilogue {case}")
            traceback.print_exc()


def timed_ms(fn, device: str, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def section_epilogue_timing(device: str, tiny: bool) -> None:
    print("\n[c] Epilogue timing: fused Triton vs unfused torch reference", flush=True)
    from headscope.kernels.epilogue.triton_epilogue import triton_head_epilogue

    impls = {"triton": triton_head_epilogue, "torch_reference": head_epilogue_reference}
    if device == "cuda" and not tiny:
        impls["torch_compile_reference"] = torch.compile(head_epilogue_reference, dynamic=False)
    configs = [("prefill", 1, 64, 16, 32, 2, True), ("decode", 4, 1, 16, 32, 2, False)] if tiny else [
        ("prefill", 1, 131072, 16, 128, 2, True), ("decode", 32, 1, 16, 128, 2, False)]
    for label, batch, length, heads, dim, n_gated, with_backward in configs:
        o, gamma, gate = epilogue_inputs(batch, length, heads, dim, n_gated, torch.bfloat16, device, 0)
        dy = torch.randn_like(o)
        moved = (2 * o.numel() + gate.numel()) * o.element_size()  # read o + gate, write y
        for name, fn in impls.items():
            try:
                fwd = timed_ms(lambda: fn(o, gamma, gate), device, reps=5 if tiny else 50)
                row = dict(config=label, B=batch, T=length, H=heads, D=dim, Hg=n_gated, impl=name, fwd_ms=fwd,
                           fwd_GBps=moved / fwd / 1e6)
                if with_backward:
                    leaves = [o.detach().requires_grad_(), gamma.detach().requires_grad_(), gate.detach().requires_grad_()]
                    row["fwd_bwd_ms"] = timed_ms(
                        lambda: torch.autograd.grad(fn(*leaves), leaves, dy), device, reps=5 if tiny else 20)
                TIMINGS.append(row)
                print(f"  {label:<8} {name:<24} fwd {fwd:9.4f} ms ({row['fwd_GBps']:7.1f} GB/s)"
                      + (f"  fwd+bwd {row['fwd_bwd_ms']:9.4f} ms" if with_backward else ""), flush=True)
            except Exception:
                FAILURES.append(f"timing {label} {name}")
                traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()


def rope_inputs(batch, length, heads, dim, dtype, device, seed, cos_batch=1):
    """x as the layer's k: a view of the short-conv output (B, T, 3*H*D); HF rotary (cos, sin) (cos_batch, T, D)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mixed = torch.randn(batch, length, 3 * heads * dim, generator=gen).to(device, dtype)
    x = mixed.view(batch, length, 3, heads, dim).unbind(2)[1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device).float() / dim)
    angle = torch.arange(length, device=device).float()[:, None] * inv_freq
    angle = torch.cat((angle, angle), dim=-1).expand(cos_batch, length, dim)
    return x, angle.cos().to(dtype), angle.sin().to(dtype)


def section_rope_norm(device: str, tiny: bool) -> None:
    print("\n[d] RoPE + L2 norm: fused Triton vs float32 torch composition; timing", flush=True)
    from headscope.kernels.rope_norm.ops import rope_l2norm, use_triton
    from headscope.kernels.rope_norm.triton_rope_norm import triton_rope_l2norm

    cases = [(2, 33, 3, 32, 1, torch.bfloat16), (1, 20, 20, 128, 1, torch.float32)] if tiny else [
        (1, 4096, 14, 128, 1, torch.bfloat16), (2, 1000, 14, 128, 2, torch.float32), (3, 257, 16, 64, 1, torch.float16)]
    for seed, (batch, length, heads, dim, cos_batch, dtype) in enumerate(cases):
        case = f"B{batch} T{length} H{heads} D{dim} cosB{cos_batch} {str(dtype)[6:]}"
        try:
            x, cos, sin = rope_inputs(batch, length, heads, dim, dtype, device, seed, cos_batch)
            fused = rope_l2norm if device == "cuda" else triton_rope_l2norm  # CPU: the kernel, interpreted
            if device == "cuda" and not use_triton(x, cos, sin):
                raise RuntimeError("the dispatcher would not take the Triton path on CUDA")
            x.requires_grad_()
            dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            y = fused(x, cos, sin)
            (dx,) = torch.autograd.grad(y, x, dy)
            x_ref = x.detach().float().requires_grad_()
            y_ref = rope_l2norm_reference(x_ref, cos.float(), sin.float())
            (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.float())
            tol = 1e-5 if dtype == torch.float32 else 0.008
            record("rope_norm", case, "y", rel(y, y_ref), tol)
            record("rope_norm", case, "dx", rel(dx, dx_ref), tol)
            with torch.no_grad():
                record("rope_norm", f"{case} former composition", "y", rel(rope_l2norm_reference(x, cos, sin), y_ref), tol)
        except Exception:
            FAILURES.append(f"rope_norm {case}")
            traceback.print_exc()

    batch, length, heads, dim = (1, 16, 2, 32) if tiny else (1, 131072, 14, 128)
    x, cos, sin = rope_inputs(batch, length, heads, dim, torch.bfloat16, device, 0)
    impls = {"triton": triton_rope_l2norm, "torch_reference": rope_l2norm_reference}
    if device == "cuda" and not tiny:
        impls["torch_compile_reference"] = torch.compile(rope_l2norm_reference, dynamic=False)
    moved = (2 * x.numel() + 2 * cos.numel()) * x.element_size()  # fused minimum: read x, cos, sin; write y
    dy = torch.randn(x.shape, device=device, dtype=x.dtype)
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                fwd = timed_ms(lambda: fn(x, cos, sin), device, reps=5 if tiny else 50)
            leaf = x.detach().requires_grad_()
            fwd_bwd = timed_ms(lambda: torch.autograd.grad(fn(leaf, cos, sin), leaf, dy), device, reps=3 if tiny else 20)
            row = dict(config="rope_norm prefill", B=batch, T=length, H=heads, D=dim, impl=name, fwd_ms=fwd,
                       fwd_GBps=moved / fwd / 1e6, fwd_bwd_ms=fwd_bwd)
            TIMINGS.append(row)
            print(f"  rope_norm {name:<24} fwd {fwd:9.4f} ms ({row['fwd_GBps']:7.1f} GB/s)  fwd+bwd {fwd_bwd:9.4f} ms", flush=True)
        except Exception:
            FAILURES.append(f"timing rope_norm {name}")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()


def section_gdn_prep(device: str, tiny: bool) -> None:
    from gdn_prep_check import section_gdn_prep as run  # benchmarks/gdn_prep_check.py (sys.path[0])

    run(device, tiny, sys.modules[__name__])


def write_results(out_dir: Path, meta: dict) -> None:
    from headscope.heads import write_json_atomic, write_text_atomic

    payload = dict(meta=meta, errors=ROWS, timings=TIMINGS, failed_sections=FAILURES,
                   all_ok=not FAILURES and all(r["ok"] for r in ROWS))
    write_json_atomic(out_dir / "gpu_kernel_check.json", payload)
    lines = [f"# gpu_kernel_check ({meta.get('device')})", "", "| section | case | quantity | rel RMS | tol | ok |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['case']} | {r['quantity']} | {r['rel_rms']:.3e} | {r['tol']:g} | {r['ok']} |" for r in ROWS]
    lines += ["", "| config | impl | fwd ms | fwd GB/s | fwd+bwd ms |", "|---|---|---|---|---|"]
    lines += [f"| {t['config']} B{t['B']} T{t['T']} H{t['H']} D{t['D']}{' Hg' + str(t['Hg']) if 'Hg' in t else ''} | "
              f"{t['impl']} | {t['fwd_ms']:.4f} | "
              f"{t['fwd_GBps']:.1f} | {t.get('fwd_bwd_ms', float('nan')):.4f} |" for t in TIMINGS]
    lines += ["", f"failed sections: {FAILURES or 'none'}; all ok: {payload['all_ok']}"]
    write_text_atomic(out_dir / "gpu_kernel_check.md", "\n".join(lines) + "\n")
    print(f"\nwrote {out_dir / 'gpu_kernel_check.json'}; all ok: {payload['all_ok']}; failed sections: {FAILURES or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes; runs on CPU (set TRITON_INTERPRET=1)")
    parser.add_argument("--sections", default="gdn,epilogue,timing,rope_norm,gdn_prep",
                        help="comma-separated subset of: gdn (a), epilogue (b), timing (c), rope_norm (d), gdn_prep (e)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: run on a GPU box, or use --tiny with TRITON_INTERPRET=1 for a CPU smoke test")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references must be float32
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, tiny=args.tiny)
    for module in ("triton", "fla"):
        try:
            meta[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            meta[module] = f"unavailable: {exc}"
    print(json.dumps(meta), flush=True)
    sections = {"gdn": section_gdn, "epilogue": section_epilogue_correctness, "timing": section_epilogue_timing,
                "rope_norm": section_rope_norm, "gdn_prep": section_gdn_prep}
    unknown = set(args.sections.split(",")) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(sections)}")
    meta["sections"] = args.sections
    for section in (sections[name] for name in args.sections.split(",")):
        try:
            section(device, args.tiny)
        except Exception:
            FAILURES.append(section.__name__)
            traceback.print_exc()
    write_results(Path(os.environ.get("OUT", Path(__file__).parent / "results")), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
