"""Helper run by tests/test_hybrid_static_cache.py in a subprocess with TRITON_INTERPRET=1.

The static-cache decode step as it runs on CUDA, on the CPU: ``kernels/fa_decode`` and ``kernels/gdn_decode``
are let through their ``use_triton`` checks (which ask for CUDA) so that every decode step of a tiny float32
hybrid runs their Triton kernels under the interpreter (a layer with both kinds of heads: ``kernels/hybrid_decode``,
both in one launch), with the layer's epilogue (gamma, the FA gate) inside
them, writing into the slices of the layer's one output. The same prompt, decode steps and later chunk run through
transformers' DynamicCache (the layer's own torch path and epilogue) give the reference logits. The kernel tests
check each kernel alone; this checks how the layer calls them (which heads, gamma and gate slices, the output
views, the caches written in place).

Cases (one JSON line, ``tests/triton_interpreter.py``): ``{name, max_abs_dlogit, steps, kernel_calls}``: the
largest |static - dynamic| logit over the prompt, every decode step and the chunk, the number of compared
outputs, and how many times each Triton step function ran (0 would mean the reference path ran instead).
"""

from __future__ import annotations

import torch

from triton_interpreter import loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, FA heads (layer, head) of the tiny Qwen3 (3 layers x 4 heads, 2 KV heads), with a random gate and gammas
CASES = [
    ("hybrid_full_and_pure_gdn_layers", [(0, 2), (1, 0), (1, 1), (1, 2), (1, 3)], True),
    ("two_fa_heads_of_one_kv_group_no_gate_weights", [(0, 0), (0, 1), (2, 3)], False),
]


def run_case(full_heads, perturb: bool, seed: int) -> dict:
    from transformers import DynamicCache

    import headscope.kernels.fa_decode.ops as fa_ops
    import headscope.kernels.fa_decode.triton_fa_decode as fa_triton
    import headscope.kernels.gdn_decode.ops as gdn_ops
    import headscope.kernels.gdn_decode.triton_gdn_decode as gdn_triton
    from headscope.hybrid.static_cache import HybridStaticCache
    from test_hybrid_static_cache import built, prompt, run

    model = built(full_heads)
    if perturb:  # gammas away from 1 and an input-dependent FA gate: a wrong head or slice shows in the logits
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                if hasattr(attn, "gamma"):
                    attn.gamma.copy_(torch.rand(attn.gamma.shape, generator=gen) + 0.5)
                if hasattr(attn, "gate_proj"):
                    attn.gate_proj.weight.copy_(torch.randn(attn.gate_proj.weight.shape, generator=gen) * 0.5)
    import headscope.kernels.hybrid_decode.triton_hybrid_decode as hybrid_triton

    calls = {"fa_decode": 0, "gdn_decode": 0, "hybrid_decode": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    ids, mask = prompt()
    dynamic = run(model, DynamicCache(config=model.config), ids, mask, steps=4)
    saved = (fa_ops.use_triton, gdn_ops.use_triton, fa_triton.triton_decode_attention, gdn_triton.triton_gdn_decode,
             hybrid_triton.triton_hybrid_decode)
    fa_ops.use_triton = gdn_ops.use_triton = lambda *tensors: not torch.is_grad_enabled()  # the CUDA choice, on the CPU
    fa_triton.triton_decode_attention = counted("fa_decode", saved[2])
    gdn_triton.triton_gdn_decode = counted("gdn_decode", saved[3])
    hybrid_triton.triton_hybrid_decode = counted("hybrid_decode", saved[4])
    try:
        static = run(model, HybridStaticCache(model, batch_size=ids.shape[0], max_length=20), ids, mask, steps=4)
    finally:
        (fa_ops.use_triton, gdn_ops.use_triton, fa_triton.triton_decode_attention, gdn_triton.triton_gdn_decode,
         hybrid_triton.triton_hybrid_decode) = saved
    diff = max((a - b).abs().max().item() for a, b in zip(dynamic, static))
    return {"max_abs_dlogit": diff, "steps": len(static), "kernel_calls": calls}


def run_cases() -> list[dict]:
    torch.set_num_threads(1)
    return [{"name": name, **run_case(heads, perturb, seed)} for seed, (name, heads, perturb) in enumerate(CASES)]


if __name__ == "__main__":
    print_report(run_cases, needs=loops_over_runtime_bounds)
