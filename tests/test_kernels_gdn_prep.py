"""Fused GDN input preparation (conv + SiLU of q/k/v, RoPE + L2 norm of q/k): the reference is the layer's
former code, the CPU dispatcher and the hybrid layer are bit-identical to it, the new conv state is
exact, and the Triton kernel matches the float32 reference under TRITON_INTERPRET=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headscope.hybrid.layer as layer_module
import headscope.kernels.gdn_prep.ops as prep_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.functional import apply_rope, l2_normalize
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.kernels.gdn_prep.naive import next_conv_state, short_conv_reference, short_conv_rope_l2norm_reference
from headscope.kernels.gdn_prep.ops import short_conv_rope_l2norm, short_conv_rope_l2norm_and_logits, use_triton
from headscope.kernels.metrics import relative_rms_error as rel
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("gdn_prep_interpret_check.py")
# fp32: exact up to summation order. bf16: one output rounding, ~0.0017 relative RMS on a GPU (round to
# nearest even), ~0.0034 under the interpreter, which truncates float32 -> bf16.
TOL_FP32, TOL_BF16 = 1e-5, 0.008

pytestmark = pytest.mark.usefixtures("one_thread")


def former_layer_prep(q, k, v, weight, cos, sin, conv_state=None, input_mask=None, output_conv_state=False, conv_state_out=None):
    """``HeadwiseHybridAttention._gated_delta`` before this package (commit 35ed51f), op for op (``conv_state_out``:
    only a static cache's window, which these tests' cache is not)."""
    assert conv_state_out is None
    batch, seq, heads, d = q.shape
    mixed = torch.cat((q, k, v), dim=2).reshape(batch, seq, 3 * heads * d)
    mixed = mixed if input_mask is None else mixed * input_mask[:, :, None].to(mixed.dtype)
    mixed, conv_state = short_conv_reference(mixed, weight, conv_state)
    q, k, v = mixed.view(batch, seq, 3, heads, d).unbind(dim=2)
    return l2_normalize(apply_rope(q, cos, sin)), l2_normalize(apply_rope(k, cos, sin)), v, conv_state


def random_inputs(batch, length, heads, dim, dtype, seed, width=4, cos_batch=1, requires_grad=False):
    """q, k, v as head slices of wider projection rows; taps, tables, a conv state, a 0/1 padding mask."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, length, heads + 1, 3 * dim, generator=gen).to(dtype).requires_grad_(requires_grad)
    q, k, v = wide[:, :, 1:, :dim], wide[:, :, :-1, dim : 2 * dim], wide[:, :, 1:, 2 * dim :]
    weight = torch.randn(3 * heads * dim, width, generator=gen).to(dtype)
    cos, sin = (torch.randn(cos_batch, length, dim, generator=gen).to(dtype) for _ in range(2))
    state = torch.randn(batch, 3 * heads * dim, width, generator=gen).to(dtype)
    mask = (torch.rand(batch, length, generator=gen) > 0.3).long()
    return wide, (q, k, v, weight, cos, sin), state, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_and_cpu_dispatch_are_the_former_layer_code(dtype, with_state):
    _, args, state, mask = random_inputs(2, 9, 3, 16, dtype, seed=0, cos_batch=2)
    state = state if with_state else None
    former = former_layer_prep(*args, state, mask)
    reference = short_conv_rope_l2norm_reference(*args, state, mask)
    dispatched = short_conv_rope_l2norm(*args, conv_state=state, input_mask=mask, output_conv_state=True)
    for a, b, c in zip(former, reference, dispatched):
        assert torch.equal(a, b) and torch.equal(a, c) and a.dtype == dtype
    assert short_conv_rope_l2norm(*args, conv_state=state)[3] is None  # state only when asked


