"""Helper run by tests/test_kernels_hybrid_decode.py in a subprocess with TRITON_INTERPRET=1.

One decode step of a hybrid layer's FA and GDN heads three times on the same inputs: through
``kernels/hybrid_decode`` (its two launches: GDN value-block or whole-head programs beside the FA splits, then the
FA combine and GDN finish programs), through the two kernels' own launches (``decode_attention`` then
``gdn_decode_step``, both on their Triton paths) and through the float32 reference. Prints one JSON line
(``tests/triton_interpreter.py``) whose cases are ``{name, dtype, fused_launches, same_as_two_launches,
errors, split_programs, value_blocks}``: how many ``triton_hybrid_decode`` calls ran (1), whether every output and
state equals the two launches' bit for bit (output, KV caches, conv window, recurrent state), and the relative
RMS errors against the reference. Both outputs go into slices of one NaN-filled per-head buffer, as the layer
passes them, so an element no program writes is an infinite error.
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, B, FA query heads per KV head, GDN heads, D, slots L, tokens seen, FA RoPE, log scaling, sliding window,
# epilogue (None; "gamma"; "gate": gamma and the FA gate), GDN padding mask. The split count is fa_decode's default on
# the CPU (2 units): 2 splits in case 1, 1 in the others.
# GDN programs: one per value block of 32 columns when there are two or more and B x H < 132 (cases 1 and 3: 2 and 3
# blocks, the last one partial at D = 80), else one per head (case 2: one block; case 4: 144 heads).
CASES = [
    ("qwen_like_gated_masked", 2, (2,), 3, 64, 300, 250, False, True, None, "gate", True),
    ("two_kv_groups_rope_window", 3, (1, 2), 2, 16, 130, 40, True, False, 20, None, False),
    ("one_row_first_token_gamma_partial_block", 1, (2,), 4, 80, 64, 0, True, True, None, "gamma", False),
    ("many_heads_whole_head_programs", 12, (1,), 12, 48, 64, 30, False, True, None, "gate", True),  # 144 heads >= 132 SMs
]


def make_step(batch, groups, n_gdn, dim, length, seen, rope, log_scaling, window, epilogue, masked, dtype, seed):
    """The keyword arguments of ``decode_attention`` and ``gdn_decode_step`` for one step, and the layer's
    per-head output ``(B, 1, n_fa + n_gdn, D)`` that both write slices of (the same for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)  # noqa: E731
    n_kv, n_fa, hidden, width = len(groups), sum(groups), 40, 4
    q = rand(batch, 1, n_fa + n_gdn, dim)  # FA heads first, as the layer's projections
    kv = rand(batch, 1, n_kv + n_gdn, 2 * dim)  # k and v as strided halves of one tensor
    k, v = kv[..., :dim], kv[..., dim:]
    angles = torch.randint(0, 5000, (batch, 1, 1), generator=gen) * torch.rand(dim // 2, generator=gen)
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))  # (B, 1, D)
    out = torch.full((batch, 1, n_fa + n_gdn, dim), float("nan"), dtype=dtype)
    offsets = tuple(int(x) for x in torch.tensor((0,) + groups).cumsum(0))
    attention = dict(
        q=q[:, :, :n_fa], k_new=k[:, :, :n_kv], v_new=v[:, :, :n_kv], k_cache=rand(batch, n_kv, length, dim),
        v_cache=rand(batch, n_kv, length, dim), valid=(torch.rand(batch, length, generator=gen) > 0.25).to(torch.int8),
        seen=torch.tensor([seen]), q_offsets=offsets, scale=dim**-0.5, attn_scale=0.1, floor_scale=8192.0, sliding_window=window,
        positions=torch.randint(0, 40000, (batch, 2), generator=gen)[:, 1] if log_scaling else None,
        rope=(cos[:, -1], sin[:, -1]) if rope else None, out=out[:, :, :n_fa],
        gamma=torch.rand(n_fa, generator=gen) + 0.5 if epilogue else None,
        gate=rand(batch, 1, n_fa, 2 * dim)[..., dim:] if epilogue == "gate" else None,
    )
    delta = dict(
        x=rand(batch, 1, hidden)[:, 0], q=q[:, :, n_fa:], k=k[:, :, n_kv:], v=v[:, :, n_kv:],
        conv_weight=rand(3 * n_gdn * dim, width, scale=0.7), conv_state=rand(batch, 3 * n_gdn * dim, width), cos=cos, sin=sin,
        b_weight=rand(n_gdn, hidden, scale=0.2), a_weight=rand(n_gdn, hidden, scale=0.2), A_log=torch.rand(n_gdn, generator=gen).log(),
        dt_bias=torch.randn(n_gdn, generator=gen), state=torch.randn(batch, n_gdn, dim, dim, generator=gen) * 0.3,
        step_mask=torch.tensor([1, 0, 1] * batch)[:batch] if masked else None, scale=dim**-0.5, out=out[:, :, n_fa:],
        gamma=torch.rand(n_gdn, generator=gen) + 0.5 if epilogue else None,
    )
    return attention, delta, out


