"""Memory-aware batching for patched runs: pick the largest batch that fits, shrink on CUDA OOM.

A batch is measured in *full rows* (one prompt over all ``T`` positions). A row that computes only
the suffix ``start..T-1`` (``headscope.patching.prefix``) costs less: its activations scale with the
suffix, plus the cached prefix keys/values its attention reads; ``row_cost`` is that share, and
``AdaptiveBatcher`` packs items by it, so short suffixes make wide batches; ``overhead_tokens`` says
when a separate batch is worth its fixed cost.
"""

from __future__ import annotations

from typing import Callable

import torch

from headscope.models import LoadedModel

# Rough activation bytes per token per d_model unit during a decoder-layer forward (q/k/v, MLP
# intermediate, norms, the patched copy); measured loosely, deliberately on the safe side.
_ACTIVATION_FACTOR = 24
_CPU_TOKEN_BUDGET = 32_768


def _row_bytes(lm: LoadedModel, seq_len: int, start: int) -> int:
    """Estimated peak bytes of one row computing positions ``start..seq_len-1`` through a decoder layer."""
    config, fp = lm.model.config, lm.fingerprint
    d_model = int(getattr(config, "hidden_size", getattr(config, "n_embd", 1024)))
    d_mlp = int(getattr(config, "intermediate_size", 4 * d_model) or 4 * d_model)
    elem = torch.finfo(lm.dtype).bits // 8
    queries = seq_len - start
    total = queries * (d_model * _ACTIVATION_FACTOR + 3 * d_mlp) * elem
    # keys/values over all positions (a suffix row gathers the cached prefix and concatenates) and
    # their repeat over the query heads
    total += seq_len * (4 * fp.n_kv_heads + 2 * fp.n_heads) * fp.head_dim * elem
    if lm.attn_implementation == "eager":
        total += fp.n_heads * queries * seq_len * 4
    return total


def overhead_tokens(lm: LoadedModel) -> int:
    """How many tokens of decoder-layer compute cost about as much as one batch's fixed cost per layer
    (kernel launches on a GPU, Python calls on a CPU): merging a batch that would waste fewer tokens
    than this into its neighbour is faster than running it alone.

    Rough constants: 0.2 ms per layer call at 300 TFLOP/s (GPU), 0.5 ms at 50 GFLOP/s (CPU); the
    per-token cost counts the q/k/v/o projections and the gated MLP (600 tokens for Qwen3-1.7B on a
    GPU, ~10 for the demo model on a CPU).
    """
    config, fp = lm.model.config, lm.fingerprint
    d_model = int(getattr(config, "hidden_size", getattr(config, "n_embd", 1024)))
    d_mlp = int(getattr(config, "intermediate_size", 4 * d_model) or 4 * d_model)
    per_token = 2 * (d_model * (2 * fp.n_heads + 2 * fp.n_kv_heads) * fp.head_dim + 3 * d_model * d_mlp)
    fixed = 0.2e-3 * 300e12 if lm.device.type == "cuda" else 0.5e-3 * 50e9
    return max(1, int(fixed / per_token))


def row_cost(lm: LoadedModel, seq_len: int, start: int) -> float:
    """The memory of a row that computes positions ``start..seq_len-1``, as a share of a full row's."""
    return _row_bytes(lm, seq_len, start) / _row_bytes(lm, seq_len, 0)


def default_batch_size(lm: LoadedModel, seq_len: int) -> int:
    """The number of full-length patched sequences to run at once.

    On CUDA: half the free memory divided by an estimate of one sequence's activation bytes
    (keys/values; eager attention adds the ``(H, T, T)`` score matrix). On CPU: a fixed token budget.

    Args:
        lm: the model.
        seq_len: prompt length ``T``.
    Returns:
        A batch size >= 1.
    """
    if lm.device.type != "cuda":
        return max(1, _CPU_TOKEN_BUDGET // seq_len)
    free, _ = torch.cuda.mem_get_info(lm.device)
    return max(1, int(0.5 * free) // _row_bytes(lm, seq_len, 0))


class AdaptiveBatcher:
    """Runs a function over index ranges, halving the batch on CUDA out-of-memory and remembering it.

    Args:
        batch_size: the starting budget, in full rows.
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size: float = batch_size

    def run(self, n_items: int, fn: Callable[[slice], torch.Tensor], on_progress: Callable[[int], None] | None = None,
            cost: torch.Tensor | None = None, breaks: list[int] | None = None) -> torch.Tensor:
        """Call ``fn(slice)`` over ``range(n_items)`` in batches and concatenate the results.

        A batch that runs out of CUDA memory is retried with half as many items (the exception is
        dropped first, so the memory its frames held is free); only a single item that does not fit
        raises.

        Args:
            n_items: how many items.
            fn: maps a slice of item indices to a ``(len(slice), ...)`` tensor.
            on_progress: called with the number of items finished after each batch.
            cost: ``(n_items,)`` each item's share of a full row (``row_cost``), non-increasing, so a
                batch's first item bounds the rest; default 1 for all.
            breaks: ascending item indices no batch reaches across (a batch ends before each).
        Returns:
            ``(n_items, ...)`` the concatenated results.
        """
        outputs: list[torch.Tensor] = []
        start = 0
        while start < n_items:
            width = 1.0 if cost is None else float(cost[start])
            size = max(1, int(self.batch_size / width + 1e-9))
            stop = min([start + size, n_items] + [b for b in breaks or () if b > start][:1])
            try:
                outputs.append(fn(slice(start, stop)))
                failed = False
            except torch.cuda.OutOfMemoryError:
                if stop - start == 1:
                    raise
                failed = True
            if failed:  # outside the except block: the traceback and its tensors are gone
                self.batch_size = (stop - start) // 2 * width  # half the rows that failed
                if torch.cuda.is_available():
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
