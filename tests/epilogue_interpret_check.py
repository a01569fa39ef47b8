"""Helper run by tests/test_kernels_epilogue.py in a subprocess with TRITON_INTERPRET=1.

Runs the Triton epilogue (forward and backward) on CPU through the interpreter on tiny shapes and prints
one JSON line (see ``tests/triton_interpreter.py``) whose cases are ``{name, dtype, errors: {y, y_inference,
y_pair, do, dgamma, dgate}}``. ``y_pair`` is the inference path given o as two parts, as the hybrid layer
passes its FA and GDN outputs: the first a transposed ``(B, H1, T, D)`` tensor (an SDPA result), the second
a slice of a wider tensor; both are read in place.
"""

from __future__ import annotations

import torch

from triton_interpreter import print_report  # same directory (sys.path[0] of this script)

CASES = [  # name, (B, T, H, D), Hg, gate sliced from a wider tensor (non-contiguous), H1 (heads of the pair's first part)
    ("odd_heads_odd_dim", (2, 3, 5, 24), 2, False, 2),
    ("two_head_blocks_gate_straddles", (1, 2, 20, 128), 17, True, 18),
    ("no_gate", (2, 2, 3, 16), 0, False, 1),
    ("all_heads_gated", (3, 1, 4, 32), 4, False, 3),
]


def as_pair(o: torch.Tensor, n_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o's heads ``[0, n_first)`` as a transposed (B, H1, T, D) tensor and the rest as a slice of a wider one."""
    first = o[:, :, :n_first].transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.full((*o.shape[:2], o.shape[2] - n_first + 1, o.shape[3]), float("nan"), dtype=o.dtype)
    wide[:, :, 1:] = o[:, :, n_first:]
    return first, wide[:, :, 1:]


def run_case(shape, n_gated, strided_gate, n_first, dtype, seed):
    from headscope.kernels.epilogue.naive import head_epilogue_reference
    from headscope.kernels.epilogue.triton_epilogue import triton_head_epilogue
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    batch, length, n_heads, head_dim = shape
    o = (torch.randn(shape, generator=gen) * 3).to(dtype)
    gamma = torch.rand(n_heads, generator=gen) + 0.5
    gate = None
    if n_gated:
        wide = torch.randn(batch, length, n_gated, 2 * head_dim if strided_gate else head_dim, generator=gen)
        gate = wide[..., :head_dim].to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    leaves = [o.requires_grad_(), gamma.requires_grad_()] + ([gate.requires_grad_()] if n_gated else [])
    y = triton_head_epilogue(o, gamma, gate)
    grads = torch.autograd.grad(y, leaves, dy)
    with torch.no_grad():  # inference path: no saved rstd, one launch, o whole or in two parts
        y_inference = triton_head_epilogue(o, gamma, gate)
        y_pair = triton_head_epilogue(as_pair(o.detach(), n_first), gamma, gate)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    y_ref = head_epilogue_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if n_gated else None)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.float())
    errors = {"y": rel(y, y_ref), "y_inference": rel(y_inference, y_ref), "y_pair": rel(y_pair, y_ref)}
    errors.update({name: rel(a, b) for name, a, b in zip(("do", "dgamma", "dgate"), grads, ref_grads)})
    dtypes_ok = y.dtype == y_pair.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == gamma.dtype
    return {"errors": errors, "dtypes_ok": dtypes_ok}


def run_cases() -> list[dict]:
    cases = []
    for seed, (name, shape, n_gated, strided_gate, n_first) in enumerate(CASES):
        for dtype in (torch.float32, torch.bfloat16):
            result = run_case(shape, n_gated, strided_gate, n_first, dtype, seed)
            cases.append({"name": name, "dtype": str(dtype).removeprefix("torch."), **result})
    return cases


if __name__ == "__main__":
    print_report(run_cases)
