"""headscope.kernels.switch: one switch sends every op's CUDA calls down its torch path (env var or a block).

The dispatchers are asked with stand-in CUDA tensors (CPU tensors whose ``is_cuda`` says True) of shapes and
dtypes each Triton path serves: True outside a ``torch_paths`` block, False inside it."""

from __future__ import annotations

import pytest
import torch

import headscope.kernels.epilogue.ops as epilogue_ops
import headscope.kernels.fa_decode.ops as fa_decode_ops
import headscope.kernels.fa_prefill.ops as fa_prefill_ops
import headscope.kernels.gdn.ops as gdn_ops
import headscope.kernels.gdn_decode.ops as gdn_decode_ops
import headscope.kernels.gdn_prep.ops as gdn_prep_ops
import headscope.kernels.qk_norm.ops as qk_ops
import headscope.kernels.rms_norm.ops as rms_ops
import headscope.kernels.rope_norm.ops as rope_ops
import headscope.kernels.swiglu.ops as swiglu_ops
from headscope.kernels.gdn_prep.naive import short_conv_reference
from headscope.kernels.switch import ENV, torch_paths, triton_off


class StandInCuda(torch.Tensor):
    @property
    def is_cuda(self) -> bool:
        return True


def cuda(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).as_subclass(StandInCuda)


def dispatchers() -> dict:
    q, k, v = cuda(1, 64, 4, 64), cuda(1, 4, 64, 64), cuda(1, 4, 64, 64)  # (B, T, H, D); k/v (B, Hkv, T, D)
    x, w = cuda(1, 8, 256), cuda(256)  # (B, T, C), (C,)
    step = cuda(2, 1, 4, 64)  # (B, 1, H, D)
    return {
        "epilogue": lambda: epilogue_ops.use_triton(cuda(2, 8, 4, 64)),
        "fa_decode": lambda: fa_decode_ops.use_triton(step, cuda(2, 4, 32, 64)),
        "fa_prefill": lambda: fa_prefill_ops.applies(q, k, v),
        "gdn (fla)": lambda: gdn_ops._use_fla(q),
        "gdn (fused prefill)": lambda: gdn_ops.use_fused(q, q, needs_grad=False),
        "gdn_decode": lambda: gdn_decode_ops.use_triton(step),
        "qk_norm": lambda: qk_ops.use_triton(q, q, cuda(64), cuda(64)),
        "rms_norm": lambda: rms_ops.use_triton(x, x, w),
        "rope_norm": lambda: rope_ops.use_triton(q, cuda(64, 32), cuda(64, 32)),
        "swiglu": lambda: swiglu_ops.use_triton(x, x),
    }


def test_blocks_nest_and_end_on_an_error(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert not triton_off()
    with torch_paths():
        with torch_paths():
            assert triton_off()
        assert triton_off()
    assert not triton_off()
    with pytest.raises(RuntimeError), torch_paths():
        raise RuntimeError("inside")
    assert not triton_off()
    monkeypatch.setenv(ENV, "1")
    assert triton_off()


@pytest.mark.parametrize("name", list(dispatchers()))
def test_every_dispatcher_asks_the_switch(monkeypatch, name):
    monkeypatch.delenv(ENV, raising=False)
    ask = dispatchers()[name]
    with torch.no_grad():
        assert ask(), f"{name}: these stand-ins should take the Triton path"
        with torch_paths():
            assert not ask(), f"{name}: the Triton path inside torch_paths"
        monkeypatch.setenv(ENV, "1")
        assert not ask(), f"{name}: the Triton path under {ENV}=1"


def test_the_short_conv_takes_the_reference_inside_the_block(monkeypatch):
    """(fla's conv kernel otherwise, which the CPU cannot run)"""
    monkeypatch.delenv(ENV, raising=False)
    x, weight = cuda(1, 8, 16, dtype=torch.float32), cuda(16, 4, dtype=torch.float32)  # (B, T, C), (C, K)
    with torch_paths():
        y, state = gdn_prep_ops.short_conv(x, weight)
    want, want_state = short_conv_reference(x, weight)
    assert torch.equal(y, want) and torch.equal(state, want_state)
