"""Host-side helpers of the Triton launchers: launch-grid arithmetic and the GPU's SM count, cheaply.

Why: at batch 1 and a few thousand tokens the hybrid layer's attention core is bound by the host (the H200 run of
``benchmarks/gdn_prefill_speed.py``: 0.57 ms to enqueue against 0.42 ms of GPU work at 4K), so every microsecond
of Python around a launch counts. Since Triton 3.5, ``triton.cdiv`` and ``triton.next_power_of_2`` are
``constexpr_function`` objects: a host call unwraps its arguments through the JIT's machinery and costs ~2 us
(against ~0.1 us for the arithmetic), and a prefill call of the hybrid core made 14 of them. The launchers on
the prefill path use these plain-integer twins instead (same results for positive ints; a test checks them
against Triton's).

``last_dim_contiguous(x)``: ``x`` as it is when its rows are contiguous (strided views pass without a copy).
``sm_count(device)``: the GPU's streaming multiprocessors, read once per device; on the CPU (the Triton
interpreter, where the tests run the kernels) the 132 of an H100/H200, so configs chosen by grid size are the
ones those GPUs get.
"""

from __future__ import annotations

import functools

import torch

INTERPRETER_SM_COUNT = 132  # H100 SXM / H200


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for positive ints (``triton.cdiv`` without its host overhead)."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` for ``n >= 1`` (``triton.next_power_of_2`` without its host overhead)."""
    return 1 << (n - 1).bit_length()


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (what the launchers need), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``INTERPRETER_SM_COUNT`` for the CPU."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count
