"""The decoder block's residual add + RMSNorm: the CPU path is each family's ``+`` and RMSNorm module bit for
bit, the Triton kernel matches the float32 reference under TRITON_INTERPRET=1 (and stores torch's sum),
the block fuses only where nothing hooks its norms, bad inputs are one clear error."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import headscope.kernels.rms_norm.ops as norm_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.configuration import FAMILIES
from headscope.hybrid.modeling import add_norm
from headscope.kernels.rms_norm.ops import add_rms_norm
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("rms_norm_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-6, 0.01  # bf16: two roundings, and the interpreter rounds towards zero


def family_norm(model_type: str, hidden: int, dtype: torch.dtype) -> torch.nn.Module:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    norm = getattr(module, FAMILIES[model_type].prefix + "RMSNorm")(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=torch.Generator().manual_seed(1)) + 0.5)
    return norm


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_is_every_familys_add_and_norm_bit_for_bit(model_type, dtype):
    norm = family_norm(model_type, 24, dtype)
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(2, 5, 24, generator=gen).mul(3).to(dtype) for _ in range(2))
    with torch.no_grad():
        out, total = add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
        assert torch.equal(total, residual + x) and torch.equal(out, norm(residual + x))
        out, same = add_rms_norm(x, None, norm.weight, norm.variance_epsilon)
        assert same is x and torch.equal(out, norm(x))


def test_triton_path_only_for_cuda_inference(monkeypatch):
    x, w = torch.zeros(1, 2, 8), torch.ones(8)
    assert not norm_ops.use_triton(x, x, w)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert norm_ops.use_triton(x, x, w) and norm_ops.use_triton(x, None, w)
    assert not norm_ops.use_triton(x, x.double(), w)
    with torch.enable_grad():
        assert not norm_ops.use_triton(x, x, w.clone().requires_grad_())  # training: autograd through the module
    monkeypatch.setattr(norm_ops, "FUSED", False)
    assert not norm_ops.use_triton(x, x, w)


def test_the_block_fuses_only_where_nothing_hooks_or_wraps_the_norm(monkeypatch):
    norm = family_norm("qwen3", 8, torch.float32)
    x, residual = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    fused = []
    monkeypatch.setattr(norm_ops, "use_triton", lambda *args: True)
    monkeypatch.setattr(norm_ops, "add_rms_norm", lambda *args: fused.append(args) or ("fused", "sum"))
    assert add_norm(norm, x, residual) == ("fused", "sum") and len(fused) == 1
    seen = []
    with torch.no_grad():
        handle = norm.register_forward_hook(lambda module, inputs, output: seen.append(output))
        try:
            out, total = add_norm(norm, x, residual)
        finally:
            handle.remove()
    assert len(fused) == 1 and len(seen) == 1 and torch.equal(out, seen[0]) and torch.equal(total, residual + x)
    wrapped = []
    original_forward = norm.forward
    norm.forward = lambda h: wrapped.append(h) or original_forward(h)  # a forward set on the instance (accelerate's hooks)
    with torch.no_grad():
        out, _ = add_norm(norm, x, residual)
    assert len(fused) == 1 and len(wrapped) == 1 and torch.equal(out, original_forward(residual + x))


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 8
    for case in cases:
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        sum_tol = 0.0 if case["dtype"] == "float32" else 2**-7  # bf16: one ulp (the interpreter truncates)
        assert case["error"] <= tol and case["sum_error"] <= sum_tol, str(case)


def test_bad_inputs_are_one_clear_error():
    x, w = torch.zeros(1, 2, 8), torch.ones(8)
    with pytest.raises(HeadscopeError, match="add_rms_norm"):
        add_rms_norm(x, torch.zeros(1, 3, 8), w, 1e-6)
    with pytest.raises(HeadscopeError, match="add_rms_norm"):
        add_rms_norm(x, None, torch.ones(4), 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_on_cuda_the_block_norms_equal_the_modules_to_one_bf16_ulp(model_type):
    """The Triton path on the GPU: the stored sum is torch's bit for bit (round to nearest there), the norm
    within one unit in the last place of the module's (only the order of the sum of squares differs)."""
    norm = family_norm(model_type, 2048, torch.bfloat16).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, residual = (torch.randn(3, 5, 2048, generator=gen, device="cuda").mul(4).bfloat16() for _ in range(2))
    with torch.no_grad():
        assert norm_ops.use_triton(x, residual, norm.weight)
        out, total = add_norm(norm, x, residual)
        want = norm(residual + x)
    assert torch.equal(total, residual + x)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
    assert ((out.float() - want.float()).abs() <= ulp).all()
