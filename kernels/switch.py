"""One switch for every op of ``headscope.kernels``: its Triton (and fla) path on CUDA, or its pure-torch path.

Each op's dispatcher asks :func:`triton_off` at every call; where it answers True, CUDA tensors take the same
torch paths the CPU takes (float32-capable, nothing compiled). It answers True:

* under the environment variable ``HEADSCOPE_NO_TRITON=1``, read at each call (slow; for debugging and A/B runs);
* inside a :func:`torch_paths` block, for the calls made in it (nested blocks count; the switch is the process's,
  not a thread's).

Why the block: a forward that checks a fast path against the exact model should share no kernel with it
(``benchmarks/generate_speed_report.reference_gaps``: a fault of a Triton or fla kernel then shows as gaps instead
of being in the reference too), and should not pay the Triton path's start-up: on a fresh H100 the first float32
forward of the SmolLM2 hybrid through fla spent 256 s compiling and autotuning its kernels (``phase_s`` of
``generate_speed``'s 4K x 1 essay row, 2026-12-05) before computing anything.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

ENV = "HEADSCOPE_NO_TRITON"
_blocks = 0  # torch_paths blocks entered and not yet left


def triton_off() -> bool:
    """True where the ops must take their torch paths (module docstring)."""
    return _blocks > 0 or os.environ.get(ENV, "0") == "1"


@contextmanager
def torch_paths() -> Iterator[None]:
    """Inside the block every op of ``headscope.kernels`` takes its torch path, on CUDA too."""
    global _blocks
    _blocks += 1
    try:
        yield
    finally:
        _blocks -= 1
