"""Helper run by tests/test_kernels_gdn_decode.py in a subprocess with TRITON_INTERPRET=1.

Runs the fused GDN decode step on CPU through the interpreter and prints one JSON line (see
``tests/triton_interpreter.py``) whose cases are ``{name, dtype, errors: {o, state, conv_state}}``: relative
RMS errors against the float32 reference run on the same dtype-rounded inputs (each on its own copy of
the states). q, k, v are slices of wider projection rows and the output goes into a NaN-filled strided
buffer, so an element the kernel does not write is an infinite error. The epilogue cases also scale each
head by its ``gamma`` over its RMS in the kernel (``head_epilogue_reference`` of the reference's output).
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, B, H, D, conv width K, hidden, with padding mask, cos batch, value block, the fused epilogue (gamma per head)
CASES = [
    ("qwen_like_blocks", 2, 3, 32, 4, 48, False, 1, 8, False),
    ("padding_mask_odd_width", 3, 2, 16, 3, 40, True, 3, 32, False),
    ("dim_not_power_of_two", 2, 2, 24, 4, 24, True, 1, 16, False),
    ("epilogue_over_four_value_blocks", 2, 3, 32, 4, 48, True, 1, 8, True),
    ("epilogue_partial_last_block", 3, 2, 24, 3, 40, False, 3, 16, True),
]


def run_case(batch, heads, dim, width, hidden, with_mask, cos_batch, block_v, norm, dtype, seed):
    from headscope.kernels.epilogue.naive import head_epilogue_reference
    from headscope.kernels.gdn_decode.naive import gdn_decode_reference
    from headscope.kernels.gdn_decode.triton_gdn_decode import triton_gdn_decode
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, 1, heads + 1, 3 * dim, generator=gen).to(dtype)
    q, k, v = wide[:, :, 1:, :dim], wide[:, :, :-1, dim : 2 * dim], wide[:, :, 1:, 2 * dim :]
    x = torch.randn(batch, 1, hidden, generator=gen).to(dtype)[:, 0]
    conv_weight = (torch.randn(3 * heads * dim, 1, width, generator=gen) * 0.7).to(dtype)[:, 0]
    conv_state = torch.randn(batch, 3 * heads * dim, width, generator=gen).to(dtype)
    cos, sin = (torch.randn(cos_batch, 1, dim, generator=gen).to(dtype) for _ in range(2))
    b_weight, a_weight = (torch.randn(heads, hidden, generator=gen).mul(0.2).to(dtype) for _ in range(2))
    A_log, dt_bias = torch.rand(heads, generator=gen).log(), torch.randn(heads, generator=gen)
    state = torch.randn(batch, heads, dim, dim, generator=gen) * 0.3
    mask = torch.tensor([1, 0, 1][:batch]) if with_mask else None
    params = (cos, sin, b_weight, a_weight, A_log, dt_bias)
    as_float = lambda t: t.float()  # noqa: E731
    conv_ref, state_ref = conv_state.float().clone(), state.clone()  # own copies (float() of float32 is no copy)
    want = gdn_decode_reference(*map(as_float, (x, q, k, v, conv_weight)), conv_ref, *map(as_float, params), state_ref, mask, scale=dim**-0.5)
    gamma = torch.rand(heads, generator=gen) + 0.5 if norm else None  # a scale per head: a wrong head index shows
    if norm:  # the epilogue reads the output as stored, in the model dtype
        want = head_epilogue_reference(want.to(dtype).float(), gamma)
    out = torch.full((batch, 1, heads, 2 * dim), float("nan"), dtype=dtype)[..., dim:]
    got = triton_gdn_decode(x, q, k, v, conv_weight, conv_state, *params, state, mask, scale=dim**-0.5, out=out, block_v=block_v, gamma=gamma)
    return {
        "errors": {"o": rel(got, want), "state": rel(state, state_ref), "conv_state": rel(conv_state, conv_ref)},
        "wrote_into_out": got.data_ptr() == out.data_ptr(),
    }


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case), needs=loops_over_runtime_bounds)
