"""The gated MLP's ``silu(gate) * up``: the CPU path of the block's MLP is each family's module bit for bit, the
Triton kernel matches the float32 reference under TRITON_INTERPRET=1, the block fuses only an untouched SiLU MLP."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import headscope.kernels.swiglu.ops as swiglu_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.configuration import FAMILIES
from headscope.hybrid.modeling import gated_mlp
from headscope.kernels.swiglu.ops import swiglu
from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("swiglu_interpret_check.py")
TOL_FP32, TOL_BF16 = 1e-6, 0.01  # bf16: two roundings, and the interpreter rounds towards zero


def family_mlp(model_type: str, dtype: torch.dtype, act: str = "silu") -> torch.nn.Module:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, num_key_value_heads=4, hidden_act=act)
    torch.manual_seed(0)
    return getattr(module, FAMILIES[model_type].prefix + "MLP")(config).to(dtype)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocks_mlp_is_every_familys_module_bit_for_bit_on_cpu(model_type, dtype):
    mlp = family_mlp(model_type, dtype)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert torch.equal(gated_mlp(mlp, x), mlp(x))
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        assert torch.equal(swiglu(gate, up), mlp.act_fn(gate) * up)


def test_the_block_fuses_only_an_untouched_silu_mlp(monkeypatch):
    fused = []
    monkeypatch.setattr(swiglu_ops, "use_triton", lambda *args: True)
    monkeypatch.setattr(swiglu_ops, "swiglu", lambda gate, up: fused.append(1) or gate * 0)
    x = torch.randn(1, 3, 16)
    mlp = family_mlp("qwen3", torch.float32)
    with torch.no_grad():
        assert torch.equal(gated_mlp(mlp, x), mlp.down_proj(mlp.gate_proj(x) * 0)) and len(fused) == 1
        handle = mlp.act_fn.register_forward_hook(lambda *args: None)  # a hook on the activation: the module call
        assert torch.equal(gated_mlp(mlp, x), mlp(x)) and len(fused) == 1
        handle.remove()
        gelu = family_mlp("qwen3", torch.float32, act="gelu")  # another activation: the module call
        assert torch.equal(gated_mlp(gelu, x), gelu(x)) and len(fused) == 1


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_blocks_gate_and_up_are_one_gemm_at_inference(model_type):
    """With the block's ``InferenceWeights`` fused and no gradient: gate_proj and up_proj as one GEMM whose weight's
    halves are their weights, the activation reading the two halves in place; the MLP's output as the module gives it."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from headscope.hybrid.inference_weights import InferenceWeights

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    mlp, weights = family_mlp(model_type, torch.float32), InferenceWeights()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = mlp(x)
        assert weights.fused_linears("mlp", (mlp.gate_proj, mlp.up_proj), create=True) is not None  # what the block's fuse does
        with Ops() as ops:
            got = gated_mlp(mlp, x, weights)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    buffer = weights._fused["mlp"][0]
    assert mlp.gate_proj.weight.data_ptr() == buffer.data_ptr() and mlp.up_proj.weight.data_ptr() == buffer[40:].data_ptr()
    products = ops.ops["mm"] + ops.ops["addmm"] + ops.ops["bmm"]
    assert products == 2  # [gate; up] and down_proj
    with torch.enable_grad():  # training: the module calls
        assert torch.allclose(gated_mlp(mlp, x, weights), want, atol=1e-6, rtol=1e-5)


def test_triton_path_only_for_cuda_inference(monkeypatch):
    x = torch.zeros(2, 8)
    assert not swiglu_ops.use_triton(x, x)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert swiglu_ops.use_triton(x, x) and not swiglu_ops.use_triton(x, x.double())
    with torch.enable_grad():
        assert not swiglu_ops.use_triton(x.clone().requires_grad_(), x)
    monkeypatch.setattr(swiglu_ops, "FUSED", False)
    assert not swiglu_ops.use_triton(x, x)


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 6
    for case in cases:
        assert case["error"] <= (TOL_FP32 if case["dtype"] == "float32" else TOL_BF16), str(case)
        assert case["read_in_place"] and case["contiguous"], str(case)


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(HeadscopeError, match="swiglu"):
        swiglu(torch.zeros(2, 8), torch.zeros(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_blocks_mlp_equals_the_module_to_one_bf16_ulp():
    mlp = family_mlp("qwen3", torch.bfloat16).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up = (torch.randn(3, 7, 6144, generator=gen, device="cuda").mul(4).bfloat16() for _ in range(2))
    with torch.no_grad():
        assert swiglu_ops.use_triton(gate, up)
        got, want = swiglu(gate, up).float(), (mlp.act_fn(gate) * up).float()
    assert ((got - want).abs() <= 2 * torch.finfo(torch.bfloat16).eps * want.abs()).all()  # one ulp of each rounding
