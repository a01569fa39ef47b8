"""Gated DeltaNet kernels: float32 recurrent reference vs chunked torch path vs decode steps (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from headscope.heads import HeadscopeError
from headscope.kernels.gdn.chunk import chunk_gated_delta_rule, recurrent_step
from headscope.kernels.gdn.naive import naive_recurrent_gated_delta_rule
from headscope.kernels.gdn.ops import gated_delta_rule
from headscope.kernels.metrics import relative_rms_error as rel

# fla's tolerances (tests/ops/test_gated_delta.py): outputs/states, dq/dk/dv, dbeta/dg.
TOL_FWD, TOL_QKV, TOL_GATES = 0.005, 0.008, 0.02


def random_inputs(seed, batch, length, heads, key_dim, value_dim, with_state=True, log_decay_scale=1.0):
    """Fresh inputs as the hybrid layer makes them: L2-normalised q/k, sigmoid beta, logsigmoid decay."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, length, heads, key_dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, key_dim, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen) + 2.0) * log_decay_scale
    beta = torch.rand(batch, length, heads, generator=gen)
    h0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen) if with_state else None
    return q, k, v, g, beta, h0


@pytest.mark.parametrize(
    "shape,with_state",
    [((2, 150, 3, 32, 48), True), ((1, 64, 2, 16, 16), False), ((3, 1, 2, 16, 24), True), ((1, 200, 1, 64, 64), True)],
)
def test_chunk_matches_recurrent_reference_forward(shape, with_state):
    q, k, v, g, beta, h0 = random_inputs(sum(shape), *shape, with_state=with_state)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and s.shape == (shape[0], shape[2], shape[3], shape[4]) and s.dtype == torch.float32
    assert rel(o, o_ref) <= TOL_FWD
    assert rel(s, s_ref) <= TOL_FWD


def test_chunk_survives_strong_and_zero_decay():
    """Log-decays down to -40 per token (exp underflows inside a chunk) and exactly 0 stay finite and exact."""
    q, k, v, g, beta, h0 = random_inputs(7, 2, 130, 2, 16, 16, log_decay_scale=40.0)
    g[:, :40] = 0.0
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel(o, o_ref) <= TOL_FWD and rel(s, s_ref) <= TOL_FWD


def test_naive_reference_matches_fla_naive_in_float64():
    """Our reference (g before beta) against fla's independent one (beta before g), computed in float64."""
    fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="fla not installed")
    q, k, v, g, beta, h0 = random_inputs(3, 2, 70, 2, 16, 24)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True)
    o_fla, s_fla = fla_naive.naive_recurrent_gated_delta_rule(
        q.double(), k.double(), v.double(), beta.double(), g.double(), scale=0.3,
        initial_state=h0.double(), output_final_state=True,
    )
    assert rel(o, o_fla) <= 1e-5 and rel(s, s_fla) <= 1e-5


def test_chunk_backward_matches_autograd_through_reference():
    q, k, v, g, beta, h0 = random_inputs(11, 2, 100, 2, 16, 16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    gen = torch.Generator().manual_seed(12)
    do, ds = torch.randn(v.shape, generator=gen), torch.randn(h0.shape, generator=gen)

    def grads(fn):
        for x in leaves:
            x.grad = None
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        ((o * do).sum() + (s * ds).sum()).backward()
        return [x.grad.clone() for x in leaves]

    ref = grads(naive_recurrent_gated_delta_rule)
    got = grads(chunk_gated_delta_rule)
    errors = {name: rel(a, b) for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got, ref)}
    assert max(errors["dq"], errors["dk"], errors["dv"], errors["dh0"]) <= TOL_QKV, errors
    assert max(errors["dg"], errors["dbeta"]) <= TOL_GATES, errors


def test_recurrent_step_matches_reference():
    q, k, v, g, beta, h0 = random_inputs(5, 2, 5, 3, 16, 8)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True)
    o, s = recurrent_step(q, k, v, g, beta, h0, scale=0.5)
    assert rel(o, o_ref) <= 1e-6 and rel(s, s_ref) <= 1e-6
    o0, s0 = recurrent_step(q, k, v, g, beta, None)
    o0_ref, s0_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert rel(o0, o0_ref) <= 1e-6 and rel(s0, s0_ref) <= 1e-6


