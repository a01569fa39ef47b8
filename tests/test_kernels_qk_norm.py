"""The per-head q/k RMSNorm: the CPU dispatcher is the layer's former module calls bit for bit, the Triton
kernel matches the float32 reference under TRITON_INTERPRET=1, bad inputs are one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headscope.kernels.qk_norm.ops as qk_ops
from headscope.heads import HeadscopeError
from headscope.kernels.qk_norm.ops import qk_rms_norm
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("qk_norm_interpret_check.py")
# bf16: two roundings (the normalised row, then the weight product) and the interpreter rounds towards zero
TOL_FP32, TOL_BF16 = 1e-6, 0.01


def hf_qwen3_rms_norm(x, weight, eps):
    """transformers' Qwen3RMSNorm.forward, written out."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_is_qwen3s_norm_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, 16, generator=gen).to(dtype), torch.randn(2, 5, 3, 16, generator=gen).to(dtype)
    wq, wk = torch.rand(16, generator=gen).to(dtype), torch.rand(16, generator=gen).to(dtype)
    got_q, got_k = qk_rms_norm(q, k, wq, wk, 1e-6)
    assert torch.equal(got_q, hf_qwen3_rms_norm(q, wq, 1e-6)) and torch.equal(got_k, hf_qwen3_rms_norm(k, wk, 1e-6))


def test_triton_path_only_for_cuda_inference(monkeypatch):
    x, w = torch.zeros(1, 2, 3, 8), torch.ones(8)
    assert not qk_ops.use_triton(x, x, w, w)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert qk_ops.use_triton(x, x, w, w)
    assert not qk_ops.use_triton(x, x, w.double(), w)
    with torch.enable_grad():
        assert not qk_ops.use_triton(x, x, w.clone().requires_grad_(), w)  # training: autograd through the reference
    monkeypatch.setattr(qk_ops, "FUSED", False)
    assert not qk_ops.use_triton(x, x, w, w)


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 10
    for case in cases:
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert all(err <= tol for err in case["errors"].values()), str(case)


def test_bad_inputs_are_one_clear_error():
    x, w = torch.zeros(1, 2, 3, 8), torch.ones(8)
    with pytest.raises(HeadscopeError, match="q and k must be"):
        qk_rms_norm(x, torch.zeros(1, 3, 3, 8), w, w, 1e-6)
    with pytest.raises(HeadscopeError, match="weights must be"):
        qk_rms_norm(x, x, torch.ones(4), w, 1e-6)
