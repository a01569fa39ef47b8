"""headscope's fused chunk GDN kernels (``kernels/gdn/triton_chunk.py``) against the float32 token-by-token
reference under TRITON_INTERPRET=1; the logits entry point (``gated_delta_rule_from_logits``) on the CPU is
``gdn_gates`` + ``gated_delta_rule``; the routing rule of the fused path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import headscope.kernels.gdn.ops as gdn_ops
from headscope.heads import HeadscopeError
from headscope.kernels.gdn.ops import gated_delta_rule, gated_delta_rule_from_logits, gdn_gates
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("gdn_chunk_interpret_check.py")
# float32: the interpreter computes the dots exactly. bfloat16: the operands of every dot are rounded (S, Δ, A,
# W, U, P: fla's precision), and the interpreter rounds to bf16 towards zero (the GPU rounds to nearest).
TOL_FP32, TOL_BF16 = 1e-5, 0.02


def logits_inputs(seed=0, batch=2, length=37, heads=3, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(batch, length, heads, dim, generator=gen)
    a, b = torch.randn(batch, length, heads, generator=gen), torch.randn(batch, length, heads, generator=gen)
    A_log, dt_bias = torch.rand(heads, generator=gen).mul(16).log(), torch.randn(heads, generator=gen) - 3.0
    return q, k, v, a, b, A_log, dt_bias


def test_triton_chunk_kernels_match_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 12
    layer = cases.pop()  # a bf16 hybrid layer through the dispatchers, every Triton path forced, vs float32 CPU paths
    assert layer["triton_calls"] == ["triton_chunk_gated_delta_rule", "triton_head_epilogue", "triton_short_conv_rope_l2norm"], str(layer)
    assert layer["errors"]["o"] <= min(TOL_BF16, 1.5 * layer["cpu_paths_error"]), str(layer)
    for case in cases:
        label = str(case)
        assert case["wrote_into_out"], label
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert all(err <= tol for err in case["errors"].values()), label


def test_gates_are_the_layers_formula_and_padding_is_a_no_op():
    q, k, v, a, b, A_log, dt_bias = logits_inputs()
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0
    g, beta = gdn_gates(a, b, A_log, dt_bias, mask)
    assert torch.equal(beta[0], torch.sigmoid(b[0])) and torch.equal(g[0], -A_log.exp() * F.softplus(a[0] + dt_bias))
    assert (g[1, :5] == 0).all() and (beta[1, :5] == 0).all() and (g[0] < 0).all() and (g[1, 5:] < 0).all()
    state = torch.randn(2, 3, 8, 8)
    o, s = gated_delta_rule_from_logits(q, k, v, a, b, A_log, dt_bias, input_mask=mask, scale=0.4, initial_state=state, output_final_state=True)
    want, want_s = gated_delta_rule(q, k, v, g, beta, scale=0.4, initial_state=state, output_final_state=True)
    assert torch.equal(o, want) and torch.equal(s, want_s)
    # row 1's padded prefix leaves the state alone: the same as starting after it
    o_tail, s_tail = gated_delta_rule(q[1:, 5:], k[1:, 5:], v[1:, 5:], g[1:, 5:], beta[1:, 5:], scale=0.4, initial_state=state[1:], output_final_state=True)
    assert torch.allclose(o[1:, 5:], o_tail, atol=1e-5) and torch.allclose(s[1:], s_tail, atol=1e-5)
    cache_state = state.clone()  # the final state into a given tensor, here the initial state itself (a static cache's)
    o_in, s_in = gated_delta_rule_from_logits(q, k, v, a, b, A_log, dt_bias, input_mask=mask, scale=0.4, initial_state=cache_state,
                                              output_final_state=True, final_state=cache_state)
    assert s_in is cache_state and torch.equal(s_in, want_s) and torch.equal(o_in, want)


def test_fused_path_is_taken_only_where_it_applies(monkeypatch):
    def bf16(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16)

    q = bf16(1, 4096, 2, 128)
    monkeypatch.setattr(gdn_ops, "_use_fla", lambda x: True)  # as on CUDA; FUSED_MAX_TOKENS as measured (8192)
    assert gdn_ops.use_fused(q, q, needs_grad=False) and gdn_ops.use_fused(bf16(8, 1024, 2, 128), q, needs_grad=False)
    assert not gdn_ops.use_fused(q, q, needs_grad=True)  # training: fla (it has a backward)
    assert not gdn_ops.use_fused(q[:, :1], q[:, :1], needs_grad=False)  # decode: fla's one-kernel recurrent step
    assert not gdn_ops.use_fused(bf16(1, 8193, 2, 128), bf16(1, 8193, 2, 128), needs_grad=False)
    assert not gdn_ops.use_fused(bf16(3, 4096, 2, 128), bf16(3, 4096, 2, 128), needs_grad=False)  # B·T counts
    assert not gdn_ops.use_fused(bf16(1, 64, 2, 256), bf16(1, 64, 2, 256), needs_grad=False)
    assert not gdn_ops.use_fused(q.float(), q.float(), needs_grad=False)  # float32 tiles: fla
    monkeypatch.setattr(gdn_ops, "FUSED_MAX_TOKENS", 0)  # off
    assert not gdn_ops.use_fused(q, q, needs_grad=False)
    monkeypatch.setattr(gdn_ops, "_use_fla", lambda x: False)  # CPU
    monkeypatch.setattr(gdn_ops, "FUSED_MAX_TOKENS", 8192)
    assert not gdn_ops.use_fused(q, q, needs_grad=False)


def test_default_block_v_narrows_while_the_scan_grid_fits_one_wave():
    pytest.importorskip("triton")
    from headscope.kernels.gdn.triton_chunk import default_block_v

    assert default_block_v(14, 128, 132) == 16  # batch 1, 14 heads of 128 on an H200: 112 programs at 16 (measured best)
    assert default_block_v(112, 128, 132) == 32  # batch 8: 896 programs at 16 (measured: 32 is 14% faster)
    assert default_block_v(16, 128, 132) == 16 and default_block_v(17, 128, 132) == 32  # the bound: one wave of SMs
    assert default_block_v(3, 16, 132) == 16  # narrow heads: one block of 16 per head


def test_launch_arithmetic_matches_triton():
    triton = pytest.importorskip("triton")
    from headscope.kernels.launch import cdiv, next_power_of_2

    for n in range(1, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_bad_logit_inputs_are_one_clear_error():
    q, k, v, a, b, A_log, dt_bias = logits_inputs()
    with pytest.raises(HeadscopeError, match="A_log and dt_bias must be"):
        gated_delta_rule_from_logits(q, k, v, a, b, A_log[:2], dt_bias)
    with pytest.raises(HeadscopeError, match="input_mask must be"):
        gated_delta_rule_from_logits(q, k, v, a, b, A_log, dt_bias, input_mask=torch.ones(2, 36))
    for bad in (torch.zeros(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 3, 8, 8).transpose(2, 3), torch.zeros(2, 3, 8, 7)):
        with pytest.raises(HeadscopeError, match="final_state must be contiguous float32"):
            gated_delta_rule_from_logits(q, k, v, a, b, A_log, dt_bias, output_final_state=True, final_state=bad)