def test_decode_steps_continue_the_chunked_prefill():
    """Prefill T tokens, then decode n one at a time == one prefill of T + n tokens."""
    prefill, steps = 70, 6
    q, k, v, g, beta, _ = random_inputs(21, 2, prefill + steps, 3, 32, 16, with_state=False)
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_pre, state = gated_delta_rule(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], g[:, :prefill], beta[:, :prefill], output_final_state=True
    )
    decoded = []
    with torch.no_grad():
        for t in range(prefill, prefill + steps):
            sl = slice(t, t + 1)
            o_t, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state, output_final_state=True)
            decoded.append(o_t)
    assert rel(torch.cat([o_pre, *decoded], dim=1), o_full) <= TOL_FWD
    assert rel(state, s_full) <= TOL_FWD


def test_dispatcher_dtypes_and_grad_at_single_token():
    q, k, v, g, beta, h0 = random_inputs(31, 2, 1, 2, 16, 16)
    o, s = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel(o, o_ref) <= 0.02 and rel(s, s_ref) <= 0.02  # bf16 inputs
    _, none_state = gated_delta_rule(q, k, v, g, beta)
    assert none_state is None
    v_leaf = v.clone().requires_grad_()
    o, _ = gated_delta_rule(q, k, v_leaf, g, beta, initial_state=h0)  # T == 1 with grads: chunk path
    o.sum().backward()
    assert v_leaf.grad is not None and torch.isfinite(v_leaf.grad).all()


def test_dispatcher_rejects_bad_shapes():
    q, k, v, g, beta, h0 = random_inputs(41, 1, 8, 2, 16, 16)
    with pytest.raises(HeadscopeError, match="beta"):
        gated_delta_rule(q, k, v, g, beta[..., :1])
    with pytest.raises(HeadscopeError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0[:, :1])
    with pytest.raises(HeadscopeError, match="q and k"):
        gated_delta_rule(q, k[..., :8], v, g, beta)
    with pytest.raises(HeadscopeError, match="empty"):
        gated_delta_rule(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0])


def test_kernels_import_and_run_without_triton_or_fla():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['fla'] = None\n"
        "import torch, headscope.kernels.gdn.ops as gdn, headscope.kernels.epilogue.ops as epi\n"
        "x = torch.randn(1, 3, 2, 8)\n"
        "o, s = gdn.gated_delta_rule(x, x, x, -torch.ones(1, 3, 2), torch.ones(1, 3, 2) / 2, output_final_state=True)\n"
        "y = epi.head_epilogue(o, torch.ones(2), torch.zeros(1, 3, 1, 8))\n"
        "assert y.shape == o.shape and s.shape == (1, 2, 8, 8)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fla_backward_guard_matches_fla_issue_640_range():
    from headscope.kernels.gdn.ops import fla_backward_broken

    assert fla_backward_broken("3.6.0", (9, 0), has_tilelang=False)
    assert fla_backward_broken("3.4.0", (9, 0), has_tilelang=False)
    assert not fla_backward_broken("3.7.1", (9, 0), has_tilelang=False)
    assert not fla_backward_broken("3.3.1", (9, 0), has_tilelang=False)
    assert not fla_backward_broken("3.6.0", (8, 0), has_tilelang=False)  # Ampere is fine
    assert not fla_backward_broken("3.6.0", (9, 0), has_tilelang=True)
    assert fla_backward_broken("3.5.0+git1234", (9, 0), has_tilelang=False)


def test_fla_gets_one_dtype_when_autocast_mixes_them(monkeypatch):
    """A float32 model under bf16 autocast gives float32 q/k (RoPE) and bf16 v/beta; fla's kernels need one dtype."""
    import types

    import headscope.kernels.gdn.ops as gdn

    seen = {}

    def fake_chunk(*, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        seen.update(q=q.dtype, k=k.dtype, v=v.dtype, beta=beta.dtype, g=g.dtype)
        return torch.zeros_like(v), None

    fake = types.ModuleType("fla.ops.gated_delta_rule")
    fake.chunk_gated_delta_rule = fake_chunk
    fake.fused_recurrent_gated_delta_rule = fake_chunk
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)
    monkeypatch.setattr(gdn, "_use_fla", lambda q: True)
    q, k = (F.normalize(torch.randn(1, 5, 2, 8), dim=-1) for _ in range(2))  # float32
    v, beta = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16), torch.full((1, 5, 2), 0.5, dtype=torch.bfloat16)
    with torch.no_grad():
        o, _ = gdn.gated_delta_rule(q, k, v, -torch.ones(1, 5, 2), beta)
    assert seen == dict(q=torch.bfloat16, k=torch.bfloat16, v=torch.bfloat16, beta=torch.bfloat16, g=torch.float32)
    assert o.dtype == torch.float32  # q's dtype, as documented
