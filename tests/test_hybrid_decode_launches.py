"""The kernels one static-cache decode step of each layer's attention core launches on the CUDA path, checked
from the CPU (each Triton kernel replaced by a recorder of its launch, torch ops counted under a dispatch mode):
a layer of FA heads only takes the split and combine kernels of ``kernels/fa_decode``, one of GDN heads only the one
kernel of ``kernels/gdn_decode``, a hybrid layer (both kinds) the two kernels of ``kernels/hybrid_decode`` (the FA
split and GDN value-block programs, then the FA combine and GDN finish programs): as many launches as a layer of FA
heads only. The fused epilogue
(per-head RMSNorm x gamma, the FA heads' gate) runs inside those kernels: no torch op and no epilogue launch of
its own. At batch 1 a captured decode step is bound by its kernel count (~5 us a kernel on the H200), so an extra
launch per layer is an extra ~1% per step."""

from __future__ import annotations

import pytest
import torch

import headscope.kernels.fa_decode.ops as fa_ops
import headscope.kernels.gdn_decode.ops as gdn_ops
from conftest import tiny_qwen3
from headscope.heads import HeadMask
from headscope.hybrid import HybridConfig, build_hybrid
from headscope.hybrid.static_cache import HybridStaticCache
from headscope.models import load_model
from test_hybrid_prefill_launches import TorchLaunches, record_launches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decode_core_launches_on_the_cuda_path(monkeypatch):
    pytest.importorskip("triton")
    import headscope.kernels.epilogue.triton_epilogue as triton_epilogue
    from headscope.kernels.fa_decode import triton_fa_decode
    from headscope.kernels.gdn_decode import triton_gdn_decode
    from headscope.kernels.hybrid_decode import triton_hybrid_decode

    launches = record_launches(monkeypatch, (triton_fa_decode, "_split_kernel"), (triton_fa_decode, "_combine_kernel"),
                               (triton_gdn_decode, "_gdn_decode_kernel"), (triton_epilogue, "_epilogue_fwd_kernel"),
                               (triton_hybrid_decode, "_hybrid_split_kernel"), (triton_hybrid_decode, "_hybrid_combine_kernel"))
    lm = load_model(tiny_qwen3(seed=7).float())
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[0, 2] = True  # layer 0: 1 FA + 3 GDN heads (gated, fusion-normed); layer 1 all FA (a plain layer); layer 2 all GDN
    full[1, :] = True
    model = build_hybrid(lm, HeadMask(full, lm.fingerprint), HybridConfig(floor_scale=4))
    cache = HybridStaticCache(model, batch_size=2, max_length=20)
    per_layer = {}
    with torch.inference_mode():
        out = model(torch.randint(2, 128, (2, 7)), cache=cache, use_cache=True)  # the prefill, on the CPU path
        monkeypatch.setattr(fa_ops, "use_triton", lambda *tensors: True)  # the decode dispatchers' CUDA choice
        monkeypatch.setattr(gdn_ops, "use_triton", lambda *tensors: True)
        for layer in model.model.layers:
            def core(*args, _core=layer.self_attn.core, _idx=layer.self_attn.layer_idx, **kwargs):
                launches.clear()
                with TorchLaunches() as torch_ops:
                    result = _core(*args, **kwargs)
                per_layer[_idx] = (sorted(launches), dict(torch_ops.ops))
                return result
            monkeypatch.setattr(layer.self_attn, "core", core)
        model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    assert per_layer == {
        0: (["_hybrid_combine_kernel", "_hybrid_split_kernel"], {}),
        1: (["_combine_kernel", "_split_kernel"], {}),
        2: (["_gdn_decode_kernel"], {}),
    }


def test_a_fused_decode_step_makes_one_product_per_projection_group(monkeypatch):
    """After ``fuse_for_inference`` (what ``generate()`` and ``HybridStaticCache`` call) a decode step runs q/k/v (+ the
    FA gate) as one product and the MLP's gate/up as another, in every layer: (projections - 1) + 1 ``F.linear``
    calls fewer per layer than before, with the same logits."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    from headscope.hybrid.inference_weights import fuse_for_inference

    lm = load_model(tiny_qwen3(seed=7).float())
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    full[0, 2] = True
    full[1, :] = True
    model = build_hybrid(lm, HeadMask(full, lm.fingerprint), HybridConfig(floor_scale=4))
    calls, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda *args, **kwargs: calls.append(1) or linear(*args, **kwargs))
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))

    def decode_step() -> tuple[int, torch.Tensor]:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids, cache=cache, use_cache=True)
            calls.clear()
            logits = model(ids[:, -1:], cache=cache, use_cache=True).logits
        return len(calls), logits

    before, want = decode_step()
    fuse_for_inference(model)
    after, got = decode_step()
    layers = model.model.layers
    assert before - after == sum(len(layer.self_attn.projection_linears()) for layer in layers)  # (n - 1) + 1 per layer
    assert torch.allclose(got, want, atol=1e-5)
