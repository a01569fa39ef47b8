"""Helper run by tests/test_kernels_fla_dqkwg.py in a subprocess with TRITON_INTERPRET=1.

Runs fla's own ``chunk_bwd_kernel_dqkwg`` (the Triton kernel fla 0.6 refuses on Hopper with Triton
< 3.7.1) on CPU through the interpreter, launched directly with one fixed config (fla's autotuner needs a
GPU driver), and headscope's torch ``chunk_bwd_dqkwg`` on the same inputs; prints one JSON line whose
cases are ``{name, dtype, errors: {dq, dk, dw, dg}}``, relative RMS errors of headscope's against fla's.
float32 only: fla's kernel gives garbage for bfloat16 inputs under the interpreter (its bf16 ``tl.dot`` with
a float32 accumulator); bfloat16 is checked on the GPU (``benchmarks/gpu_kernel_check.py``, section gdn).
"""

from __future__ import annotations

import torch

from triton_interpreter import print_report  # same directory (sys.path[0] of this script)

# name, B, T, H (q/k heads), HV (v heads), K, V, with w (delta rule), state stored (V, K)
CASES = [
    ("ragged_last_chunk_gva", 2, 100, 1, 2, 16, 32, True, False),
    ("one_chunk_no_w", 1, 64, 2, 2, 32, 16, False, False),
    ("state_v_first", 1, 130, 1, 1, 16, 16, True, True),
]
CHUNK = 64


def fla_kernel(q, k, v, do, h, dh, w, g, dv, scale, state_v_first):
    """fla's kernel, launched as fla's ``chunk_bwd_dqkwg`` launches it (with BK = K, BV = V: one block)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    from fla.ops.common import chunk_o

    kernel = chunk_o.chunk_bwd_kernel_dqkwg
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    batch, length, n_qk, key_dim = k.shape
    n_v, value_dim = v.shape[2], v.shape[-1]
    n_chunks = -(-length // CHUNK)
    dq, dk = q.new_empty(batch, length, n_v, key_dim), k.new_empty(batch, length, n_v, key_dim)
    dg = torch.empty(1, batch, length, n_v)
    dw = torch.empty_like(w) if w is not None else None
    kernel[(n_chunks, batch * n_v)](
        q=q, k=k, v=v, g=g, g_gamma=None, h=h, do=do, dh=dh, dq=dq, dk=dk, dw=dw, dv=dv, dg=dg, cu_seqlens=None,
        chunk_indices=None, scale=scale, B=batch, T=length, H=n_qk, HV=n_v, K=key_dim, V=value_dim, BT=CHUNK,
        BK=key_dim, BV=value_dim, USE_G=True, USE_G_GAMMA=False, USE_DW=w is not None, STATE_V_FIRST=state_v_first,
        IS_VARLEN=False)
    group = n_v // n_qk
    dq = dq.view(batch, length, n_qk, group, key_dim).sum(3)
    dk = dk.view(batch, length, n_qk, group, key_dim).sum(3)
    return dq, dk, dw, dg.sum(0)


def run_case(batch, length, n_qk, n_v, key_dim, value_dim, with_w, state_v_first, dtype, seed):
    from headscope.kernels.gdn.fla_dqkwg import chunk_bwd_dqkwg
    from headscope.kernels.metrics import relative_rms_error as rel

    gen = torch.Generator().manual_seed(seed)
    n_chunks = -(-length // CHUNK)
    q, k = (torch.randn(batch, length, n_qk, key_dim, generator=gen).to(dtype) for _ in range(2))
    v, do, dv = (torch.randn(batch, length, n_v, value_dim, generator=gen).to(dtype) for _ in range(3))
    w = torch.randn(batch, length, n_v, key_dim, generator=gen).to(dtype) if with_w else None
    state_shape = (batch * n_chunks, n_v) + ((value_dim, key_dim) if state_v_first else (key_dim, value_dim))
    h, dh = (torch.randn(*state_shape, generator=gen).to(dtype) for _ in range(2))
    step = -torch.rand(batch, length, n_v, generator=gen) * 0.4  # log2-decay per token
    g = torch.cat([step[:, i : i + CHUNK].cumsum(1) for i in range(0, length, CHUNK)], dim=1)  # chunk-local cumsum
    args = dict(q=q, k=k, v=v, do=do, h=h, dh=dh, w=w, g=g, dv=dv, scale=key_dim**-0.5, state_v_first=state_v_first)
    want = fla_kernel(**args)
    got = chunk_bwd_dqkwg(**args, chunk_size=CHUNK)
    errors = {name: rel(a.float(), b.float()) for name, a, b in zip(("dq", "dk", "dw", "dg"), got, want) if b is not None}
    dtypes_match = all(a.dtype == b.dtype for a, b in zip(got, want) if b is not None)
    return {"errors": errors, "dtypes_match": dtypes_match, "dw_none": got[2] is None and w is None}


if __name__ == "__main__":
    print_report(lambda: [{"name": name, "dtype": "float32", **run_case(*args, torch.float32, seed)}
                          for seed, (name, *args) in enumerate(CASES)])
