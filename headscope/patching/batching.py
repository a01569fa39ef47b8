"""Memory-aware batching for patched runs: pick the largest batch that fits, shrink on CUDA OOM."""

from __future__ import annotations

from typing import Callable

import torch

from headscope.models import LoadedModel

# Rough activation bytes per token per d_model unit during a decoder-layer forward (q/k/v, MLP
# intermediate, norms, the patched copy); measured loosely, deliberately on the safe side.
_ACTIVATION_FACTOR = 24
_CPU_TOKEN_BUDGET = 32_768


def default_batch_size(lm: LoadedModel, seq_len: int) -> int:
    """The number of patched sequences to run at once.

    On CUDA: half the free memory divided by an estimate of one sequence's activation bytes
    (eager attention adds the ``(H, T, T)`` score matrix). On CPU: a fixed token budget.

    Args:
        lm: the model.
        seq_len: prompt length ``T``.
    Returns:
        A batch size >= 1.
    """
    if lm.device.type != "cuda":
        return max(1, _CPU_TOKEN_BUDGET // seq_len)
    config = lm.model.config
    d_model = int(getattr(config, "hidden_size", getattr(config, "n_embd", 1024)))
    d_mlp = int(getattr(config, "intermediate_size", 4 * d_model) or 4 * d_model)
    elem = torch.finfo(lm.dtype).bits // 8
    per_seq = seq_len * (d_model * _ACTIVATION_FACTOR + 3 * d_mlp) * elem
    if lm.attn_implementation == "eager":
        per_seq += lm.fingerprint.n_heads * seq_len * seq_len * 4
    free, _ = torch.cuda.mem_get_info(lm.device)
    return max(1, int(0.5 * free) // per_seq)


class AdaptiveBatcher:
    """Runs a function over index ranges, halving the batch on CUDA out-of-memory and remembering it.

    Args:
        batch_size: the starting batch size.
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def run(self, n_items: int, fn: Callable[[slice], torch.Tensor], on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Call ``fn(slice)`` over ``range(n_items)`` in batches and concatenate the results.

        Args:
            n_items: how many items.
            fn: maps a slice of item indices to a ``(len(slice), ...)`` tensor.
            on_progress: called with the number of items finished after each batch.
        Returns:
            ``(n_items, ...)`` the concatenated results.
        """
        outputs: list[torch.Tensor] = []
        start = 0
        while start < n_items:
            stop = min(start + self.batch_size, n_items)
            try:
                outputs.append(fn(slice(start, stop)))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                continue
            if on_progress is not None:
                on_progress(stop - start)
            start = stop
        return torch.cat(outputs)


def whole_units(bar, items_per_unit: int) -> Callable[[int], None]:
    """An ``on_progress`` callback that moves a progress bar counted in units (heads) as items (patched runs,
    ``items_per_unit`` per head) finish, by whole units only: the bar reads ``4/8``, never ``4.0/8``."""
    done = 0

    def advance(n_items: int) -> None:
        nonlocal done
        before, done = done // items_per_unit, done + n_items
        bar.update(done // items_per_unit - before)

    return advance
