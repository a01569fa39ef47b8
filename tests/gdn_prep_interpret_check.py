"""Helper run by tests/test_kernels_gdn_prep.py in a subprocess with TRITON_INTERPRET=1.

Runs the fused Triton conv + SiLU + RoPE + L2 norm on CPU through the interpreter on tiny shapes and
prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are ``{name, dtype, errors: {q, k,
v, composition}, wrote_into_out, state_exact, strides}`` (``errors`` also has ``logits``, against ``x @ W.T`` in
float32, in the cases whose kernel stores the gate logits); ``state_exact``: the new conv state the kernel
stored (into a NaN-filled buffer, a strided view, or the old state itself) and ``next_conv_state`` both equal
the composition's, bit for bit.

Each case draws fresh random q/k/v (slices of wider tensors, as the layer's projections are), taps,
tables, conv state and mask, and has the kernel write into NaN-filled buffers, so an element it does
not write shows up as an infinite error. Errors are relative RMS against the torch composition run in
float32 on the same (dtype-rounded) inputs; ``composition`` is that of the composition run in the
case's own dtype (the former path), for comparison.
"""

from __future__ import annotations

import torch

from triton_interpreter import print_report  # same directory (sys.path[0] of this script)

# name, (B, T, H, D), conv width K, layout of q/k/v, with conv state, with padding mask, cos batch, tiling,
# where the kernel stores the new conv state: "new" (a NaN-filled contiguous buffer), "strided" (a NaN-filled
# channel-contiguous view), "in_place" (the conv state passed in itself, as the static cache's window) or
# "in_place_channels" (likewise, channel-contiguous: the layout the kernel reads, so only its clone keeps the old state),
# and whether the kernel also stores the gate logits x · Wᵀ of LOGIT_HIDDEN-wide rows (the stacked [a; b; zeros] weight)
CASES = [
    ("projection_slices", (2, 37, 3, 32), 4, "projection", False, False, 1, None, "new", False),
    ("slices_with_state", (2, 29, 2, 16), 4, "projection", True, False, 2, None, "in_place", False),
    ("state_and_mask_transposed", (2, 21, 3, 8), 4, "transposed", True, True, 2, None, "strided", False),
    ("decode_one_token", (3, 1, 3, 32), 4, "projection", True, False, 1, None, "in_place", False),
    ("two_tokens_into_state_masked", (2, 2, 2, 16), 4, "projection", True, True, 2, None, "in_place", False),
    ("two_tokens_channel_contiguous_alias", (2, 2, 2, 16), 4, "projection", True, False, 1, None, "in_place_channels", False),
    ("three_tokens_no_state", (2, 3, 2, 16), 4, "projection", False, False, 1, None, "new", False),
    ("small_blocks_heads_straddle", (1, 64, 3, 16), 4, "projection", True, False, 1, (4, 2), "strided", False),
    ("width_3_no_state_masked", (2, 19, 3, 8), 3, "contiguous", False, True, 1, None, "new", False),
    ("logits_projection_slices", (2, 37, 3, 32), 4, "projection", False, False, 1, None, "new", True),
    ("logits_short_chunk_state_mask", (2, 3, 2, 16), 4, "projection", True, True, 2, None, "in_place", True),
    ("logits_heads_straddle_small_blocks", (1, 64, 3, 16), 4, "projection", True, False, 1, (4, 2), "strided", True),
    ("logits_48_rows", (1, 19, 20, 8), 4, "contiguous", False, False, 1, None, "new", True),
]


def make_qkv(shape, layout, gen, dtype):
    """q, k, v ``(B, T, H, D)`` in the case's layout, random, rounded to ``dtype``.

    ``projection``: slices of wider per-token rows, as ``q_proj``/``k_proj`` outputs split into FA and
    GDN heads; ``transposed``: a last-dimension stride other than 1; ``contiguous``: plain tensors."""
    batch, length, heads, dim = shape
    if layout == "projection":
        wide = torch.randn(batch, length, heads + 2, 3 * dim, generator=gen).to(dtype)
        return wide[:, :, 1 : heads + 1, :dim], wide[:, :, :heads, dim : 2 * dim], wide[:, :, 2:, 2 * dim :]
    if layout == "transposed":
        wide = torch.randn(batch, length, heads, dim, 3, generator=gen).to(dtype)  # D stride 3
        return wide[..., 0], wide[..., 1], wide[..., 2]
    return tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(3))