STATES = (("k_cache", "attention"), ("v_cache", "attention"), ("conv_state", "delta"), ("state", "delta"))


def as_float(arguments: dict) -> dict:
    """The reference's inputs: floating tensors (and the RoPE tables) in float32, their own copies."""
    floats = lambda t: t.float().clone() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return {key: tuple(map(floats, value)) if isinstance(value, tuple) else floats(value) for key, value in arguments.items()}


def run_case(*args) -> dict:
    import headscope.kernels.fa_decode.ops as fa_ops
    import headscope.kernels.gdn_decode.ops as gdn_ops
    import headscope.kernels.hybrid_decode.triton_hybrid_decode as fused_module
    from headscope.kernels.hybrid_decode.naive import hybrid_decode_reference
    from headscope.kernels.hybrid_decode.ops import hybrid_decode_step
    from headscope.kernels.metrics import relative_rms_error as rel

    launches, split_grids = [], []
    fused, split_kernel = fused_module.triton_hybrid_decode, fused_module._hybrid_split_kernel

    class SplitSpy:  # the first launch as it is made: its grid and whether the GDN heads run in value blocks
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                split_grids.append((grid[0], kwargs["SPLIT_V"]))
                return split_kernel[grid](*args, **kwargs)
            return launch

    fused_module.triton_hybrid_decode = lambda *a: launches.append(1) or fused(*a)
    fused_module._hybrid_split_kernel = SplitSpy()
    saved = fa_ops.use_triton, gdn_ops.use_triton
    fa_ops.use_triton = gdn_ops.use_triton = lambda *tensors: True  # the CUDA choice, on the CPU
    try:
        one = dict(zip(("attention", "delta", "out"), make_step(*args)))
        hybrid_decode_step(one["attention"], one["delta"])
        two = dict(zip(("attention", "delta", "out"), make_step(*args)))
        fa_ops.decode_attention(**two["attention"])
        gdn_ops.gdn_decode_step(**two["delta"])
    finally:
        fused_module.triton_hybrid_decode, fused_module._hybrid_split_kernel = fused, split_kernel
        fa_ops.use_triton, gdn_ops.use_triton = saved
    ref = dict(zip(("attention", "delta", "out"), make_step(*args)))
    ref["attention"], ref["delta"] = as_float(ref["attention"]), as_float(ref["delta"])
    o_fa, o_gdn = hybrid_decode_reference(ref["attention"], ref["delta"])
    n_fa = o_fa.shape[2]
    same = torch.equal(one["out"], two["out"]) and all(torch.equal(one[side][name], two[side][name]) for name, side in STATES)
    errors = {"o_fa": rel(one["out"][:, :, :n_fa], o_fa), "o_gdn": rel(one["out"][:, :, n_fa:], o_gdn)}
    errors.update({name: rel(one[side][name], ref[side][name]) for name, side in STATES})
    (programs, split_v), = split_grids
    return {"fused_launches": len(launches), "split_programs": programs, "value_blocks": split_v, "same_as_two_launches": same,
            "errors": errors}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case), needs=loops_over_runtime_bounds)
