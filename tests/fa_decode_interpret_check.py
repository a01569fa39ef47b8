"""Helper run by tests/test_kernels_fa_decode.py in a subprocess with TRITON_INTERPRET=1.

Runs the split-K decode attention on CPU through the interpreter and prints one JSON line (see
``tests/triton_interpreter.py``) whose cases are ``{name, dtype, error, cache_written, others_untouched}``:
the relative RMS error of the output against the float32 reference (same dtype-rounded inputs), whether
slot ``seen`` of both caches holds the new token (exactly; with RoPE in the kernel, the reference's rotated
key to the cache dtype's rounding) and whether every other slot is unchanged. The
output goes into a NaN-filled strided buffer, so an element the kernel does not write is an infinite error.
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, loops_over_runtime_bounds, print_report  # same directory (sys.path[0] of this script)

# name, B, FA query heads per KV head, D, slots L, seen, log scaling, sliding window, splits (None = default),
# RoPE in the kernel (None; "rows": cos/sin (B, D) sliced from (B, T, D) as the layer passes them; "broadcast": (1, D)),
# the hybrid layer's epilogue in the combine kernel (None; "gamma": a scale per head over its RMS; "gate": and the gate)
CASES = [
    ("gqa_two_heads_one_kv", 2, (2,), 32, 150, 97, True, None, 3, None, None),
    ("uneven_groups_padding", 3, (1, 3, 3), 24, 80, 64, False, None, 2, None, None),
    ("first_token_empty_cache", 2, (2, 2), 16, 64, 0, True, None, 4, None, None),
    ("sliding_window", 1, (1, 1), 32, 200, 150, False, 40, 5, None, None),
    ("one_split_default", 2, (4,), 16, 40, 39, True, None, None, None, None),
    ("rope_rows_log_scaling", 3, (1, 2), 24, 90, 70, True, None, 3, "rows", None),
    ("rope_broadcast_window", 2, (2,), 32, 120, 100, False, 50, 2, "broadcast", None),
    ("epilogue_gamma", 2, (1, 3), 24, 90, 70, True, None, 3, None, "gamma"),
    ("epilogue_gamma_gate", 3, (2,), 32, 120, 100, False, None, 2, "rows", "gate"),
]


def run_case(batch, groups, dim, length, seen, log_scaling, window, splits, rope, epilogue, dtype, seed):
    from headscope.kernels.epilogue.naive import head_epilogue_reference
    from headscope.kernels.fa_decode.naive import decode_attention_reference
    from headscope.kernels.fa_decode.triton_fa_decode import triton_decode_attention
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    n_kv, n_q = len(groups), sum(groups)
    offsets = tuple(int(x) for x in torch.tensor((0,) + groups).cumsum(0))
    q = torch.randn(batch, 1, n_q + 1, dim, generator=gen).to(dtype)[:, :, 1:]  # a slice, as the layer passes
    k_new, v_new = (torch.randn(batch, 1, n_kv, dim, generator=gen).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, n_kv, length, dim, generator=gen).to(dtype) for _ in range(2))
    valid = (torch.rand(batch, length, generator=gen) > 0.25).to(torch.int8)
    seen_t = torch.tensor([seen])
    positions = torch.randint(0, 40000, (batch, 2), generator=gen)[:, 1] if log_scaling else None  # strided, as a slice of (B, T)
    rotary = None
    if rope is not None:  # HF rotary tables of random positions, in the model dtype, (B, T=3, D) sliced at the last step
        angles = torch.randint(0, 5000, (batch if rope == "rows" else 1, 3, 1), generator=gen) * torch.rand(dim // 2, generator=gen)
        angles = torch.cat((angles, angles), dim=-1)
        rotary = (angles.cos().to(dtype)[:, -1], angles.sin().to(dtype)[:, -1])
    kwargs = dict(scale=dim**-0.5, positions=positions, attn_scale=0.1, floor_scale=8192.0, sliding_window=window, rope=rotary)
    k_ref, v_ref = k_cache.float().clone(), v_cache.float().clone()  # own copies (float() of float32 is no copy)
    want = decode_attention_reference(q.float(), k_new.float(), v_new.float(), k_ref, v_ref, valid, seen_t, offsets, **kwargs)
    gamma = torch.rand(n_q, generator=gen) + 0.5 if epilogue else None  # a scale per head: a wrong head index shows
    gate = torch.randn(batch, 1, n_q, 2 * dim, generator=gen).to(dtype)[..., dim:] if epilogue == "gate" else None  # strided
    if epilogue:  # the epilogue reads the output as stored, in the model dtype
        want = head_epilogue_reference(want.to(dtype).float(), gamma, gate.float() if gate is not None else None)
    out = torch.full((batch, 1, n_q, 2 * dim), float("nan"), dtype=dtype)[..., :dim]
    before = k_cache.clone(), v_cache.clone()
    got = triton_decode_attention(
        q, k_new, v_new, k_cache, v_cache, valid, seen_t, torch.tensor(offsets, dtype=torch.int32),
        max_group=max(groups), out=out, splits=splits, gamma=gamma, gate=gate, **kwargs,
    )
    others = torch.ones(length, dtype=torch.bool)
    others[seen] = False
    # the new key as the reference wrote it (rotated in float32 with rope), rounded to the cache's dtype
    key_written = torch.equal(k_cache[:, :, seen], k_ref[:, :, seen].to(dtype)) if rope is None else \
        torch.allclose(k_cache[:, :, seen].float(), k_ref[:, :, seen], rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)
    return {
        "error": rel(got, want),
        "wrote_into_out": got.data_ptr() == out.data_ptr(),
        "cache_written": key_written and torch.equal(v_cache[:, :, seen], v_new[:, 0]),
        "others_untouched": torch.equal(k_cache[:, :, others], before[0][:, :, others]) and torch.equal(v_cache[:, :, others], before[1][:, :, others]),
    }


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case), needs=loops_over_runtime_bounds)
