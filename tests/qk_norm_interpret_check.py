"""Helper run by tests/test_kernels_qk_norm.py in a subprocess with TRITON_INTERPRET=1.

Runs the one-launch q/k RMSNorm kernel (``kernels/qk_norm/triton_qk_norm.py``) on CPU through the
interpreter and prints one JSON line (see ``tests/triton_interpreter.py``) whose cases are
``{name, dtype, errors: {q, k}}``: relative RMS errors against the float32 reference on the same
dtype-rounded inputs. q and k are strided views of one projection-like tensor, as in the layer.
"""

from __future__ import annotations

import torch

from triton_interpreter import cases_in_dtypes, print_report  # same directory (sys.path[0] of this script)

# name, B, T, Hq, Hk, D
CASES = [
    ("qwen_like_gqa", 2, 9, 4, 2, 32),
    ("more_keys_than_queries", 1, 5, 2, 7, 16),  # the hybrid's k: FA KV heads + one per GDN head
    ("dim_not_power_of_two", 3, 4, 3, 3, 24),
    ("head_dim_128", 1, 3, 4, 3, 128),  # Qwen3's head dim: the compile check builds the layer's own tiles
    ("decode_step", 2, 1, 4, 3, 128),  # T = 1 (Triton specialises an int argument equal to 1): the captured decode step
]


def run_case(batch, length, q_heads, k_heads, dim, dtype, seed):
    from headscope.kernels.metrics import relative_rms_error as rel
    from headscope.kernels.qk_norm.naive import head_rms_norm_reference
    from headscope.kernels.qk_norm.triton_qk_norm import triton_qk_rms_norm

    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(batch, length, (q_heads + k_heads + 1) * dim, generator=gen) * 3).to(dtype)
    q = wide[..., : q_heads * dim].view(batch, length, q_heads, dim)
    k = wide[..., q_heads * dim : (q_heads + k_heads) * dim].view(batch, length, k_heads, dim)
    q_weight, k_weight = (torch.rand(dim, generator=gen).add(0.5).to(dtype) for _ in range(2))
    got_q, got_k = triton_qk_rms_norm(q, k, q_weight, k_weight, 1e-6)
    want_q = head_rms_norm_reference(q.float(), q_weight.float(), 1e-6)
    want_k = head_rms_norm_reference(k.float(), k_weight.float(), 1e-6)
    return {"errors": {"q": rel(got_q, want_q), "k": rel(got_k, want_k)}}


if __name__ == "__main__":
    print_report(lambda: cases_in_dtypes(CASES, run_case))
