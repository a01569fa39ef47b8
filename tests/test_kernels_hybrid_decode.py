"""A hybrid layer's decode step over both kinds of heads (``kernels/hybrid_decode``): on the CPU the two branches'
own dispatchers; under TRITON_INTERPRET=1 the one fused launch equals the two kernels' launches bit for bit and
matches the float32 reference; a bad input to either branch is one clear error before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headscope.heads import HeadscopeError
from headscope.kernels.fa_decode.ops import decode_attention
from headscope.kernels.gdn_decode.ops import gdn_decode_step
from headscope.kernels.hybrid_decode.naive import hybrid_decode_reference
from headscope.kernels.hybrid_decode.ops import hybrid_decode_step
from hybrid_decode_interpret_check import CASES, as_float, make_step
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("hybrid_decode_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-5, 0.015  # as kernels/fa_decode's and gdn_decode's own tests


def test_cpu_dispatch_is_the_two_branches_steps_into_the_layers_output():
    args = CASES[0][1:]
    attention, delta, out = make_step(*args, torch.float32, 0)
    got_fa, got_gdn = hybrid_decode_step(attention, delta)
    two_attention, two_delta, two_out = make_step(*args, torch.float32, 0)
    decode_attention(**two_attention)
    gdn_decode_step(**two_delta)
    assert got_fa.data_ptr() == attention["out"].data_ptr() and got_gdn.data_ptr() == delta["out"].data_ptr()
    assert not out.isnan().any() and torch.equal(out, two_out)
    for name, side in (("k_cache", attention), ("v_cache", attention)):
        assert torch.equal(side[name], two_attention[name])
    assert torch.equal(delta["conv_state"], two_delta["conv_state"]) and torch.equal(delta["state"], two_delta["state"])
    ref_attention, ref_delta, _ = make_step(*args, torch.float32, 0)
    want_fa, want_gdn = hybrid_decode_reference(as_float(ref_attention), as_float(ref_delta))
    assert torch.allclose(got_fa, want_fa, atol=1e-6) and torch.allclose(got_gdn, want_gdn, atol=1e-6)


def test_a_bad_input_to_either_branch_is_one_clear_error_before_any_write():
    attention, delta, _ = make_step(*CASES[0][1:], torch.float32, 0)
    k_cache = attention["k_cache"].clone()
    with pytest.raises(HeadscopeError, match="gdn_decode_step: b_weight"):
        hybrid_decode_step(attention, {**delta, "b_weight": delta["b_weight"][:1]})
    with pytest.raises(HeadscopeError, match="decode_attention: q_offsets"):
        hybrid_decode_step({**attention, "q_offsets": (0, 1)}, delta)
    assert torch.equal(attention["k_cache"], k_cache)  # the FA step did not run before the GDN inputs were refused


def test_one_launch_equals_the_two_kernels_and_matches_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 2 * len(CASES)
    # (GDN value blocks?, programs of the first launch): B·H·V_BLOCKS (or B·H) GDN + B·Hkv·S FA split programs
    want = {"qwen_like_gated_masked": (True, 2 * 3 * 2 + 2 * 1 * 2), "two_kv_groups_rope_window": (False, 3 * 2 + 3 * 2 * 1),
            "one_row_first_token_gamma_partial_block": (True, 4 * 3 + 1), "many_heads_whole_head_programs": (False, 144 + 12 * 1)}
    for case in cases:
        label = str(case)
        assert case["fused_launches"] == 1 and case["same_as_two_launches"], label
        assert (case["value_blocks"], case["split_programs"]) == want[case["name"]], label
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert all(err <= tol for err in case["errors"].values()), label


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels")
@pytest.mark.parametrize("batch", [1, 32])
def test_on_cuda_the_two_launches_equal_the_separate_kernels_at_the_qwen3_shape(batch, monkeypatch):
    """bf16, D = 128, 2 FA heads on one KV group beside 14 GDN heads, 4096 slots, padded rows: the fused launches
    (batch 1: 4 value-block programs per GDN head; batch 32: whole heads) against the separate kernels (the same
    arithmetic; the epilogue's sum of squares may round an ulp apart) and the float32 reference."""
    import headscope.kernels.hybrid_decode.triton_hybrid_decode as fused_module

    fused, calls = fused_module.triton_hybrid_decode, []
    monkeypatch.setattr(fused_module, "triton_hybrid_decode", lambda *a: calls.append(1) or fused(*a))
    args = (batch, (2,), 14, 128, 4096, 3000, False, True, None, "gate", True)
    cuda = lambda d: {k: v.cuda() if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
    (one_a, one_d, _), (two_a, two_d, _), (ref_a, ref_d, _) = (make_step(*args, torch.bfloat16, 3) for _ in range(3))
    one_a, one_d, two_a, two_d = cuda(one_a), cuda(one_d), cuda(two_a), cuda(two_d)
    assert fused_module.value_blocks(batch * 14, 4, one_a["q"].device) == (batch == 1)
    with torch.inference_mode():
        got = hybrid_decode_step(one_a, one_d)
        want_two = decode_attention(**two_a), gdn_decode_step(**two_d)
    want = hybrid_decode_reference(as_float(ref_a), as_float(ref_d))
    assert calls == [1]
    for g, w2, w in zip(got, want_two, want):
        assert ((g.float() - w2.float()).norm() / w2.float().norm()).item() < 1e-3
        assert ((g.float().cpu() - w).norm() / w.norm()).item() < 0.02
    for name in ("k_cache", "v_cache"):
        assert torch.equal(one_a[name], two_a[name]), name
    assert torch.equal(one_d["conv_state"], two_d["conv_state"])
    assert ((one_d["state"] - two_d["state"]).norm() / two_d["state"].norm()).item() < 1e-5
