"""The hybrid attention core's prefill on its CUDA inference path, checked from the CPU: the kernels one call
launches (each Triton kernel replaced by a recorder of its launch, torch ops counted under a dispatch mode), and
the cached weight layouts of ``headscope.hybrid.inference_weights`` against the parameters they come from.

At T = 4096 on an H200 the core was host-bound (``benchmarks/results/gdn_prefill_speed.md``: 12 launches,
0.57 ms to enqueue against 0.42 ms of GPU work). Of its launch sites, the one-off weight copies and the
concatenation of the two branches' outputs are gone, and the two logit GEMMs became one and then part of the prep
kernel's launch, and the FA branch is one launch of ``kernels/fa_prefill`` instead of ATen's FlashAttention; the
launch test fails when one of them comes back.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import headscope.kernels.epilogue.ops as epilogue_ops
import headscope.kernels.fa_prefill.ops as fa_prefill_ops
import headscope.kernels.gdn.ops as gdn_ops
import headscope.kernels.gdn_prep.ops as prep_ops
from headscope.hybrid.inference_weights import LOGIT_ROWS_MULTIPLE, InferenceWeights, fuse_for_inference, padded_rows, split_gdn_logits
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec

ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.new_empty.default"}


class TorchLaunches(TorchDispatchMode):
    """The torch ops of the calls inside that would launch a GPU kernel, by name: those that write in place or
    return a tensor with new storage, allocations aside (views, and ``contiguous()`` of a contiguous tensor, do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storages = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        fresh = any(t.untyped_storage().data_ptr() not in storages for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        if func._schema.is_mutable or (fresh and str(func) not in ALLOCATIONS):
            self.ops[str(func)] += 1
        return out


def record_launches(monkeypatch, *kernels: tuple) -> list[str]:
    """Each ``(module, name)`` Triton kernel replaced by a recorder of ``kernel[grid](...)``; the list of the
    names launched (in order) is returned and filled by the calls that follow."""
    launches = []

    class Recorder:  # stands for a Triton kernel
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    for module, name in kernels:
        monkeypatch.setattr(module, name, Recorder(name))
    return launches


def tiny_layer(dtype: torch.dtype, seed: int = 0, length: int = 20):
    """A gated, fusion-normed 2 FA + 3 GDN head layer with q/k norms, its input, rotary tables and positions."""
    torch.manual_seed(seed)
    spec = HybridLayerSpec(hidden_size=48, head_dim=16, n_fa_heads=2, n_gdn_heads=3, fa_kv_sizes=(2,), qk_norm=True, floor_scale=32.0)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    pos = torch.arange(length)[None]
    angle = pos[..., None].float() * torch.linspace(0.05, 1.0, 8)
    rope = (torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype))
    return layer.to(dtype), torch.randn(1, length, 48, dtype=dtype), rope, pos


def test_core_prefill_launches_on_the_cuda_path(monkeypatch):
    pytest.importorskip("triton")
    from headscope.kernels.epilogue import triton_epilogue
    from headscope.kernels.gdn import triton_chunk
    from headscope.kernels.gdn_prep import triton_gdn_prep

    from headscope.kernels.fa_prefill import triton_fa_prefill

    launches = record_launches(monkeypatch, (triton_gdn_prep, "_short_conv_rope_l2norm_kernel"), (triton_chunk, "_chunk_intra_kernel"),
                               (triton_chunk, "_chunk_scan_kernel"), (triton_fa_prefill, "_prefill_kernel"), (triton_epilogue, "_epilogue_fwd_kernel"))
    monkeypatch.setattr(gdn_ops, "_use_fla", lambda q: True)  # the dispatchers' CUDA choices (FUSED_MAX_TOKENS as shipped)
    monkeypatch.setattr(prep_ops, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(epilogue_ops, "use_triton", lambda o: True)
    monkeypatch.setattr(fa_prefill_ops, "applies", lambda q, k, v: True)
    fa_prefill_ops.kv_head_map.cache_clear()
    layer, x, rope, pos = tiny_layer(torch.bfloat16)
    with torch.inference_mode():
        projected = layer.project(x)
        with TorchLaunches() as first:  # builds the cached weight layouts: the only call that copies weights
            layer.core(x, *projected, rope, pos, None, None, 1.0)
        launches.clear()
        with TorchLaunches() as later:
            layer.core(x, *projected, rope, pos, None, None, 1.0)
    assert launches == ["_prefill_kernel", "_short_conv_rope_l2norm_kernel", "_chunk_intra_kernel", "_chunk_scan_kernel", "_epilogue_fwd_kernel"]
    assert later.ops == Counter()  # FA in its own kernel, the GDN logits in the prep launch: no torch kernel left
    # [a_proj; b_proj; zero rows], the taps and the FA heads' KV head map (made once per offsets and device)
    assert first.ops - later.ops == Counter({"aten.cat.default": 1, "aten.new_zeros.default": 1, "aten.contiguous.default": 1,
                                             "aten.detach_.default": 1})


def test_prefill_into_a_static_cache_writes_its_states_in_place(monkeypatch):
    """Prefill against a ``HybridStaticCache`` on the CUDA path: the prep kernel stores the conv window and the
    recurrence the state straight into the cache's buffers; the only extra torch ops are the FA keys/values'
    two copies into their slots (no cat/transpose copy of the window, no state copies)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from headscope.hybrid.static_cache import HybridStaticCache
    from headscope.kernels.gdn import triton_chunk
    from headscope.kernels.gdn_prep import triton_gdn_prep

    from headscope.kernels.epilogue import triton_epilogue

    launched = []  # (module, tensor arguments) per launch: ``launch(kernel, grid, *args, **constexprs)`` recorded

    for module in (triton_gdn_prep, triton_chunk, triton_epilogue):
        monkeypatch.setattr(module, "launch", lambda kernel, grid, *args, name=module.__name__, **kw: launched.append(
            (name, [a for a in args if isinstance(a, torch.Tensor)])))
    monkeypatch.setattr(gdn_ops, "_use_fla", lambda q: True)
    monkeypatch.setattr(prep_ops, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(epilogue_ops, "use_triton", lambda o: True)
    layer, x, rope, pos = tiny_layer(torch.bfloat16)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].self_attn = layer
    model.config = SimpleNamespace(layer_types=["hybrid"])
    cache = HybridStaticCache(model, batch_size=1, max_length=32)
    with torch.inference_mode():
        projected = layer.project(x)
        layer.core(x, *projected, rope, pos, None, None, 1.0)  # (builds the cached weight layouts)
        launched.clear()
        with TorchLaunches() as ops:
            layer.core(x, *projected, rope, pos, cache, None, 1.0)
    window, state = cache.conv_states[0], cache.recurrent_states[0]
    assert [name.rsplit(".", 1)[1] for name, _ in launched] == ["triton_gdn_prep", "triton_chunk", "triton_chunk", "triton_epilogue"]
    assert [sum(t is window for t in args) for _, args in launched] == [1, 0, 0, 0]  # the prep kernel's state_out
    assert [sum(t is state for t in args) for _, args in launched] == [0, 0, 1, 0]  # the scan's final state
    copies = Counter({k: v for k, v in ops.ops.items() if k.startswith(("aten.copy_", "aten.cat", "aten.clone", "aten.contiguous"))})
    assert copies == Counter({"aten.copy_.default": 2}), ops.ops  # the FA keys and values into their slots


def test_inference_weights_follow_the_parameters():
    layer, x, rope, pos = tiny_layer(torch.float32, seed=1)

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return layer(x, rope, pos)

    def assert_matches_autograd_path() -> None:  # grad mode: the parameters themselves, no cache
        assert torch.allclose(inference(), layer(x, rope, pos), atol=1e-6, rtol=1e-5)

    assert_matches_autograd_path()
    weights = layer.inference_weights
    taps = weights.conv_taps(layer.conv1d.weight)
    assert taps.stride() == (1, taps.shape[0]) and torch.equal(taps, layer.conv1d.weight.squeeze(1))
    logits = weights._entries["gdn_logits"][2]  # [a_proj; b_proj; zero rows up to 16]
    assert logits.shape == (16, 48) and not logits[6:].any()
    assert torch.equal(logits[:6], torch.cat((layer.a_proj.weight, layer.b_proj.weight)))
    inference()
    assert weights._entries["gdn_logits"][2] is logits  # kept while nothing changes
    with torch.no_grad():
        layer.a_proj.weight.mul_(3.0)  # in place (an optimizer step): the version counter moves
        layer.conv1d.weight.add_(0.2)
    assert_matches_autograd_path()
    layer.b_proj.weight.data = torch.randn_like(layer.b_proj.weight)  # replaced: a new storage
    assert_matches_autograd_path()
    assert weights._entries["gdn_logits"][2] is not logits
    with torch.inference_mode():  # parameters made here have no version counter: derived at every call, never kept
        frozen = HeadwiseHybridAttention(layer.spec, layer_idx=0)
        frozen.load_state_dict(layer.state_dict())
        assert torch.allclose(frozen(x, rope, pos), inference(), atol=1e-6) and not frozen.inference_weights._entries


@pytest.mark.parametrize("n_gdn", [3, 8, 14])  # 6 -> 16 rows, 16 (no padding), 28 -> 32 (the Qwen3-1.7B hybrid)
def test_gdn_logits_are_strided_views_of_one_padded_gemm(n_gdn):
    torch.manual_seed(n_gdn)
    a_proj, b_proj = torch.nn.Linear(40, n_gdn, bias=False), torch.nn.Linear(40, n_gdn, bias=False)
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        a, b = split_gdn_logits(F.linear(x, InferenceWeights().gdn_logit_weight(a_proj, b_proj)), n_gdn)
        want_a, want_b = a_proj(x), b_proj(x)
    rows = padded_rows(2 * n_gdn)
    assert rows % LOGIT_ROWS_MULTIPLE == 0 and rows - 2 * n_gdn < LOGIT_ROWS_MULTIPLE
    assert a.shape == b.shape == (2, 9, n_gdn) and a.stride() == b.stride() == (9 * rows, rows, 1)
    assert b.data_ptr() - a.data_ptr() == n_gdn * a.element_size()  # one output, b right after a
    assert torch.allclose(a, want_a, atol=1e-6, rtol=1e-6) and torch.allclose(b, want_b, atol=1e-6, rtol=1e-6)


def gemms(ops: Counter) -> int:
    return sum(n for name, n in ops.items() if name.split(".")[1] in ("addmm", "mm", "bmm", "linear"))


def test_projections_are_one_gemm_whose_weight_is_the_parameters():
    """Once fused (``fuse_for_inference``; a forward alone never fuses) q, k, v and the FA gate come out of one GEMM
    at inference whose weight's row blocks are the four ``Linear.weight`` parameters themselves (same objects, no
    second copy); in-place updates reach it, a replaced weight sends the layer back to the module calls until the
    next fuse, a hooked projection keeps its module call."""
    layer, x, rope, pos = tiny_layer(torch.float32, seed=2)
    linears = layer.projection_linears()
    params = [linear.weight for linear in linears]
    want = layer.project(x)  # grad mode: the module calls
    with torch.no_grad():
        layer(x, rope, pos)
        with TorchLaunches() as ops:
            layer.project(x)
    assert not layer.inference_weights._fused and gemms(ops.ops) == 4  # a forward does not fuse
    fuse_for_inference(layer)
    with torch.no_grad(), TorchLaunches() as ops:
        got = layer.project(x)
    assert all(torch.allclose(g, w, atol=1e-6, rtol=1e-5) for g, w in zip(got, want))
    assert gemms(ops.ops) == 1
    buffer = layer.inference_weights._fused["projections"][0]
    assert [linear.weight for linear in linears] == params  # the same Parameter objects
    starts = [p.data_ptr() - buffer.data_ptr() for p in params]
    assert starts == [0, *itertools.accumulate(p.numel() * 4 for p in params[:-1])]
    assert buffer.untyped_storage().nbytes() == sum(p.numel() for p in params) * 4  # no copy beside the buffer
    with torch.no_grad():  # (k and q come out RMS-normalised: v and the gate show a scaled weight)
        layer.v_proj.weight.mul_(2.0)  # an optimizer step: in place, into the buffer
        assert torch.allclose(layer.project(x)[2], 2 * want[2], atol=1e-5)
    layer.gate_proj.weight.data = torch.randn_like(layer.gate_proj.weight)  # replaced: the module calls again
    with torch.no_grad(), TorchLaunches() as ops:
        assert torch.allclose(layer.project(x)[3], layer.gate_proj(x).view_as(want[3]), atol=1e-5)
    assert gemms(ops.ops) == 4 + 1  # (and gate_proj's own call in the check)
    fuse_for_inference(layer)  # fused again, from the new weight
    assert layer.inference_weights._fused["projections"][0] is not buffer
    with torch.no_grad():
        assert torch.allclose(layer.project(x)[3], layer.gate_proj(x).view_as(want[3]), atol=1e-5)
    seen = []
    handle = layer.q_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad(), TorchLaunches() as ops:
        layer.project(x)
    handle.remove()
    assert seen == [(1, 20, 80)] and gemms(ops.ops) == 4  # hooked: every projection its own module call


def test_nothing_is_fused_in_a_model_holding_fsdp_modules():
    layer, x, rope, pos = tiny_layer(torch.float32, seed=4)
    wrapper = torch.nn.Module()
    wrapper.inner = type("FSDPHeadwiseHybridAttention", (torch.nn.Module,), {})()  # what fully_shard names a module's class
    wrapper.attn = layer
    fuse_for_inference(wrapper)
    assert not layer.inference_weights._fused


def test_fused_projections_skip_inference_tensors_and_survive_save_load(tmp_path):
    layer, x, rope, pos = tiny_layer(torch.float32, seed=3)
    with torch.inference_mode():
        frozen = HeadwiseHybridAttention(layer.spec, layer_idx=0)
        frozen.load_state_dict(layer.state_dict())
        with TorchLaunches() as ops:
            frozen.project(x)
    assert gemms(ops.ops) == 4 and not frozen.inference_weights._fused  # inference tensors: module calls
    fuse_for_inference(layer)
    with torch.no_grad():
        want = layer(x, rope, pos)
    assert layer.inference_weights._fused
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    fresh = HeadwiseHybridAttention(layer.spec, layer_idx=0)
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt"))
    fuse_for_inference(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x, rope, pos), want)
        fresh.load_state_dict(layer.state_dict())  # in place into a fused layer: the buffer takes the values
        assert torch.equal(fresh(x, rope, pos), want)


def test_fused_buffers_follow_copies_moves_biases_and_compile(monkeypatch):
    """A deep copy starts unfused and fuses into its own buffers; tensors assigned into it from elsewhere send it back to the module calls
    (stale blocks never pass); a bias written in place reaches the fused output through the same bias buffer (what
    a captured step reads); a dtype move frees the old buffer; under torch.compile tracing the module calls run."""
    import copy
    import weakref

    torch.manual_seed(5)
    spec = HybridLayerSpec(hidden_size=48, head_dim=16, n_fa_heads=2, n_gdn_heads=3, fa_kv_sizes=(2,), qkv_bias=True)
    layer = HeadwiseHybridAttention(spec, layer_idx=0)
    x = torch.randn(1, 9, 48)
    fuse_for_inference(layer)
    twin = copy.deepcopy(layer)  # cloned parameters, an empty cache: the module calls until fused
    assert not twin.inference_weights._fused
    fuse_for_inference(twin)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1)  # in place: into the original's buffers only
        with TorchLaunches() as ops:
            got = twin.project(x)
        assert gemms(ops.ops) == 1 and torch.allclose(got[2], twin.v_proj(x).view_as(got[2]), atol=1e-6)  # the copy's own buffer
        twin.load_state_dict(layer.state_dict(), assign=True)  # the original's tensors (views of its buffers)
        with TorchLaunches() as ops:
            got = twin.project(x)
        assert gemms(ops.ops) == 4 and torch.allclose(got[3], layer.gate_proj(x).view_as(got[3]), atol=1e-6)
        bias = layer.inference_weights._fused["projections"][1]
        assert bias.shape == (sum(linear.out_features for linear in layer.projection_linears()),)
        layer.v_proj.bias.add_(1.0)  # in place, like an optimizer step
        assert layer.inference_weights.fused_linears("projections", layer.projection_linears())[1] is bias
        assert torch.allclose(layer.project(x)[2], layer.v_proj(x).view_as(got[2]), atol=1e-6)
    old = weakref.ref(layer.inference_weights._fused["projections"][0])
    layer.to(torch.float64)
    assert old() is None and not layer.inference_weights._fused  # the float32 buffer is gone with the move
    fuse_for_inference(layer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), TorchLaunches() as ops:
        layer.project(x.double())
    assert gemms(ops.ops) == 4