def test_logits_off_the_triton_path_are_the_linear_of_the_stacked_rows():
    """The CPU path of ``short_conv_rope_l2norm_and_logits``: the prep as without logits, and ``F.linear`` for them."""
    _, args, state, mask = random_inputs(2, 9, 3, 16, torch.float32, seed=3)
    x, weight = torch.randn(2, 9, 24), torch.randn(16, 24)
    *prep, logits = short_conv_rope_l2norm_and_logits(*args, x, weight, conv_state=state, input_mask=mask, output_conv_state=True)
    for a, b in zip(prep, short_conv_rope_l2norm(*args, conv_state=state, input_mask=mask, output_conv_state=True)):
        assert torch.equal(a, b)
    assert torch.equal(logits, torch.nn.functional.linear(x, weight))
    with pytest.raises(HeadscopeError, match="x must be"):
        short_conv_rope_l2norm_and_logits(*args, x[:, :5], weight)
    with pytest.raises(HeadscopeError, match="x must be"):
        short_conv_rope_l2norm_and_logits(*args, x, weight[:, :8])


def test_the_logits_stay_out_of_the_kernel_where_it_cannot_take_them(monkeypatch):
    """The fused path is chosen only for what the kernel computes right: otherwise ``F.linear`` (with its gradient)."""
    calls = []
    monkeypatch.setattr(prep_ops, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(prep_ops, "_triton_prep", lambda *args: calls.append(args[-1]) or args[:3] + (None,))
    _, args, _, _ = random_inputs(1, 5, 2, 8, torch.float32, seed=4)
    x, weight = torch.randn(1, 5, 24), torch.randn(16, 24)
    short_conv_rope_l2norm_and_logits(*args, x, weight)
    assert len(calls) == 1 and calls[0][0] is x  # the kernel takes them
    calls.clear()
    monkeypatch.setattr(prep_ops, "short_conv_rope_l2norm", lambda *a, **k: a[:3] + (None,))
    for bad_x, bad_w in ((x.double(), weight.double()), (x.transpose(1, 2).contiguous().transpose(1, 2), weight),
                         (x, weight.t().contiguous().t()), (x, torch.randn(256, 24)), (x.requires_grad_(), weight)):
        *_, logits = short_conv_rope_l2norm_and_logits(*args, bad_x, bad_w)
        assert torch.allclose(logits, torch.nn.functional.linear(bad_x, bad_w).to(logits.dtype))
    assert not calls and logits.requires_grad  # none reached the kernel; the gradient kept
    no_heads = tuple(t[:, :, :0] for t in args[:3]) + (args[3][:0],) + args[4:]
    *_, logits = short_conv_rope_l2norm_and_logits(*no_heads, x.detach(), weight)
    assert not calls and torch.allclose(logits, torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_backpropagates_like_the_former_code(dtype):
    wide_a, args_a, state, mask = random_inputs(2, 7, 2, 8, dtype, seed=1, requires_grad=True)
    wide_b, args_b, _, _ = random_inputs(2, 7, 2, 8, dtype, seed=1, requires_grad=True)
    assert not use_triton(*args_a[:6])
    q, k, v, _ = short_conv_rope_l2norm(*args_a, conv_state=state, input_mask=mask)
    q_b, k_b, v_b, _ = former_layer_prep(*args_b, state, mask)
    weights = torch.randn(3, *q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad_a,) = torch.autograd.grad((torch.stack((q, k, v)) * weights).sum(), wide_a)
    (grad_b,) = torch.autograd.grad((torch.stack((q_b, k_b, v_b)) * weights).sum(), wide_b)
    assert torch.equal(grad_a, grad_b) and grad_a.abs().sum() > 0


@pytest.mark.parametrize("length", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_next_conv_state_is_the_last_inputs_exactly(length, with_state):
    _, (q, k, v, weight, cos, sin), state, mask = random_inputs(2, length, 2, 8, torch.bfloat16, seed=3 + length)
    state = state if with_state else None
    for input_mask in (None, mask):
        expected = short_conv_rope_l2norm_reference(q, k, v, weight, cos, sin, state, input_mask)[3]
        got = next_conv_state(q, k, v, 4, state, input_mask)
        assert torch.equal(got, expected) and got.is_contiguous()


def test_dispatcher_rejects_bad_shapes():
    _, (q, k, v, weight, cos, sin), state, mask = random_inputs(2, 5, 3, 8, torch.float32, seed=4)
    with pytest.raises(HeadscopeError, match="q, k, v must be"):
        short_conv_rope_l2norm(q, k[:, :, :2], v, weight, cos, sin)
    with pytest.raises(HeadscopeError, match="q, k, v must be"):
        short_conv_rope_l2norm(q[0], k[0], v[0], weight, cos, sin)
    with pytest.raises(HeadscopeError, match="weight must be"):
        short_conv_rope_l2norm(q, k, v, weight[:-8], cos, sin)
    with pytest.raises(HeadscopeError, match="conv_state must be"):
        short_conv_rope_l2norm(q, k, v, weight, cos, sin, conv_state=state[..., :3])
    with pytest.raises(HeadscopeError, match="input_mask must be"):
        short_conv_rope_l2norm(q, k, v, weight, cos, sin, input_mask=mask[:, 1:])
    with pytest.raises(HeadscopeError, match="cos must be"):
        short_conv_rope_l2norm(q, k, v, weight, torch.cat((cos, cos, cos)), sin)
    with pytest.raises(HeadscopeError, match="sin must be"):
        short_conv_rope_l2norm(q, k, v, weight, cos, sin[..., :4])
    with pytest.raises(HeadscopeError, match="conv_state_out must be"):
        short_conv_rope_l2norm(q, k, v, weight, cos, sin, output_conv_state=True, conv_state_out=state[:1])


def test_an_empty_chunk_leaves_the_conv_state_as_it_was():
    pytest.importorskip("triton")
    from headscope.kernels.gdn_prep.triton_gdn_prep import triton_short_conv_rope_l2norm

    _, (q, k, v, weight, cos, sin), state, _ = random_inputs(2, 3, 2, 8, torch.float32, seed=5)
    empty = [t[:, :0] for t in (q, k, v, cos, sin)]
    for old in (state, None):
        out = torch.full_like(state, float("nan"))
        triton_short_conv_rope_l2norm(*empty[:3], weight, *empty[3:], old, state_out=out)  # returns before any launch
        assert torch.equal(out, state if old is not None else torch.zeros_like(state))
        assert torch.equal(out, next_conv_state(*empty[:3], 4, old))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_layer_cpu_output_unchanged(monkeypatch, dtype):
    """Prefill with left padding, then a cached decode step: bit for bit the layer's former code."""

    class OneLayerCache:  # the cache calls the GDN branch makes, for a layer with no FA heads
        def __init__(self):
            self.conv = self.recurrent = None
            self.layers = [self]

        def has_previous_state(self, layer_idx):
            return self.conv is not None

        conv_states = property(lambda self: {0: self.conv})
        recurrent_states = property(lambda self: {0: self.recurrent})

        def update_conv_state(self, conv, layer_idx, conv_kernel_size):
            self.conv = conv

        def update_recurrent_state(self, state, layer_idx):
            self.recurrent = state

    spec = HybridLayerSpec(hidden_size=48, head_dim=16, n_fa_heads=0, n_gdn_heads=3, fa_kv_sizes=())
    torch.manual_seed(5)
    layer = HeadwiseHybridAttention(spec, 0).to(dtype).eval()
    with torch.no_grad():
        layer.conv1d.weight.add_(0.3 * torch.randn_like(layer.conv1d.weight))
    x = torch.randn(2, 12, 48).to(dtype)
    pos = torch.arange(12)[None].expand(2, 12)
    rope = tuple(t.to(dtype) for t in random_inputs(2, 12, 1, 16, dtype, seed=6, cos_batch=2)[1][4:6])
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :4] = 0

    def run() -> list[torch.Tensor]:
        cache = OneLayerCache()
        with torch.no_grad():
            prefill = layer(x[:, :11], tuple(t[:, :11] for t in rope), pos[:, :11], cache, padding[:, :11])
            step = layer(x[:, 11:], tuple(t[:, 11:] for t in rope), pos[:, 11:], cache, padding)
        return [prefill, step, cache.conv, cache.recurrent]

    fused = run()
    monkeypatch.setattr(layer_module, "short_conv_rope_l2norm", former_layer_prep)
    monkeypatch.setattr(prep_ops, "short_conv_rope_l2norm",  # what the no-grad path's logits call wraps (at the default eps)
                        lambda *args, eps, **kwargs: former_layer_prep(*args, **kwargs))
    former = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, former))


