"""Causal prefill attention of the FA heads: the float32 reference is the layer's SDPA attention over head
segments, the CPU dispatcher is the reference, the Triton kernel matches it under TRITON_INTERPRET=1, and the
hybrid layer's FA branch takes the kernel on its CUDA inference path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headscope.kernels.fa_prefill.ops as prefill_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.functional import causal_attention, fa_segments, segment_offsets
from headscope.kernels.fa_prefill.naive import kv_heads_of, prefill_attention_reference
from headscope.kernels.fa_prefill.ops import prefill_attention
from headscope.kernels.metrics import relative_rms_error as rel
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("fa_prefill_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-5, 0.01  # bf16: P rounded for the second product and the output rounded (truncated by the interpreter)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_inputs(batch, sizes, dim, length, key_len, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, sum(sizes), dim, generator=gen)
    k, v = (torch.randn(batch, len(sizes), key_len, dim, generator=gen) for _ in range(2))
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


@pytest.mark.parametrize("sizes", [(2,), (1, 2, 2), (3, 1)])
@pytest.mark.parametrize("length,key_len", [(37, 37), (12, 50)])
def test_reference_is_the_layers_sdpa_over_segments(sizes, length, key_len):
    q, k, v = random_inputs(2, sizes, 16, length, key_len, seed=len(sizes))
    segments = fa_segments(sizes)
    offsets = segment_offsets(segments)
    assert offsets == tuple(int(x) for x in torch.tensor((0, *sizes)).cumsum(0))
    want = causal_attention(q, k, v, segments, scale=0.3)
    got = prefill_attention_reference(q, k, v, offsets, scale=0.3)
    assert (got - want).abs().max().item() < 1e-5


def test_kv_heads_of_uneven_groups():
    assert kv_heads_of((0, 2, 3, 6)) == [0, 0, 1, 2, 2, 2]


def test_cpu_dispatch_is_the_reference_and_writes_into_out():
    q, k, v = random_inputs(1, (1, 3), 8, 10, 14, seed=4, dtype=torch.bfloat16)
    assert not prefill_ops.applies(q, k, v)
    out = torch.zeros(1, 10, 4, 16, dtype=torch.bfloat16)[..., 8:]
    got = prefill_attention(q, k, v, (0, 1, 4), scale=0.5, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.bfloat16
    assert torch.equal(got, prefill_attention_reference(q, k, v, (0, 1, 4), scale=0.5).to(torch.bfloat16))


@pytest.mark.parametrize("bad, message", [
    (dict(offsets=(0, 2, 3)), "q_offsets must rise from 0 to Hq=4"),
    (dict(offsets=(0, 4, 4)), "q_offsets must rise"),
    (dict(key_len=5), "Tk >= T=10"),
    (dict(out=(1, 10, 4, 7)), "out must be (B, T, Hq, D)"),
])
def test_bad_inputs_get_one_clear_error(bad, message):
    q, k, v = random_inputs(1, (1, 3), 8, 10, bad.get("key_len", 12))
    out = torch.empty(bad["out"]) if "out" in bad else None
    with pytest.raises(HeadscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prefill_attention(q, k, v, bad.get("offsets", (0, 1, 4)), scale=0.5, out=out)


def test_triton_kernel_under_the_interpreter():
    *cases, layer = interpreted_cases(HELPER)
    assert len(cases) == 22 and {c["block_m"] for c in cases} == {64, 128}
    assert layer["name"] == "layer_core_uneven_groups" and layer["kernel_calls"] == 1 and layer["error"] <= TOL_FP32, layer
    for case in cases:
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert case["error"] <= tol, case  # NaN (an element never written) fails too
        assert case["wrote_into_out"], case


def test_dispatch_takes_the_kernel_only_where_it_is_meant_to():
    """``applies`` on stand-ins of CUDA tensors: a short prefill of the layer's FA heads yes; a decode step, a short
    chunk over many keys, more keys than ``MAX_TOKENS``, float32, another device, a gradient, too many programs no."""
    from types import SimpleNamespace

    def fake(b, t, h, d=128, dtype=torch.bfloat16, device="cuda:0", grad=False, kv=False):
        shape = (b, h, t, d) if kv else (b, t, h, d)
        return SimpleNamespace(shape=shape, dtype=dtype, device=torch.device(device), is_cuda=True, requires_grad=grad)

    def applies(t=4096, tk=4096, b=1, h=2, **changes):
        q = fake(b, t, h, **{k: v for k, v in changes.items() if k != "kv_device"})
        k = fake(b, tk, 1, kv=True, device=changes.get("kv_device", "cuda:0"))
        return prefill_ops.applies(q, k, k)

    assert applies() and applies(t=2, tk=16) and applies(t=1024, tk=8192)
    assert not applies(t=1, tk=4096)  # decode step
    assert not applies(t=1000, tk=8192)  # a chunk shorter than an eighth of its keys
    assert not applies(t=8200, tk=8200)  # past MAX_TOKENS
    assert not applies(dtype=torch.float32) and not applies(kv_device="cuda:1") and not applies(d=320)
    assert not applies(b=40000, h=2)  # 80000 programs on the grid's second axis
    assert applies(grad=True) != torch.is_grad_enabled()


def test_block_sizes_fill_the_gpu_and_fit_shared_memory():
    from headscope.kernels.fa_prefill.triton_fa_prefill import block_sizes

    assert block_sizes(2, 4096, 128, 132) == (64, 64, 4, 3)  # 2 FA heads at 4K: 128 programs of 64 rows, not 64 of 128
    assert block_sizes(16, 4096, 128, 132) == (128, 64, 8, 3)
    assert block_sizes(16, 4096, 256, 132) == (64, 32, 8, 2)  # 128 rows would not fit an SM's shared memory
    assert block_sizes(16, 4096, 128, 132, element_size=4) == (64, 32, 8, 2)  # float32 (the interpreter)


def test_layer_fa_branch_takes_the_kernel_on_the_cuda_path(monkeypatch):
    """``causal_attention(direct=True)`` (the hybrid's FA branch) sends an unmasked call the dispatcher accepts to
    ``prefill_attention`` with the segments' offsets, one call for uneven groups; masked calls keep SDPA."""
    calls = []
    monkeypatch.setattr(prefill_ops, "applies", lambda q, k, v: True)
    monkeypatch.setattr(prefill_ops, "prefill_attention", lambda q, k, v, offsets, scale, check: calls.append(offsets) or q)
    q, k, v = random_inputs(1, (1, 2, 2), 8, 6, 6)
    segments = fa_segments((1, 2, 2))
    assert causal_attention(q, k, v, segments, scale=0.3, direct=True) is q and calls == [(0, 1, 3, 5)]
    causal_attention(q, k, v, segments, scale=0.3, direct=True, padding_mask=torch.ones(1, 6, dtype=torch.long))
    causal_attention(q, k, v, segments, scale=0.3)  # a plain (full-attention) layer: SDPA
    assert len(calls) == 1


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sizes,length,key_len,batch,dim,dtype,projected", [
    ((2,), 4096, 4096, 1, 128, torch.bfloat16, True),  # the Qwen3-1.7B hybrid's FA branch at 4K, k/v as the layer passes them
    ((1, 3, 2), 1000, 1000, 2, 128, torch.bfloat16, False),  # uneven groups, two rows
    ((2, 2), 300, 1300, 1, 64, torch.float16, False),  # a later chunk
    ((1,), 777, 777, 3, 256, torch.bfloat16, True),
])
def test_cuda_kernel_matches_flash_and_the_reference(sizes, length, key_len, batch, dim, dtype, projected):
    """On the GPU against the float32 reference, as close as SDPA's FlashAttention is; ``projected``: q a head slice
    of a wider projection and k/v transposed ``(B, T, Hkv, D)`` views, the layouts the hybrid layer passes."""
    q, k, v = random_inputs(batch, sizes, dim, length, key_len, seed=5, dtype=dtype, device="cuda")
    if projected:
        wide = torch.randn(batch, length, sum(sizes) + 3, dim, dtype=dtype, device="cuda")
        q = wide[:, :, 1 : 1 + sum(sizes)].copy_(q)
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))  # (B, Hkv, Tk, D) views of (B, Tk, Hkv, D)
    offsets = tuple(int(x) for x in torch.tensor((0, *sizes)).cumsum(0))
    with torch.no_grad():
        assert prefill_ops.applies(q, k, v)
        got = prefill_attention(q, k, v, offsets, scale=dim**-0.5)
        flash = causal_attention(q, k, v, fa_segments(sizes), scale=dim**-0.5)
    want = prefill_attention_reference(q, k, v, offsets, scale=dim**-0.5)
    assert rel(got, want) <= max(1.5 * rel(flash, want), 0.005), (rel(got, want), rel(flash, want))
