"""Decode attention against a static KV cache: the float32 reference is the layer's dynamic-cache attention
for one token, the CPU dispatcher is the reference, and the Triton kernels match it under TRITON_INTERPRET=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headscope.heads import HeadscopeError
from headscope.hybrid.functional import apply_rope, causal_attention, fa_segments, log_position_scale
from headscope.kernels.fa_decode.naive import decode_attention_reference
from headscope.kernels.fa_decode.ops import decode_attention
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("fa_decode_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-5, 0.015  # bf16: q and p rounded for the dots, the output rounded (truncated by the interpreter)


def random_step(batch=3, sizes=(1, 2, 2), dim=16, length=40, seen=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_kv, n_q = len(sizes), sum(sizes)
    q = torch.randn(batch, 1, n_q, dim, generator=gen)
    k_new, v_new = (torch.randn(batch, 1, n_kv, dim, generator=gen) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, n_kv, length, dim, generator=gen) for _ in range(2))
    valid = (torch.rand(batch, length, generator=gen) > 0.3).to(torch.int8)
    positions = torch.randint(0, 50, (batch,), generator=gen)
    return q, k_new, v_new, k_cache, v_cache, valid, torch.tensor([seen]), positions


@pytest.mark.parametrize("window", [None, 7])
def test_reference_is_the_layers_attention_over_a_grown_cache(window):
    sizes = (1, 2, 2)
    q, k_new, v_new, k_cache, v_cache, valid, seen, positions = random_step(sizes=sizes)
    n = int(seen)
    keys = torch.cat((k_cache[:, :, :n], k_new.transpose(1, 2)), dim=2)  # what DynamicCache.update returns
    values = torch.cat((v_cache[:, :, :n], v_new.transpose(1, 2)), dim=2)
    padding = torch.cat((valid[:, :n], torch.ones(valid.shape[0], 1, dtype=valid.dtype)), dim=1)
    scaled = q * log_position_scale(positions[:, None], 0.1, 4.0)[:, :, None, None]
    want = causal_attention(scaled, keys, values, fa_segments(sizes), scale=0.25, padding_mask=padding, sliding_window=window)
    offsets = (0, 1, 3, 5)
    got = decode_attention_reference(q, k_new, v_new, k_cache, v_cache, valid, seen, offsets, scale=0.25,
                                     positions=positions, attn_scale=0.1, floor_scale=4.0, sliding_window=window)
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(k_cache[:, :, n], k_new[:, 0]) and torch.equal(v_cache[:, :, n], v_new[:, 0])


def test_reference_rope_is_the_layers_rotary_applied_first():
    """``rope=(cos, sin)`` in the step equals ``apply_rope`` on q and the new key before it (float32), per
    row and broadcast from one row; the cache receives the rotated key."""
    q, k_new, v_new, k_cache, v_cache, valid, seen, positions = random_step(seed=3)
    gen = torch.Generator().manual_seed(4)
    for rows in (3, 1):
        angles = torch.rand(rows, 1, 8, generator=gen) * 100
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # (rows, T=1, D)
        caches = (k_cache.clone(), v_cache.clone())
        want = decode_attention_reference(apply_rope(q, cos, sin), apply_rope(k_new, cos, sin), v_new, *caches, valid, seen,
                                          (0, 1, 3, 5), scale=0.25, positions=positions)
        mine = (k_cache.clone(), v_cache.clone())
        got = decode_attention(q, k_new, v_new, *mine, valid, seen, (0, 1, 3, 5), scale=0.25, positions=positions,
                               rope=(cos[:, -1], sin[:, -1]))
        assert (got - want).abs().max().item() < 1e-5
        assert (mine[0] - caches[0]).abs().max().item() < 1e-5 and torch.equal(mine[1], caches[1])
    with pytest.raises(HeadscopeError, match="rope must be"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, valid, seen, (0, 1, 3, 5), scale=0.25, rope=(cos, sin))


def test_cpu_dispatch_is_the_reference_and_writes_into_out():
    q, k_new, v_new, k_cache, v_cache, valid, seen, positions = random_step(seed=1)
    caches = (k_cache.clone(), v_cache.clone())
    want = decode_attention_reference(q, k_new, v_new, *caches, valid, seen, (0, 1, 3, 5), scale=0.25, positions=positions)
    out = torch.full((3, 1, 5, 32), float("nan"))[..., 8:24]
    got = decode_attention(q, k_new, v_new, k_cache, v_cache, valid, seen, (0, 1, 3, 5), scale=0.25, positions=positions, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])


def test_bad_inputs_are_one_clear_error():
    q, k_new, v_new, k_cache, v_cache, valid, seen, _ = random_step()
    with pytest.raises(HeadscopeError, match="q_offsets"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, valid, seen, (0, 2, 5), scale=1.0)
    with pytest.raises(HeadscopeError, match="seen must be"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, valid, seen.int(), (0, 1, 3, 5), scale=1.0)
    with pytest.raises(HeadscopeError, match="q must be"):
        decode_attention(q.expand(3, 2, 5, 16), k_new, v_new, k_cache, v_cache, valid, seen, (0, 1, 3, 5), scale=1.0)


def test_triton_kernels_match_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 18 and sum("epilogue" in case["name"] for case in cases) == 4
    for case in cases:
        label = str(case)
        assert case["wrote_into_out"] and case["cache_written"] and case["others_untouched"], label
        assert case["error"] <= (TOL_FP32 if case["dtype"] == "float32" else TOL_BF16), label


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [4, 1])
def test_on_cuda_the_kernels_rope_equals_the_layers_rotary_first(rows):
    """The Triton path on the GPU, bf16, RoPE tables per row and broadcast: the same output and cache write as
    the reference fed with q and the key rotated first (float32)."""
    gen = torch.Generator().manual_seed(5)
    batch, sizes, dim, length, n = 4, (2, 2), 128, 4096, 3000
    q = torch.randn(batch, 1, sum(sizes), dim, generator=gen)
    k_new, v_new = (torch.randn(batch, 1, len(sizes), dim, generator=gen) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, len(sizes), length, dim, generator=gen) for _ in range(2))
    valid, seen = torch.ones(batch, length, dtype=torch.int8), torch.tensor([n])
    angles = torch.rand(rows, 1, dim // 2, generator=gen) * 3000
    cos, sin = (f(torch.cat((angles, angles), -1)) for f in (torch.cos, torch.sin))  # (rows, 1, D)
    cuda = lambda *ts: [t.cuda().bfloat16() if t.is_floating_point() else t.cuda() for t in ts]  # noqa: E731
    kc, vc = cuda(k_cache, v_cache)
    ref_caches = [t.float().cpu() for t in (kc, vc)]
    want = decode_attention_reference(*[t.float().cpu() for t in cuda(apply_rope(q, cos, sin), apply_rope(k_new, cos, sin), v_new)],
                                      *ref_caches, valid, seen, (0, 2, 4), scale=dim**-0.5)
    (qd, kd, vd, cd, sd), (vad, sed) = cuda(q, k_new, v_new, cos[:, -1], sin[:, -1]), cuda(valid, seen)
    got = decode_attention(qd, kd, vd, kc, vc, vad, sed, (0, 2, 4), scale=dim**-0.5, rope=(cd, sd))
    assert ((got.float().cpu() - want).norm() / want.norm()).item() < 0.02
    assert ((kc[:, :, n].float().cpu() - ref_caches[0][:, :, n]).abs().max() <= 0.02 * ref_caches[0][:, :, n].abs().max()).item()
