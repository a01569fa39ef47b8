"""The fused GDN decode step: its float32 reference is the layer's dynamic-cache GDN branch for one token
(prep, beta/decay, recurrence, new states), the CPU dispatcher is the reference, and the Triton kernel
matches it under TRITON_INTERPRET=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headscope.heads import HeadscopeError
from headscope.kernels.gdn.ops import gated_delta_rule
from headscope.kernels.gdn_decode.naive import gdn_decode_reference
from headscope.kernels.gdn_decode.ops import gdn_decode_step
from headscope.kernels.gdn_prep.ops import short_conv_rope_l2norm
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("gdn_decode_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-5, 0.008


def random_step(batch=3, heads=2, dim=8, width=4, hidden=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, 1, heads + 1, 3 * dim, generator=gen)
    q, k, v = wide[:, :, 1:, :dim], wide[:, :, :-1, dim : 2 * dim], wide[:, :, 1:, 2 * dim :]
    x = torch.randn(batch, hidden, generator=gen)
    conv_weight = torch.randn(3 * heads * dim, width, generator=gen)
    conv_state = torch.randn(batch, 3 * heads * dim, width, generator=gen)
    cos, sin = (torch.randn(1, 1, dim, generator=gen) for _ in range(2))
    b_weight, a_weight = (torch.randn(heads, hidden, generator=gen) for _ in range(2))
    A_log, dt_bias = torch.randn(heads, generator=gen), torch.randn(heads, generator=gen)
    state = torch.randn(batch, heads, dim, dim, generator=gen)
    return x, q, k, v, conv_weight, conv_state, cos, sin, b_weight, a_weight, A_log, dt_bias, state


def test_reference_is_the_layers_gdn_branch_for_one_token():
    x, q, k, v, w, conv_state, cos, sin, b_w, a_w, A_log, dt_bias, state = random_step()
    mask = torch.tensor([1, 0, 1])
    # HeadwiseHybridAttention._gated_delta with a DynamicCache, for T == 1
    q_n, k_n, v_c, new_conv = short_conv_rope_l2norm(q, k, v, w, cos, sin, conv_state=conv_state, input_mask=mask[:, None], output_conv_state=True)
    beta = torch.sigmoid(x @ b_w.T)[:, None] * mask[:, None, None]
    g = (-A_log.exp() * F.softplus(x @ a_w.T + dt_bias))[:, None] * mask[:, None, None]
    want, new_state = gated_delta_rule(q_n, k_n, v_c, g, beta, scale=8**-0.5, initial_state=state, output_final_state=True)
    got = gdn_decode_reference(x, q, k, v, w, conv_state, cos, sin, b_w, a_w, A_log, dt_bias, state, mask, scale=8**-0.5)
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(conv_state, new_conv) and (state - new_state).abs().max().item() < 1e-5


def test_cpu_dispatch_is_the_reference_in_place_and_into_out():
    args = random_step(seed=1)
    copies = [t.clone() for t in args]
    want = gdn_decode_reference(*copies, scale=0.3)
    out = torch.full((3, 1, 4, 8), float("nan"))[:, :, 2:]
    got = gdn_decode_step(*args, scale=0.3, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    assert torch.equal(args[5], copies[5]) and torch.equal(args[12], copies[12])  # conv window, state: in place


def test_bad_inputs_are_one_clear_error():
    x, q, k, v, w, conv_state, cos, sin, b_w, a_w, A_log, dt_bias, state = random_step()
    with pytest.raises(HeadscopeError, match="state must be float32"):
        gdn_decode_step(x, q, k, v, w, conv_state, cos, sin, b_w, a_w, A_log, dt_bias, state.double(), scale=1.0)
    with pytest.raises(HeadscopeError, match="b_weight"):
        gdn_decode_step(x, q, k, v, w, conv_state, cos, sin, b_w[:1], a_w, A_log, dt_bias, state, scale=1.0)


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 10 and sum("epilogue" in case["name"] for case in cases) == 4
    for case in cases:
        label = str(case)
        assert case["wrote_into_out"], label
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert all(err <= tol for err in case["errors"].values()), label
