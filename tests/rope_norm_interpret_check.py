"""Helper run by tests/test_kernels_rope_norm.py in a subprocess with TRITON_INTERPRET=1.

Runs the Triton RoPE + L2 norm (forward and backward) on CPU through the interpreter on tiny shapes and
prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are ``{name, dtype, errors: {y,
y_inference, dx, composition}, ...}``.

Every error is the relative RMS error against the torch composition run in float32 on the same
(dtype-rounded) inputs; ``composition`` is that of the composition run in the case's own dtype (the
layer's former path), for comparison.
"""

from __future__ import annotations

import torch

from triton_interpreter import print_report  # same directory (sys.path[0] of this script)

# name, (B, T, H, D), x layout, cos/sin kind, cos batch (1 = broadcast), input scale
CASES = [
    ("layer_view_D128", (2, 5, 3, 128), "conv_view", "rotary", 2, 2.0),
    ("broadcast_cos_D64", (3, 7, 5, 64), "contiguous", "random", 1, 1.0),
    ("two_head_blocks_D128", (1, 3, 20, 128), "contiguous", "random", 1, 1.0),
    ("odd_half_D24_tiny_scale", (2, 3, 4, 24), "contiguous", "random", 2, 1e-3),
    ("cpu_conv_layout_D32", (2, 9, 3, 32), "transposed_view", "random", 2, 1.0),
]


def make_x(shape, layout, gen, scale, dtype):
    """x in the case's memory layout, in ``dtype`` (views of a bigger tensor, as the layer's q/k are)."""
    batch, length, heads, dim = shape
    if layout == "contiguous":
        x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    elif layout == "conv_view":  # CUDA layer: mixed (B, T, 3*H*D) contiguous -> view -> unbind, take k
        mixed = (torch.randn(batch, length, 3 * heads * dim, generator=gen) * scale).to(dtype)
        x = mixed.view(batch, length, 3, heads, dim).unbind(2)[1]
    else:  # CPU short_conv_reference: (B, C, T).transpose(1, 2) -> view -> unbind: last-dim stride T
        wide = (torch.randn(batch, 3 * heads * dim, length, generator=gen) * scale).to(dtype).transpose(1, 2)
        x = wide.view(batch, length, 3, heads, dim).unbind(2)[0]
    x[0, -1, 0] = 0.0  # an all-zero row: must come out zero, not NaN
    return x


def make_tables(batch, length, dim, kind, gen):
    """(cos, sin) of shape (batch, T, D): HF rotary tables, or random values (halves differ)."""
    if kind == "rotary":
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
        angle = (torch.arange(length).float()[:, None] + 100.0) * inv_freq  # (T, D/2)
        angle = torch.cat((angle, angle), dim=-1).expand(batch, length, dim)
        return angle.cos(), angle.sin()
    return torch.randn(batch, length, dim, generator=gen), torch.randn(batch, length, dim, generator=gen)


def run_case(shape, layout, kind, cos_batch, scale, dtype, table_dtype, seed):
    from headscope.kernels.metrics import relative_rms_error as rel
    from headscope.kernels.rope_norm.naive import rope_l2norm_reference
    from headscope.kernels.rope_norm.triton_rope_norm import triton_rope_l2norm

    gen = torch.Generator().manual_seed(seed)
    x = make_x(shape, layout, gen, scale, dtype)
    strides = list(x.stride())
    cos, sin = (t.to(table_dtype) for t in make_tables(cos_batch, shape[1], shape[3], kind, gen))
    dy = torch.randn(shape, generator=gen).to(torch.promote_types(dtype, table_dtype))
    x.requires_grad_()
    y = triton_rope_l2norm(x, cos, sin)
    (dx,) = torch.autograd.grad(y, x, dy)
    with torch.no_grad():  # inference path: no saved rstd
        y_inference = triton_rope_l2norm(x, cos, sin)
    x_ref = x.detach().float().requires_grad_()
    y_ref = rope_l2norm_reference(x_ref, cos.float(), sin.float())
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.float())
    with torch.no_grad():
        composition = rope_l2norm_reference(x, cos, sin)
    errors = {"y": rel(y, y_ref), "y_inference": rel(y_inference, y_ref), "dx": rel(dx, dx_ref),
              "composition": rel(composition, y_ref)}
    return {
        "errors": errors,
        "dtypes_ok": y.dtype == composition.dtype and dx.dtype == dtype and y.is_contiguous(),
        "zero_row_ok": bool((y_inference[0, -1, 0] == 0).all()),
        "x_strides": strides,
    }


def run_cases() -> list[dict]:
    cases = []
    for seed, (name, shape, layout, kind, cos_batch, scale) in enumerate(CASES):
        for dtype in (torch.float32, torch.bfloat16):
            result = run_case(shape, layout, kind, cos_batch, scale, dtype, dtype, seed)
            cases.append({"name": name, "dtype": str(dtype).removeprefix("torch."), **result})
    # bf16 x with float32 tables: the composition promotes to float32, so must the kernel
    result = run_case((2, 5, 3, 64), "conv_view", "rotary", 2, 1.0, torch.bfloat16, torch.float32, 99)
    cases.append({"name": "bf16_x_float32_tables", "dtype": "bfloat16", **result})
    return cases


if __name__ == "__main__":
    print_report(run_cases)
