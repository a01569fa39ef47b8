"""headscope.kernels.switch: one switch sends every op's CUDA calls down its torch path (env var or a block)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import headscope.kernels.gdn.ops as gdn_ops
import headscope.kernels.rope_norm.ops as rope_ops
from headscope.kernels.switch import ENV, torch_paths, triton_off


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


def test_dispatchers_ask_the_switch_at_each_call(monkeypatch):
    """A stand-in CUDA tensor: the dispatchers' first question is the device, then the switch."""
    monkeypatch.delenv(ENV, raising=False)
    cuda = SimpleNamespace(is_cuda=True, shape=(1, 8, 2, 16), dtype=None)
    assert gdn_ops._use_fla(cuda)
    with torch_paths():
        assert not gdn_ops._use_fla(cuda) and not rope_ops.use_triton(cuda, cuda, cuda)
    assert gdn_ops._use_fla(cuda)
