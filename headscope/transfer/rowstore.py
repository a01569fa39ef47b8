"""Demo-corpus rows shared by several transfer runs: generated once, by a pool of forked processes.

``DemoCorpusRows`` (``headscope.transfer.data``) builds row ``i`` of a stream from ``(seed, i)`` alone, in
pure Python (a few ms per 1024-token row). Runs that train on the same streams (the arms of
``benchmarks/hybrid_quality.py``: same seed, same stages) read the same rows, so ``RowStore`` keeps every
row it has served and ``fill`` generates the rows a run will need in parallel, ahead of the run.

``RowStore.stream(split, stage, seq_len)`` is a ``SequenceSource`` for ``TransferTrainer``: the library's
own demo-corpus streams (``sequence_source``, so seeds and the held-out stream are the library's) with
rows served from the store; a row that is not stored yet is generated on the spot, so the rows are
exactly ``DemoCorpusRows``' whether or not ``fill`` ran (a test compares them).

The pool uses the ``fork`` start method and is created in ``__init__``: create the store before CUDA is
initialised. Its workers only run the corpus generator (Python and NumPy), never torch kernels.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import numpy as np
import torch

from headscope.transfer.config import DataConfig
from headscope.transfer.data import DemoCorpusRows, sequence_source

_WORKER_STATE: dict = {}


def _worker_rows(task):
    """Pool task: the given rows of the demo-corpus stream ``(seed, seq_len)``, as int32."""
    seed, seq_len, indices = task
    key = (seed, seq_len)
    if key not in _WORKER_STATE:
        _WORKER_STATE[key] = DemoCorpusRows(_WORKER_STATE["tokenizer"], seq_len, seed)
    rows = _WORKER_STATE[key]
    return key, indices, np.stack([rows[i].numpy() for i in indices]).astype(np.int32)


class CachedRows:
    """A ``DemoCorpusRows`` stream whose rows come from a shared store (generated and stored on a miss).

    Args:
        rows: the library's stream (``seed``, ``seq_len``, ``[i] -> (seq_len,)`` int64).
        store: row index -> row, shared by every ``CachedRows`` of the same ``(seed, seq_len)``.
    """

    preshuffled = True

    def __init__(self, rows: DemoCorpusRows, store: dict[int, torch.Tensor]) -> None:
        self.rows, self.store, self.seq_len = rows, store, rows.seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.store:
            self.store[index] = self.rows[index]
        return self.store[index]


class RowStore:
    """Demo-corpus rows of every stream, kept for every run that reads them (see the module docstring).

    Args:
        data_config: a ``DataConfig`` with ``source: demo_corpus``.
        seed: the run seed (the library derives each stage's stream seed from it).
        tokenizer: the model's tokenizer (the demo model's word-level one).
        workers: processes of the generation pool (0: generate in this process).
    """

    def __init__(self, data_config: DataConfig, seed: int, tokenizer: Any, workers: int) -> None:
        if data_config.source != "demo_corpus":
            raise ValueError("RowStore serves the demo corpus (data.source: demo_corpus) only")
        self.base = sequence_source(data_config, seed, tokenizer)
        self.streams: dict[tuple[str, int, int], DemoCorpusRows] = {}
        self.store: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (stream seed, seq_len) -> row index -> (seq_len,)
        _WORKER_STATE["tokenizer"] = tokenizer
        self.pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None

    def stream(self, split: str, stage: int, seq_len: int) -> CachedRows:
        """The rows of ``split`` ("train"/"heldout") for stage ``stage`` at ``seq_len`` (a ``SequenceSource``)."""
        key = (split, stage, seq_len)
        if key not in self.streams:
            self.streams[key] = self.base(split, stage, seq_len)
        rows = self.streams[key]
        return CachedRows(rows, self.store.setdefault((rows.seed, rows.seq_len), {}))

    def fill(self, needs: list[tuple[str, int, int, int]], chunk: int = 16) -> tuple[float, int]:
        """Generate rows ``0..n-1`` of each ``(split, stage, seq_len, n)`` not stored yet.

        Returns:
            (seconds taken, tokens generated).
        """
        started = time.perf_counter()
        wanted: dict[tuple[int, int], int] = {}
        streams: dict[tuple[int, int], CachedRows] = {}
        for split, stage, seq_len, n in needs:
            rows = self.stream(split, stage, seq_len)
            key = (rows.rows.seed, seq_len)
            wanted[key], streams[key] = max(wanted.get(key, 0), n), rows
        tasks, tokens = [], 0
        for key, n in wanted.items():
            missing = [i for i in range(n) if i not in streams[key].store]
            tokens += len(missing) * key[1]
            if self.pool is None:
                for index in missing:
                    streams[key][index]
            else:
                tasks += [(key[0], key[1], missing[s : s + chunk]) for s in range(0, len(missing), chunk)]
        if tasks:
            for key, indices, block in self.pool.imap_unordered(_worker_rows, tasks):
                for index, row in zip(indices, block):
                    self.store[key].setdefault(index, torch.from_numpy(row.astype(np.int64)))
        return time.perf_counter() - started, tokens

    def close(self) -> None:
        """Stop the pool (the stored rows stay)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
