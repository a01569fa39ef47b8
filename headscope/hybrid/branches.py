"""The two branches of a hybrid layer's attention core, one after the other or concurrently on two CUDA streams.

The GDN chunk kernel leaves most of the GPU idle at batch 1 (its inter-chunk recurrence is sequential over the
sequence's chunks), so the FA branch can fill it from a second stream. ``should_overlap`` decides per call
(``HeadwiseHybridAttention.overlap_branches``: True, False or "auto"; "auto" overlaps while a CUDA graph is
being captured, where it costs nothing at replay, and for eager calls of at least ``OVERLAP_MIN_TOKENS``
tokens: measured on the H100, two streams made 16K-token prefill slower and 64K-128K 7-9% faster, eager decode
10% slower; ``benchmarks/results/hybrid_speed.md``). ``run_branches`` runs them.
"""

from __future__ import annotations

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
OVERLAP_MIN_TOKENS = 32768  # "auto" overlaps eager calls from here: between the measured 16K (slower) and 64K (faster)


def should_overlap(setting: bool | str, x: torch.Tensor) -> bool:
    """Whether ``core`` runs its branches on two streams (``overlap_branches``: True, False or "auto")."""
    if setting is False or not x.is_cuda or torch.is_grad_enabled():
        return False
    return setting is True or x.shape[0] * x.shape[1] >= OVERLAP_MIN_TOKENS or torch.cuda.is_current_stream_capturing()


def run_branches(branches: list, overlap: bool, second_first: bool = False) -> list[torch.Tensor]:
    """Run the branch closures and return their outputs, in order (without ``overlap``, ``second_first`` runs
    the last branch first).

    With ``overlap`` (CUDA, inference only) and two branches, the second runs on a side stream that
    first waits for the current stream; the current stream then waits for it, and the second output is
    recorded on the current stream for the caching allocator. The GDN chunk kernel leaves most of the
    GPU idle at batch 1 (its inter-chunk recurrence is sequential), so the FA branch fills it. Without
    ``overlap`` the same closures run one after the other: the exact twin (same kernels, same results).
    """
    if not overlap or len(branches) < 2:
        step = -1 if second_first else 1
        return [branch() for branch in branches[::step]][::step]
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(device=main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        second = branches[1]()
    first = branches[0]()
    main.wait_stream(side)
    second.record_stream(main)
    return [first, second]
