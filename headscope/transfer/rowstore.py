"""Demo-corpus rows shared by several transfer runs: generated once, by a pool of forked processes.

``DemoCorpusRows`` (``headscope.transfer.data``) builds row ``i`` of a stream from ``(seed, i)`` alone, in
pure Python (a few ms per 1024-token row). Runs that train on the same streams (the arms of
``benchmarks/hybrid_quality.py``: same seed, same stages) read the same rows, so ``RowStore`` keeps every
row it has served and ``fill`` generates the rows a run will need in parallel, ahead of the run.

``RowStore.source(seed)`` is a ``SequenceSource`` for ``TransferTrainer``: the library's own demo-corpus
streams of a run with that seed (``sequence_source``, so stream seeds and the held-out stream are the
library's) with rows served from the store; a row that is not stored yet is generated on the spot, so
the rows are exactly ``DemoCorpusRows``' whether or not ``fill`` ran (a test compares them). Runs with
different seeds (transfer seeds) read different streams; runs with the same seed share them.

``FileRows`` is the same interface for data files (``data.source: files``): read, tokenised and split
once for every run; the run seed does not change the sequences (it seeds their shuffle in ``StageData``).
Its ``stream`` also packs the documents of one kind alone (``kind``; the .jsonl ``kind`` field), and
``kinds`` counts the documents of each kind on a side.

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
from headscope.transfer.data import DemoCorpusRows, FileSequences, SequenceSource, sequence_source

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
        self.data_config, self.seed, self.tokenizer = data_config, seed, tokenizer
        self.bases: dict[int, SequenceSource] = {}  # run seed -> the library's streams of that run
        self.streams: dict[tuple[int, str, int, int], DemoCorpusRows] = {}
        self.store: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (stream seed, seq_len) -> row index -> (seq_len,)
        _WORKER_STATE["tokenizer"] = tokenizer
        self.pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None

    def stream(self, split: str, stage: int, seq_len: int, seed: int | None = None) -> CachedRows:
        """The rows of ``split`` ("train"/"heldout") for stage ``stage`` at ``seq_len`` of the run seeded
        ``seed`` (default: the store's seed)."""
        seed = self.seed if seed is None else seed
        key = (seed, split, stage, seq_len)
        if key not in self.streams:
            if seed not in self.bases:
                self.bases[seed] = sequence_source(self.data_config, seed, self.tokenizer)
            self.streams[key] = self.bases[seed](split, stage, seq_len)
        rows = self.streams[key]
        return CachedRows(rows, self.store.setdefault((rows.seed, rows.seq_len), {}))

    def source(self, seed: int | None = None) -> SequenceSource:
        """The ``SequenceSource`` of a run seeded ``seed`` (default: the store's seed)."""
        return lambda split, stage, seq_len: self.stream(split, stage, seq_len, seed)

    def fill(self, needs: list[tuple[str, int, int, int]], chunk: int = 16, seed: int | None = None) -> tuple[float, int]:
        """Generate rows ``0..n-1`` of each ``(split, stage, seq_len, n)`` of the run seeded ``seed`` not stored yet.

        Returns:
            (seconds taken, tokens generated).
        """
        started = time.perf_counter()
        wanted: dict[tuple[int, int], int] = {}
        streams: dict[tuple[int, int], CachedRows] = {}
        for split, stage, seq_len, n in needs:
            rows = self.stream(split, stage, seq_len, seed)
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


class FileRows:
    """Data files (``data.source: files``) for every run, with ``RowStore``'s interface (see the module docstring).

    Args:
        data_config: a ``DataConfig`` with ``source: files``.
        tokenizer: the model's tokenizer (for text documents).
        vocab_size: ids at or above it are an error.
    """

    def __init__(self, data_config: DataConfig, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.base: FileSequences = sequence_source(data_config, 0, tokenizer, vocab_size)  # files: the run seed does not enter

    def stream(self, split: str, stage: int, seq_len: int, seed: int | None = None, kind: str | None = None):
        """The packed training or held-out sequences at ``seq_len`` (the same for every seed and stage); with
        ``kind``, those of the documents of that kind only."""
        return self.base(split, stage, seq_len, kind)

    def kinds(self, split: str) -> dict[str, int]:
        """Documents per kind on ``split`` ("train"/"heldout")."""
        return self.base.kinds(split)

    def source(self, seed: int | None = None) -> SequenceSource:
        return self.base

    def fill(self, needs: list[tuple[str, int, int, int]], chunk: int = 16, seed: int | None = None) -> tuple[float, int]:
        """Nothing to generate: (0 seconds, 0 tokens)."""
        return 0.0, 0

    def close(self) -> None:
        """Nothing to stop."""