LOGIT_HIDDEN = 136  # two of the kernel's 64-column steps and a masked third


def run_case(shape, width, layout, with_state, with_mask, cos_batch, tiling, state_mode, logits, dtype, seed):
    from headscope.kernels.gdn_prep.naive import short_conv_rope_l2norm_reference
    from headscope.kernels.gdn_prep.naive import next_conv_state
    from headscope.kernels.gdn_prep.triton_gdn_prep import Tiling, triton_short_conv_rope_l2norm
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    batch, length, heads, dim = shape
    q, k, v = make_qkv(shape, layout, gen, dtype)
    weight = (torch.randn(3 * heads * dim, width, generator=gen) * 0.7).to(dtype)
    cos, sin = (torch.randn(cos_batch, length, dim, generator=gen).to(dtype) for _ in range(2))
    state = torch.randn(batch, 3 * heads * dim, width, generator=gen).to(dtype) if with_state else None
    mask = None
    if with_mask:
        mask = (torch.rand(batch, length, generator=gen) > 0.3).long()
        mask[0, -1] = 0  # a padded last token: its input must not reach the outputs or the new state
    out = tuple(torch.full(shape, float("nan"), dtype=dtype) for _ in range(3))
    if state_mode == "in_place":
        state_out = state.clone()  # passed as the old state too (``state`` stays for the references)
    elif state_mode == "in_place_channels":
        state_out = state.transpose(1, 2).contiguous().transpose(1, 2)
    elif state_mode == "strided":
        state_out = torch.full((batch, width, 3 * heads * dim), float("nan"), dtype=dtype).transpose(1, 2)
    else:
        state_out = torch.full((batch, 3 * heads * dim, width), float("nan"), dtype=dtype)
    fused_logits = None
    if logits:  # x: rows of a wider tensor (row stride LOGIT_HIDDEN + 8); the output NaN-filled inside a NaN margin
        # (2 columns each side, one row after the last token) that must stay NaN
        from headscope.hybrid.inference_weights import stacked_logit_weight

        x = torch.randn(batch, length, LOGIT_HIDDEN + 8, generator=gen).to(dtype)[..., :LOGIT_HIDDEN]
        logit_weight = stacked_logit_weight(*(torch.randn(heads, LOGIT_HIDDEN, generator=gen).to(dtype) for _ in range(2)))
        margin = torch.full((batch, length + 1, logit_weight.shape[0] + 4), float("nan"), dtype=dtype)
        logits_out = margin[:, :length, 2 : 2 + logit_weight.shape[0]]
        fused_logits = (x, logit_weight, logits_out)
    got = triton_short_conv_rope_l2norm(
        q, k, v, weight, cos, sin, state_out if state_mode.startswith("in_place") else state, mask, out=out,
        tiling=Tiling(*tiling) if tiling else None, state_out=state_out, logits=fused_logits,
    )
    as_float = lambda t: t.float() if t is not None else None  # noqa: E731
    want = short_conv_rope_l2norm_reference(*map(as_float, (q, k, v, weight, cos, sin, state)), mask)
    composition = short_conv_rope_l2norm_reference(q, k, v, weight, cos, sin, state, mask)
    errors = {name: rel(a, b) for name, a, b in zip("qkv", got, want)}
    errors["composition"] = max(rel(a, b) for a, b in zip(composition, want[:3]))
    if logits:
        errors["logits"] = rel(logits_out, x.float() @ logit_weight.float().T)  # the padding rows' columns: zeros
        written = torch.zeros(margin.shape, dtype=torch.bool)
        written[:, :length, 2 : 2 + logit_weight.shape[0]] = True
        errors["logits_margin_written"] = float((~margin[~written].isnan()).sum())  # 0: nothing stored outside
    return {
        "errors": errors,
        "wrote_into_out": all(a is b for a, b in zip(got, out)),
        "state_exact": torch.equal(next_conv_state(q, k, v, width, state, mask), composition[3])
        and torch.equal(state_out, composition[3]),  # the kernel's store, bit for bit
        "strides": [list(t.stride()) for t in (q, k, v)],
    }


def run_cases() -> list[dict]:
    cases = []
    for seed, (name, *case) in enumerate(CASES):
        for dtype in (torch.float32, torch.bfloat16):
            result = run_case(*case, dtype, seed=100 * seed + len(cases))
            cases.append({"name": name, "dtype": str(dtype).removeprefix("torch."), **result})
    return cases


if __name__ == "__main__":
    print_report(run_cases)
