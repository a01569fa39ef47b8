"""Fused RoPE + L2 norm: reference vs the layer's composition and an independent formula, the CPU
dispatcher and the hybrid layer bit-identical to before, the Triton kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headscope.kernels.gdn_prep.ops as gdn_prep_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.functional import apply_rope, l2_normalize
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.kernels.metrics import relative_rms_error as rel
from headscope.kernels.rope_norm.naive import rope_l2norm_reference
from headscope.kernels.rope_norm.ops import rope_l2norm, use_triton
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("rope_norm_interpret_check.py")
# fp32 must be exact up to summation order. bf16: one output rounding is ~0.0017 relative RMS on a GPU
# (round to nearest even), ~0.0034 under the interpreter, which truncates float32 -> bf16.
TOL_FP32, TOL_BF16 = 1e-5, 0.008


def rotary_tables(batch: int, length: int, dim: int, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style (cos, sin) of shape (batch, T, D): the half-dim angles repeated twice."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angle = (torch.arange(length).float()[:, None] + offset) * inv_freq  # (T, D/2)
    angle = torch.cat((angle, angle), dim=-1).expand(batch, length, dim)
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_reference_is_bit_identical_to_layer_composition(dtype, cos_batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 3, 64, generator=gen).to(dtype).unbind(2)[1]  # non-contiguous view, as in the layer
    cos, sin = (t.to(dtype) for t in rotary_tables(cos_batch, 7, 64, offset=30.0))
    assert torch.equal(rope_l2norm_reference(x, cos, sin), l2_normalize(apply_rope(x, cos, sin)))
    assert torch.equal(rope_l2norm_reference(x, cos, sin, eps=0.5), l2_normalize(apply_rope(x, cos, sin), eps=0.5))


def test_reference_matches_pairwise_rotation_formula():
    """Rotating each pair (x_i, x_{i+D/2}) by angle theta_i, then x / sqrt(sum x^2 + eps), written out."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, 32, generator=gen, dtype=torch.float64)
    theta = torch.rand(2, 5, 16, generator=gen, dtype=torch.float64) * 6.0
    cos, sin = torch.cat((theta.cos(), theta.cos()), -1), torch.cat((theta.sin(), theta.sin()), -1)
    x1, x2 = x[..., :16], x[..., 16:]
    c, s = theta.cos()[:, :, None], theta.sin()[:, :, None]
    u = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    for eps in (1e-6, 3.0):  # eps = 3 is large enough to show where it sits
        expected = u / torch.sqrt(u.pow(2).sum(-1, keepdim=True) + eps)
        assert rel(rope_l2norm_reference(x.float(), cos.float(), sin.float(), eps), expected) <= 1e-6
    assert torch.allclose(rope_l2norm_reference(x.float(), cos.float(), sin.float()).norm(dim=-1), torch.ones(2, 5, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_equals_composition_exactly_with_gradients(dtype):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 9, 2, 5, 128, generator=gen).to(dtype)
    cos, sin = (t.to(dtype) for t in rotary_tables(1, 9, 128))
    assert not use_triton(base, cos, sin)
    x_a, x_b = base.clone().requires_grad_(), base.clone().requires_grad_()
    y_a = rope_l2norm(x_a.unbind(2)[0], cos, sin)
    y_b = l2_normalize(apply_rope(x_b.unbind(2)[0], cos, sin))
    assert torch.equal(y_a, y_b) and y_a.dtype == dtype
    dy = torch.randn(y_a.shape, generator=gen).to(dtype)
    (g_a,), (g_b,) = torch.autograd.grad(y_a, x_a, dy), torch.autograd.grad(y_b, x_b, dy)
    assert torch.equal(g_a, g_b)


def test_dispatcher_rejects_bad_shapes():
    x = torch.randn(2, 4, 3, 8)
    cos, sin = rotary_tables(2, 4, 8)
    with pytest.raises(HeadscopeError, match="x must be"):
        rope_l2norm(x[0], cos, sin)
    with pytest.raises(HeadscopeError, match="cos must be"):
        rope_l2norm(x, cos[:, :3], sin)
    with pytest.raises(HeadscopeError, match="sin must be"):
        rope_l2norm(x, cos, sin[..., :4])
    with pytest.raises(HeadscopeError, match="cos must be"):
        rope_l2norm(x, torch.cat((cos, cos)), sin)  # batch 4 for x's batch 2
    with pytest.raises(HeadscopeError, match="cos must be"):
        rope_l2norm(x, cos[0], sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_layer_cpu_output_unchanged(monkeypatch, dtype):
    """The GDN branch with the dispatcher gives bit-for-bit the output of the former composition (the
    layer reaches ``rope_l2norm`` through the CPU composition of ``headscope.kernels.gdn_prep.ops``)."""
    spec = HybridLayerSpec(hidden_size=48, head_dim=16, n_fa_heads=1, n_gdn_heads=2, fa_kv_sizes=(1,))
    torch.manual_seed(3)
    layer = HeadwiseHybridAttention(spec, 0).to(dtype).eval()
    x = torch.randn(2, 11, 48).to(dtype)
    pos = torch.arange(11)[None].expand(2, 11)
    rope = tuple(t.to(dtype) for t in rotary_tables(2, 11, 16))
    with torch.no_grad():
        fused = layer(x, rope, pos)
        monkeypatch.setattr(gdn_prep_ops, "rope_l2norm", lambda q, cos, sin, eps: l2_normalize(apply_rope(q, cos, sin), eps))
        former = layer(x, rope, pos)
    assert torch.equal(fused, former)


def test_triton_kernel_matches_reference_under_interpreter():
    cases = interpreted_cases(HELPER, timeout=600)
    assert len(cases) == 11
    for case in cases:
        errors, label = case["errors"], f"{case['name']} {case['dtype']}: {case}"
        assert case["dtypes_ok"] and case["zero_row_ok"], label
        assert set(errors) == {"y", "y_inference", "dx", "composition"}, label
        if case["name"] == "bf16_x_float32_tables":  # float32 output: exact; dx is bf16 (x's dtype)
            assert max(errors["y"], errors["y_inference"]) <= TOL_FP32 and errors["dx"] <= TOL_BF16, label
        else:
            tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
            assert all(err <= tol for err in errors.values()), label
    strides = {case["name"]: case["x_strides"] for case in cases}
    assert strides["cpu_conv_layout_D32"][-1] != 1 and strides["layer_view_D128"][1] == 3 * 3 * 128  # views exercised


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_takes_triton_and_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 257, 3, 14, 128, generator=gen).to("cuda", dtype).requires_grad_()
    cos, sin = (t.to("cuda", dtype) for t in rotary_tables(1, 257, 128, offset=5000.0))
    x = base.unbind(2)[1]
    assert use_triton(x, cos, sin)
    y = rope_l2norm(x, cos, sin)
    dy = torch.randn(y.shape, generator=gen).to("cuda", dtype)
    (dbase,) = torch.autograd.grad(y, base, dy)
    x_ref = x.detach().float().requires_grad_()
    y_ref = rope_l2norm_reference(x_ref, cos.float(), sin.float())
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.float())
    tol = TOL_FP32 if dtype == torch.float32 else 0.004  # GPU rounds to nearest: ~0.0017
    assert y.dtype == dtype and y.is_contiguous()
    assert rel(y, y_ref) <= tol and rel(dbase.unbind(2)[1], dx_ref) <= tol
    assert torch.equal(dbase.unbind(2)[0], torch.zeros_like(x)) and torch.equal(dbase.unbind(2)[2], torch.zeros_like(x))
