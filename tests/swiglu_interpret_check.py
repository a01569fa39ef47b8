"""Helper run by tests/test_kernels_swiglu.py in a subprocess with TRITON_INTERPRET=1.

Runs the one-launch ``silu(gate) * up`` kernel (``kernels/swiglu/triton_swiglu.py``) on CPU through the interpreter
and prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are ``{name, dtype, error}``: the relative
RMS error against the float32 reference on the same dtype-rounded inputs, whether both inputs were read without a
copy and whether the output is contiguous. gate and up are halves of one wider tensor in two cases (views, as the
fused gate/up projection gives).
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, print_report  # same directory (sys.path[0] of this script)

# name, leading shape, I, gate/up as views of one tensor
CASES = [
    ("decode_rows", (3, 1), 96, False),
    ("prefill_views_one_program_a_row", (2, 700), 24, True),  # halves of one (..., 2I) tensor, read in place
    ("wide_rows_several_programs", (3, 2), 4500, True),  # 3 programs a row, the last one partial
]


def run_case(lead, width, views, dtype, seed):
    from headscope.kernels.metrics import relative_rms_error as rel
    from headscope.kernels.swiglu.naive import swiglu_reference
    from headscope.kernels.swiglu.triton_swiglu import triton_swiglu

    gen = torch.Generator().manual_seed(seed)
    if views:
        both = (torch.randn(*lead, 2 * width, generator=gen) * 4).to(dtype)
        gate, up = both[..., :width], both[..., width:]
    else:
        gate, up = ((torch.randn(*lead, width, generator=gen) * 4).to(dtype) for _ in range(2))
    from headscope.kernels.swiglu.triton_swiglu import _rows

    got = triton_swiglu(gate, up)
    read_in_place = _rows(gate).data_ptr() == gate.data_ptr() and _rows(up).data_ptr() == up.data_ptr()
    return {"error": rel(got, swiglu_reference(gate.float(), up.float())), "read_in_place": read_in_place, "contiguous": got.is_contiguous()}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case))
