"""Helper run by tests/test_kernels_rms_norm.py in a subprocess with TRITON_INTERPRET=1.

Runs the one-launch residual add + RMSNorm kernel (``kernels/rms_norm/triton_rms_norm.py``) on CPU through
the interpreter and prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are
``{name, dtype, error, sum_error}``: the relative RMS error of the normalised rows against the float32
reference on the sum as the kernel stored it, and the largest relative difference of that stored sum from
torch's ``residual + x`` in the dtype (0 in float32; in bf16 at most one unit in the last place, 2^-7 at
worst, as the interpreter truncates where the GPU rounds to nearest).
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, print_report  # same directory (sys.path[0] of this script)

# name, leading shape, H, with a residual, x a strided view
CASES = [
    ("decode_step_rows", (3, 1), 64, True, False),
    ("prefill_several_rows_per_program", (2, 7), 48, True, True),  # H not a power of two; rows of a wider tensor
    ("no_residual_input_norm", (1, 5), 32, False, False),
    ("one_row_per_program", (2, 2), 4096, True, False),  # a 4096 hidden size: one row per program, 8 warps
]


def run_case(lead, hidden, with_residual, strided, dtype, seed):
    from headscope.kernels.metrics import relative_rms_error as rel
    from headscope.kernels.rms_norm.naive import add_rms_norm_reference
    from headscope.kernels.rms_norm.triton_rms_norm import triton_add_rms_norm

    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(*lead, 2 * hidden, generator=gen) * 3).to(dtype)
    x = wide[..., hidden:] if strided else wide[..., :hidden].contiguous()
    residual = (torch.randn(*lead, hidden, generator=gen) * 5).to(dtype) if with_residual else None
    weight = torch.rand(hidden, generator=gen).add(0.5).to(dtype)
    out, total = triton_add_rms_norm(x, residual, weight, 1e-6)
    want_total = x if residual is None else residual + x
    want, _ = add_rms_norm_reference(total.float(), None, weight.float(), 1e-6)
    sum_error = ((total.float() - want_total.float()).abs() / want_total.float().abs().clamp_min(1e-30)).max()
    return {"error": rel(out, want), "sum_error": float(sum_error)}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case))
