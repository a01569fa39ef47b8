"""HeadwiseHybridAttention: tensor functions, agreement with the unpermuted per-head twin, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_qwen3
from headscope.heads import HeadMask
from headscope.hybrid import HybridConfig, build_hybrid
from headscope.hybrid.functional import attention_mask, causal_attention, fa_segments, gdn_decay_init, log_position_scale
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.hybrid.reference import reference_hybrid_attention
from headscope.kernels.gdn_prep.naive import short_conv_reference
from headscope.kernels.gdn_prep.ops import short_conv
from headscope.models import load_model


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((x.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt())
    assert not math.isnan(err)
    return err


def test_log_position_scale_is_one_before_floor_and_llama4_after():
    pos = torch.tensor([[0, 8190, 8191, 3 * 8192 - 1, 131071]])
    scale = log_position_scale(pos, attn_scale=0.1, floor_scale=8192.0)
    expected = [1.0, 1.0, 1.0 + 0.1 * math.log(2), 1.0 + 0.1 * math.log(4), 1.0 + 0.1 * math.log(17)]
    torch.testing.assert_close(scale[0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_fa_segments_group_equal_runs():
    assert fa_segments((2,)) == ((0, 2, 0, 1),)
    assert fa_segments((1, 1, 1)) == ((0, 3, 0, 3),)
    assert fa_segments((2, 2, 1)) == ((0, 4, 0, 2), (4, 5, 2, 3))
    assert fa_segments(()) == ()


def test_gdn_decay_init_ranges():
    a_log, dt_bias = gdn_decay_init(2000, torch.Generator().manual_seed(0))
    assert a_log.exp().max() <= 16 and a_log.exp().min() > 0
    dt = F.softplus(dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def test_short_conv_matches_direct_sum_and_carries_state():
    torch.manual_seed(0)
    x, w = torch.randn(2, 11, 6), torch.randn(6, 4)
    y, state = short_conv_reference(x, w)
    padded = F.pad(x, (0, 0, 3, 0))  # (B, 3 + T, C)
    direct = F.silu(torch.stack([(padded[:, t : t + 4] * w.T).sum(1) for t in range(11)], 1))
    torch.testing.assert_close(y, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[:, -4:].transpose(1, 2))
    y1, s1 = short_conv(x[:, :5], w)  # chunked with the carried window equals one pass
    y2, s2 = short_conv(x[:, 5:6], w, s1)
    y3, s3 = short_conv(x[:, 6:], w, s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s3, state)


def test_causal_attention_mask_path_equals_causal_path():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    segments = fa_segments((2, 2))
    fast = causal_attention(q, k, v, segments, scale=8**-0.5)  # is_causal path
    masked = causal_attention(q, k, v, segments, scale=8**-0.5, padding_mask=torch.ones(2, 9))  # explicit mask path
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-6)
    tail = causal_attention(q[:, 5:], k, v, segments, scale=8**-0.5)  # queries after a 5-token prefix
    torch.testing.assert_close(tail, fast[:, 5:], rtol=1e-5, atol=1e-6)
    allowed = attention_mask(3, 9, sliding_window=4)[0, 0]
    assert allowed[0].nonzero().flatten().tolist() == [3, 4, 5, 6]  # query at position 6, window 4
    assert allowed[2].nonzero().flatten().tolist() == [5, 6, 7, 8]


def test_a_later_chunk_without_padding_materialises_no_mask(monkeypatch):
    """A prefill chunk after cached tokens is causal_lower_right (FlashAttention's causal mode on CUDA, grouped heads
    included), not a (T, past + T) bool mask, which masked grouped SDPA runs only on cuDNN or the math fallback."""
    import headscope.hybrid.functional as functional

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    segments = fa_segments((2, 2))
    want = causal_attention(q, k, v, segments, scale=8**-0.5, padding_mask=torch.ones(2, 9))[:, 5:]  # explicit mask
    monkeypatch.setattr(functional, "attention_mask", lambda *a, **kw: pytest.fail("a bool mask was built"))
    torch.testing.assert_close(causal_attention(q[:, 5:], k, v, segments, scale=8**-0.5), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels")
def test_a_later_chunk_on_cuda_equals_the_masked_call():
    """bf16 on the GPU: the causal_lower_right chunk (Qwen3-1.7B's 2 query heads per KV head) against the masked call."""
    torch.manual_seed(0)
    q = torch.randn(2, 256, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    segments = fa_segments((2,) * 8)
    got = causal_attention(q, k, v, segments, scale=128**-0.5)
    want = causal_attention(q, k, v, segments, scale=128**-0.5, padding_mask=torch.ones(2, 1024, device="cuda"))
    assert rel_rms(got, want) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels")
@pytest.mark.parametrize("query_len", [256, 1])  # a chunk (first or later) and a decode step
@pytest.mark.parametrize("groups", [(2,) * 8, (2, 2, 1)])  # one segment (Qwen3-1.7B); unequal groups (two segments)
def test_direct_flash_equals_sdpa_on_cuda(query_len, groups):
    """The hybrid FA branch's direct flash call against SDPA's own choice, bf16: first chunk, later chunk, decode."""
    torch.manual_seed(0)
    segments, n_q = fa_segments(groups), sum(groups)
    for key_len in {query_len, 1024} - {0}:
        q = torch.randn(2, query_len, n_q, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, len(groups), key_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with torch.no_grad():
            got = causal_attention(q, k, v, segments, scale=128**-0.5, direct=True)
            want = causal_attention(q, k, v, segments, scale=128**-0.5)
        assert rel_rms(got, want) < 1e-2, (query_len, key_len, groups)


@pytest.fixture(scope="module")
def teacher():
    return load_model(tiny_qwen3(seed=3).float())


def mixed_mask(lm) -> HeadMask:
    """Layer 0: one FA head; layer 1: FA heads in two KV groups, unequal (segments (2, 1)); layer 2: none."""
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[0, 3] = True
    full[1, [0, 1, 3]] = True
    return HeadMask(full, lm.fingerprint)


def perturb_new_parameters(hybrid, seed: int = 0) -> None:
    """Move every new part away from its init so the twin comparison sees them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hybrid.model.layers:
            for name, p in layer.self_attn.named_parameters():
                if name.split(".")[0] in ("gate_proj", "conv1d", "b_proj", "a_proj", "gamma", "A_log", "dt_bias"):
                    p.add_(0.5 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(fa_rope=True, fusion_norm=False, floor_scale=4),
        dict(output_gate=False, log_scaling=True, floor_scale=2),
    ],
    ids=["default", "rope-nofusion", "nogate-logscale"],
)
def test_permuted_layer_equals_unpermuted_reference(teacher, switches):
    hybrid = build_hybrid(teacher, mixed_mask(teacher), HybridConfig(**switches))
    perturb_new_parameters(hybrid)
    assert hybrid.config.head_order[1][:3] == [0, 1, 3]
    assert hybrid.model.layers[1].self_attn.segments == ((0, 2, 0, 1), (2, 3, 1, 2))
    torch.manual_seed(1)
    x = torch.randn(2, 13, teacher.model.config.hidden_size)
    pos = torch.arange(13)[None].expand(2, 13)
    cos, sin = hybrid.model.rotary_emb(x, pos)
    for l, layer in enumerate(hybrid.model.layers):
        with torch.no_grad():
            fast = layer.self_attn(x, (cos, sin), pos)
        ref = reference_hybrid_attention(layer.self_attn, teacher.attention(l), hybrid.config.head_order[l], x, (cos, sin), pos)
        assert rel_rms(fast, ref) < 1e-5, f"layer {l}"


def test_gdn_first_runs_the_same_branches_in_the_other_order(teacher):
    """``gdn_first``: the GDN branch enqueued before the FA branch gives the same outputs bit for bit and calls
    the GDN branch first."""
    hybrid = build_hybrid(teacher, mixed_mask(teacher), HybridConfig())
    perturb_new_parameters(hybrid, seed=2)
    attn = hybrid.model.layers[1].self_attn
    x = torch.randn(2, 9, teacher.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(9)[None].expand(2, 9)
    rope = hybrid.model.rotary_emb(x, pos)
    calls = []
    for name in ("_full_attention", "_gated_delta"):
        method = getattr(attn, name)
        setattr(attn, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    with torch.no_grad():
        plain = attn(x, rope, pos)
        attn.gdn_first = True
        swapped = attn(x, rope, pos)
    assert torch.equal(plain, swapped) and calls == ["_full_attention", "_gated_delta", "_gated_delta", "_full_attention"]


def test_layer_forward_backward_cpu_matches_finite_differences():
    torch.manual_seed(0)
    spec = HybridLayerSpec(hidden_size=16, head_dim=8, n_fa_heads=2, n_gdn_heads=2, fa_kv_sizes=(2,), qk_norm=True, floor_scale=2.0)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 7, 16, requires_grad=True)
    pos = torch.arange(7)[None]
    angle = pos[..., None].float() * torch.linspace(0.1, 1.0, 4)
    rope = (torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1))
    target = torch.randn(1, 7, 16)

    def loss_fn() -> torch.Tensor:
        return (layer(x, rope, pos) * target).sum()

    loss_fn().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # directional derivative along a random direction of the new parameters vs central differences
    params = [layer.A_log, layer.dt_bias, layer.gamma, layer.gate_proj.weight, layer.conv1d.weight, layer.b_proj.weight]
    directions = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, directions))
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(eps * d)
        plus = loss_fn()
        for p, d in zip(params, directions):
            p.sub_(2 * eps * d)
        minus = loss_fn()
    numeric = (plus - minus) / (2 * eps)
    assert abs(float(numeric - analytic)) < 2e-2 * max(1.0, abs(float(analytic)))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_short_conv_matches_reference_on_cuda(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(2, 150, 96, device="cuda", dtype=dtype), torch.randn(96, 4, device="cuda", dtype=dtype)
    y_ref, s_ref = short_conv_reference(x.float(), w.float())
    y1, s1 = short_conv(x[:, :100], w)
    y2, s2 = short_conv(x[:, 100:101], w, s1)  # one decode step
    y3, s3 = short_conv(x[:, 101:], w, s2)
    assert rel_rms(torch.cat([y1, y2, y3], 1), y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_rms(s3, s_ref) < 1e-6


@pytest.mark.gpu
@needs_cuda
def test_cuda_layer_overlap_equals_sequential_and_cpu_float32():
    torch.manual_seed(0)
    spec = HybridLayerSpec(hidden_size=256, head_dim=64, n_fa_heads=2, n_gdn_heads=6, fa_kv_sizes=(2,), qk_norm=True, floor_scale=64.0)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 300, 256)
    pos = torch.arange(300)[None].expand(2, 300)
    angle = pos[..., None].float() * torch.logspace(0, -3, 32)
    rope = (torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1))
    with torch.no_grad():
        ref = layer(x, rope, pos)  # CPU float32: torch kernels, F.conv1d
        gpu = layer.to("cuda", torch.bfloat16)
        args = (x.cuda().bfloat16(), tuple(t.cuda().bfloat16() for t in rope), pos.cuda())
        gpu.overlap_branches = False
        sequential = gpu(*args)
        gpu.overlap_branches = True
        overlapped = gpu(*args)
    torch.cuda.synchronize()
    assert torch.equal(sequential, overlapped)
    assert rel_rms(overlapped.cpu(), ref) < 2e-2