def test_triton_kernel_matches_reference_under_interpreter():
    cases = interpreted_cases(HELPER, timeout=900)
    assert len(cases) == 26 and sum("logits" in case["errors"] for case in cases) == 8
    assert all(case["errors"]["logits_margin_written"] == 0 for case in cases if "logits" in case["errors"])
    for case in cases:
        label = f"{case['name']} {case['dtype']}: {case}"
        assert case["wrote_into_out"] and case["state_exact"], label
        tol = TOL_FP32 if case["dtype"] == "float32" else TOL_BF16
        assert all(case["errors"][name] <= tol for name in ("q", "k", "v", "composition", "logits") if name in case["errors"]), label
    strides = {case["name"]: case["strides"] for case in cases}
    assert strides["projection_slices"][0][1] == 5 * 3 * 32 and strides["state_and_mask_transposed"][0][-1] == 3


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_takes_triton_chunked_like_one_pass(dtype):
    """Prefill, one decode step and a chunk, each carrying the state, against one float32 reference pass."""
    _, args, state, mask = random_inputs(2, 300, 14, 128, dtype, seed=7, cos_batch=2)
    q, k, v, weight, cos, sin = (t.cuda() for t in args)
    state, mask = state.cuda(), mask.cuda()
    want = short_conv_rope_l2norm_reference(*(t.float() for t in (q, k, v, weight, cos, sin, state)), mask)
    pieces, carried = [], state
    with torch.no_grad():
        assert use_triton(q, k, v, weight, cos, sin, state)
        for part in (slice(0, 200), slice(200, 201), slice(201, 300)):
            *out, carried = short_conv_rope_l2norm(
                q[:, part], k[:, part], v[:, part], weight, cos[:, part], sin[:, part], conv_state=carried,
                input_mask=mask[:, part], output_conv_state=True,
            )
            pieces.append(out)
    tol = TOL_FP32 if dtype == torch.float32 else 0.004  # GPU rounds to nearest: ~0.0017
    for index, name in enumerate("qkv"):
        got = torch.cat([piece[index] for piece in pieces], dim=1)
        assert got.dtype == dtype and rel(got, want[index]) <= tol, name
    assert torch.equal(carried, want[3].to(dtype))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logits_in_the_prep_launch_match_the_linear(dtype):
    """The Qwen3-1.7B hybrid layer's shape (14 GDN heads: 28 logit rows padded to 32, hidden 2048): the logits the
    prep kernel stores against the float32 product, and the prep outputs unchanged by computing them."""
    from headscope.hybrid.inference_weights import stacked_logit_weight

    _, args, state, mask = random_inputs(1, 300, 14, 128, dtype, seed=8)
    args = tuple(t.cuda() for t in args)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 300, 2048, generator=gen).to(dtype).cuda()
    weight = stacked_logit_weight(*(torch.randn(14, 2048, generator=gen).mul(0.02).to(dtype).cuda() for _ in range(2)))
    with torch.no_grad():
        *prep, logits = short_conv_rope_l2norm_and_logits(*args, x, weight, conv_state=state.cuda(), input_mask=mask.cuda())
        alone = short_conv_rope_l2norm(*args, conv_state=state.cuda(), input_mask=mask.cuda())
    assert all(torch.equal(a, b) for a, b in zip(prep[:3], alone[:3]))
    assert logits.shape == (1, 300, 32) and not logits[..., 28:].any()
    assert rel(logits.float(), x.float() @ weight.float().T) <= (1e-5 if dtype == torch.float32 else 0.004)
