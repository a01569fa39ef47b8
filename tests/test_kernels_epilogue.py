"""Fused head epilogue: torch reference vs an independent formula, Triton kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headscope.heads import HeadscopeError
from headscope.kernels.epilogue.naive import head_epilogue_reference
from headscope.kernels.epilogue.ops import head_epilogue
from headscope.kernels.metrics import relative_rms_error as rel
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("epilogue_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-5, 0.008  # fp32 must be exact; bf16 in/out rounds to ~0.004


def test_reference_matches_rms_norm_formula():
    """The reference against torch's own F.rms_norm, gamma and a sigmoid gate, per head."""
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(2, 7, 6, 32, generator=gen) * 4
    gamma = torch.rand(6, generator=gen) + 0.5
    gate = torch.randn(2, 7, 4, 32, generator=gen)
    y = head_epilogue_reference(o, gamma, gate, eps=1e-5)
    normed = F.rms_norm(o, (32,), eps=1e-5) * gamma[:, None]
    expected = normed.clone()
    expected[:, :, :4] = normed[:, :, :4] * torch.sigmoid(gate)
    assert rel(y, expected) <= 1e-6
    assert rel(head_epilogue_reference(o, gamma), normed) <= 1e-6
    assert head_epilogue_reference(o.bfloat16(), gamma, gate.bfloat16()).dtype == torch.bfloat16


def test_cpu_dispatch_runs_reference_and_backpropagates():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(1, 5, 3, 8, generator=gen, requires_grad=True)
    gamma = torch.ones(3, requires_grad=True)
    gate = torch.randn(1, 5, 1, 8, generator=gen, requires_grad=True)
    y = head_epilogue(o, gamma, gate)
    assert torch.equal(y, head_epilogue_reference(o, gamma, gate))
    y.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (o, gamma, gate))


def test_dispatcher_takes_o_in_two_parts():
    gen = torch.Generator().manual_seed(2)
    o, gamma, gate = torch.randn(2, 5, 6, 8, generator=gen), torch.rand(6, generator=gen), torch.randn(2, 5, 2, 8, generator=gen)
    fa = o[:, :, :2].transpose(1, 2).contiguous().transpose(1, 2)  # as SDPA returns it
    assert torch.equal(head_epilogue((fa, o[:, :, 2:]), gamma, gate), head_epilogue(o, gamma, gate))
    with pytest.raises(HeadscopeError, match="gamma must be"):
        head_epilogue((fa, o[:, :, 3:]), gamma, gate)  # 5 heads in all
    with pytest.raises(HeadscopeError, match="share B, T and D"):
        head_epilogue((fa, o[:, 1:, 2:]), gamma, gate)


def test_dispatcher_rejects_bad_shapes():
    o = torch.randn(1, 4, 3, 8)
    with pytest.raises(HeadscopeError, match="gamma"):
        head_epilogue(o, torch.ones(2))
    with pytest.raises(HeadscopeError, match="gate"):
        head_epilogue(o, torch.ones(3), torch.randn(1, 4, 4, 8))
    with pytest.raises(HeadscopeError, match="gate"):
        head_epilogue(o, torch.ones(3), torch.randn(1, 4, 1, 4))
    with pytest.raises(HeadscopeError, match="o must be"):
        head_epilogue(o[0], torch.ones(3))


def test_triton_kernel_matches_reference_under_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 8
    for case in cases:
        errors, label = case["errors"], f"{case['name']} {case['dtype']}: {case['errors']}"
        assert case["dtypes_ok"], label
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert set(errors) >= {"y", "y_inference", "y_pair", "do", "dgamma"}, label
        assert all(err <= tol for err in errors.values()), label
