"""headscope's torch ``chunk_bwd_dqkwg`` against fla's Triton kernel (interpreter, CPU) and its registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from triton_interpreter import interpreted_cases

HELPER = Path(__file__).with_name("fla_dqkwg_interpret_check.py")
TOL = 1e-5


def test_torch_dqkwg_matches_flas_kernel_under_the_interpreter():
    pytest.importorskip("fla")
    cases = interpreted_cases(HELPER, timeout=300)
    assert len(cases) == 3
    for case in cases:
        label = str(case)
        assert case["dtypes_match"], label
        assert len(case["errors"]) == (4 if "no_w" not in case["name"] else 3), label
        assert all(err <= TOL for err in case["errors"].values()), label


def test_refuses_what_it_does_not_cover():
    from headscope.kernels.gdn.fla_dqkwg import chunk_bwd_dqkwg

    x = torch.zeros(1, 64, 1, 8)
    h = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="gated"):
        chunk_bwd_dqkwg(x, x, x, x, h, h, g=None)
    with pytest.raises(ValueError, match="gated"):
        chunk_bwd_dqkwg(x, x, x, x, h, h, g=torch.zeros(1, 64, 1), cu_seqlens=torch.tensor([0, 64]))


def test_registered_backend_answers_only_dqkwg():
    """fla asks every backend of ``common`` for each of its functions: ours must take chunk_bwd_dqkwg alone,
    and only the calls it covers."""
    pytest.importorskip("fla")
    from fla.backends import _get_operation_registry

    from headscope.kernels.gdn.fla_dqkwg import register_fla_backend

    register_fla_backend()
    register_fla_backend()  # idempotent
    backend = _get_operation_registry("common")._backends["headscope_torch"]
    assert backend.get_implementation("chunk_bwd_dqkwg") is not None
    assert backend.get_implementation("chunk_fwd_o") is None
    g = torch.zeros(1, 64, 1)
    assert backend.verify("chunk_bwd_dqkwg", g=g)[0]
    assert not backend.verify("chunk_bwd_dqkwg", g=None)[0]
    assert not backend.verify("chunk_bwd_dqkwg", g=g, cu_seqlens=torch.tensor([0, 64]))[0]
