"""Training text for the transfer stages: documents, a deterministic held-out split and sequence packing.

Documents come from files (``data.source: files``; ``demo_corpus`` instead generates rows of the demo
model's corpus, see ``DemoCorpusRows``):

* ``*.txt``: one document per file, tokenised with the model's tokenizer (no special tokens);
* ``*.jsonl``: one document per line, ``{"text": "..."}`` (tokenised) or ``{"input_ids": [...]}``, with an
  optional ``"kind"`` string kept as the document's kind (e.g. ``sampled`` / ``essay`` / ``tasks`` of
  ``benchmarks/real_transfer_data.py``); .txt and .bin documents have none;
* ``*.bin``: a flat stream of ``uint16``/``uint32`` token ids (``data.bin_dtype``), memory-mapped and cut
  into pseudo-documents of ``data.bin_doc_tokens`` tokens (only the split needs documents).

Directories are searched recursively; files are taken in sorted path order. Every document has a key
(``path#index``: the line of a .jsonl, the block of a .bin, 0 for a .txt). The held-out split is a pure
function of the keys, never of random state:

* ``hash``: a document is held out when ``sha256(key)`` mapped to [0, 1) is below ``heldout_fraction``;
  adding or removing other files never moves a document between the two sides;
* ``fraction``: the last ``ceil(fraction * n_documents)`` documents in key order are held out.

Packing: the documents of one side are concatenated (text documents each followed by the ``eos`` id;
.bin blocks are already a stream) and cut into sequences of exactly ``seq_len`` tokens, dropping the
tail; attention runs across document boundaries inside a sequence, as in ordinary LM pre-training.
Sequence ``i`` is read on demand (``PackedSequences[i]``), so .bin data stays memory-mapped.
``FileSequences`` packs one side at a stage's length, or only the documents of one kind of it, in the
same order and the same way (for a held-out loss per kind; training always packs every document).

Batches are a pure function of (seed, stage, step): epoch ``e`` visits the training sequences in a
permutation drawn from a generator seeded with ``(seed, stage, e)``, and the batch of step ``s`` is the
global positions ``s * batch_size ... (s + 1) * batch_size - 1`` of that endless stream. Resuming at
step ``s`` therefore needs no data-loader state, and the rows of one global batch are split over the
processes of a distributed run in rank order.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from headscope.heads import HeadscopeError, read_jsonl, read_text
from headscope.transfer.config import DataConfig

SUFFIXES = (".txt", ".jsonl", ".bin")


@dataclass(frozen=True)
class Document:
    """One document: its split key, its token ids, whether an eos id follows it when packed, and its kind."""

    key: str
    tokens: np.ndarray  # (n,) integer ids; a memmap view for .bin data
    separated: bool = True
    kind: str | None = None  # a .jsonl record's "kind"; None for .txt, .bin and records without one


def _expand(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, root) pairs for every data file under ``paths``, in sorted order."""
    files: list[tuple[Path, Path]] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise HeadscopeError(f"data path {path} holds no .txt, .jsonl or .bin files")
            files += [(p, path) for p in found]
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise HeadscopeError(f"data file {path}: unsupported type {path.suffix!r} (use .txt, .jsonl or .bin)")
            files.append((path, path.parent))
        else:
            raise HeadscopeError(f"data path not found: {path}")
    return files


def _encode(tokenizer: Any, text: str, where: str) -> np.ndarray:
    if tokenizer is None:
        raise HeadscopeError(f"{where} holds text, but the model has no tokenizer (set 'tokenizer' in the config)")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _jsonl_documents(path: Path, name: str, tokenizer: Any) -> list[Document]:
    docs = []
    for number, where, record in read_jsonl(path, "data"):
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            ids = record["input_ids"]
            if not all(isinstance(i, int) and i >= 0 for i in ids):
                raise HeadscopeError(f"{where}: 'input_ids' must be a list of non-negative integers")
            tokens = np.asarray(ids, dtype=np.int64)
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            tokens = _encode(tokenizer, record["text"], where)
        else:
            raise HeadscopeError(f"{where}: expected an object with 'text' (string) or 'input_ids' (list)")
        kind = record.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise HeadscopeError(f"{where}: 'kind' must be a string")
        if len(tokens):
            docs.append(Document(f"{name}#{number - 1}", tokens, kind=kind))
    return docs


def data_files(data: DataConfig) -> dict[str, int]:
    """Every data file a run reads, with its size in bytes (``{}`` for the demo corpus): what a resumed run must
    find unchanged to continue with the same documents in the same order."""
    if data.source == "demo_corpus":
        return {}
    return {str(path): path.stat().st_size for path, _ in _expand(data.paths)}


def read_documents(data: DataConfig, tokenizer: Any = None, vocab_size: int | None = None) -> list[Document]:
    """Every document of ``data.paths`` in key order.

    Args:
        data: the data section of the run config.
        tokenizer: a Hugging Face tokenizer for .txt files and ``text`` records.
        vocab_size: when given, ids outside ``[0, vocab_size)`` raise an error.
    Returns:
        The documents; empty ones are skipped.
    """
    docs: list[Document] = []
    for path, root in _expand(data.paths):
        name = path.relative_to(root).as_posix()
        first = len(docs)
        if path.suffix == ".txt":
            tokens = _encode(tokenizer, read_text(path, "data"), str(path))
            if len(tokens):
                docs.append(Document(f"{name}#0", tokens))
        elif path.suffix == ".jsonl":
            docs += _jsonl_documents(path, name, tokenizer)
        else:
            dtype = np.dtype(data.bin_dtype)
            if path.stat().st_size % dtype.itemsize:
                raise HeadscopeError(f"{path}: size {path.stat().st_size} is not a multiple of {dtype.itemsize} ({data.bin_dtype})")
            if path.stat().st_size == 0:
                continue
            stream = np.memmap(path, dtype=dtype, mode="r")
            block = data.bin_doc_tokens
            docs += [Document(f"{name}#{i}", stream[i * block : (i + 1) * block], separated=False) for i in range(math.ceil(len(stream) / block))]
            top = int(stream.max())
            if vocab_size is not None and top >= vocab_size:
                raise HeadscopeError(f"{path} holds token id {top} >= the model's vocab size {vocab_size} (is bin_dtype right?)")
            continue
        for doc in docs[first:]:
            if vocab_size is not None and doc.tokens.max() >= vocab_size:  # ids are >= 0 by construction
                raise HeadscopeError(f"document {doc.key} has token id {int(doc.tokens.max())} >= the model's vocab size {vocab_size}")
    if not docs:
        raise HeadscopeError(f"the data paths {', '.join(data.paths)} hold no tokens")
    return docs


def key_fraction(key: str) -> float:
    """``sha256(key)`` mapped to [0, 1): the hash split's coordinate of one document."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], method: str, fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic train / held-out split (see the module docstring).

    Returns:
        ``(train, heldout)``, each in the input order.
    """
    if method == "hash":
        held = [key_fraction(d.key) < fraction for d in docs]
    elif method == "fraction":
        n_held = math.ceil(fraction * len(docs))
        held = [i >= len(docs) - n_held for i in range(len(docs))]
    else:
        raise HeadscopeError(f"unknown held-out method {method!r} (use 'hash' or 'fraction')")
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    if not train:
        raise HeadscopeError(f"the held-out split ({method}, fraction {fraction}) leaves no training documents")
    return train, heldout


class PackedSequences:
    """Documents packed into sequences of ``seq_len`` tokens, read on demand.

    Args:
        docs: documents in packing order.
        seq_len: tokens per sequence.
        eos_id: id appended after each ``separated`` document (None: no separator).
    """

    def __init__(self, docs: list[Document], seq_len: int, eos_id: int | None) -> None:
        self.docs, self.seq_len, self.eos_id = docs, seq_len, eos_id
        lengths = [len(d.tokens) + (1 if d.separated and eos_id is not None else 0) for d in docs]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n_docs + 1,)
        self.n_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n_tokens // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        """Sequence ``index`` as a ``(seq_len,)`` int64 tensor."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} of {len(self)}")
        begin, end = index * self.seq_len, (index + 1) * self.seq_len
        pieces = []
        doc = bisect.bisect_right(self.starts, begin) - 1
        position = begin
        while position < end:
            offset = position - int(self.starts[doc])
            tokens = self.docs[doc].tokens
            if offset < len(tokens):
                piece = np.asarray(tokens[offset : offset + end - position], dtype=np.int64)
            else:  # the separator slot after the document
                piece = np.asarray([self.eos_id], dtype=np.int64)
            pieces.append(piece)
            position += len(piece)
            if position >= int(self.starts[doc + 1]):
                doc += 1
        return torch.from_numpy(np.concatenate(pieces))


class DemoCorpusRows:
    """Rows of the demo model's generated corpus (``headscope.zoo.corpus``) as a sequence source.

    Row ``i`` is ``RowBuilder.build(row_rng(seed, i))`` cut to ``seq_len`` ids (the corpus's answer loss
    weights are not used: every transfer loss weighs tokens equally). The corpus is generated, so
    there are no documents to hold out: training rows of stage ``k`` come from the stream seeded
    ``run_seed * 1000 + k`` and held-out rows from the stream seeded ``-(run_seed + 1)``, which no stage
    trains on. The rows are random draws already, so ``StageData`` reads them in order (``preshuffled``).

    Args:
        tokenizer: the model's tokenizer (the demo model's word-level tokenizer).
        seq_len: ids per row.
        seed: the row stream's seed.
        n_rows: rows addressable (the stream is endless; this bounds ``len``).
    """

    preshuffled = True

    def __init__(self, tokenizer: Any, seq_len: int, seed: int, n_rows: int = 1 << 40) -> None:
        from headscope.zoo.corpus import CorpusConfig, Haystack, RowBuilder
        from headscope.zoo.multiquery import sample_training_task

        if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
            raise HeadscopeError("data.source demo_corpus needs the model's tokenizer with an eos token")
        core = tokenizer.backend_tokenizer
        encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731
        self.builder = RowBuilder(encode, tokenizer.eos_token_id, sample_training_task, Haystack.essay(encode),
                                  CorpusConfig(seq_len=seq_len - 1))
        self.seq_len, self.seed, self.n_rows = seq_len, seed, n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> torch.Tensor:
        from headscope.zoo.corpus import row_rng

        ids, _, _ = self.builder.build(row_rng(self.seed, index))  # (seq_len,) int64
        return torch.from_numpy(ids)


def text_rows(path: str | Path, tokenizer: Any, seq_lens: Sequence[int], n_rows: int, vocab_size: int | None = None) -> dict[int, torch.Tensor]:
    """``{seq_len: (n, seq_len)}``: for each length, the first ``n = min(n_rows, available)`` rows of a .txt /
    .jsonl file's documents (read once), packed in file order like training data (eos between documents):
    evaluation-only text, never split or trained on. Raises HeadscopeError when the file holds no
    document or no full row of a length."""
    docs = read_documents(DataConfig(source="files", paths=[str(path)]), tokenizer, vocab_size)
    rows = {}
    for seq_len in seq_lens:
        sequences = PackedSequences(docs, seq_len, getattr(tokenizer, "eos_token_id", None))
        if not len(sequences):
            raise HeadscopeError(f"{path} holds {sequences.n_tokens} tokens, not one row of {seq_len}")
        rows[seq_len] = torch.stack([sequences[i] for i in range(min(n_rows, len(sequences)))])
    return rows


SequenceSource = Callable[[str, int, int], Any]  # (split "train"/"heldout", stage index, seq_len) -> sequences


def separator_note(data: DataConfig, tokenizer: Any) -> str | None:
    """A note when file documents will be packed with nothing between them (no ``data.eos_id`` and a tokenizer
    without an eos token): each document then runs straight into the next, which the model has never seen."""
    if data.source == "demo_corpus" or data.eos_id is not None or getattr(tokenizer, "eos_token_id", None) is not None:
        return None
    return ("the tokenizer has no eos token and data.eos_id is not set: documents are packed back to back with no "
            "separator between them (set data.eos_id to the id that ends a document)")


def sequence_source(data: DataConfig, run_seed: int, tokenizer: Any = None, vocab_size: int | None = None) -> SequenceSource:
    """The training / held-out sequences of every stage for a run's ``data`` section.

    Files are read and split once; each call packs them at the stage's length. The demo corpus
    generates rows from per-stage seeds (see ``DemoCorpusRows``).

    Returns:
        ``source(split, stage_index, seq_len)`` giving an object with ``len`` and ``[i] -> (seq_len,)``.
    """
    if data.source == "demo_corpus":
        return lambda split, stage, seq_len: DemoCorpusRows(tokenizer, seq_len, run_seed * 1000 + stage if split == "train" else -(run_seed + 1))
    train, heldout = split_documents(read_documents(data, tokenizer, vocab_size), data.heldout_method, data.heldout_fraction)
    eos = data.eos_id if data.eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not 0 <= eos < (vocab_size if vocab_size is not None else eos + 1):
        raise HeadscopeError(f"data.eos_id {eos} is not a token id of the model (vocab size {vocab_size})")
    return FileSequences(train, heldout, eos)


class FileSequences:
    """The ``SequenceSource`` of data files: each side of the split packed at the asked length.

    Args:
        train, heldout: the documents of each side (``split_documents``).
        eos_id: the separator id after each ``separated`` document (None: no separator).
    """

    def __init__(self, train: list[Document], heldout: list[Document], eos_id: int | None) -> None:
        self.sides = {"train": train, "heldout": heldout}
        self.eos_id = eos_id

    def __call__(self, split: str, stage: int, seq_len: int, kind: str | None = None) -> PackedSequences:
        """The documents of ``split`` ("train"/"heldout"; the stage does not enter), or only those of ``kind``,
        packed into sequences of ``seq_len`` in their split order."""
        docs = self.sides[split]
        return PackedSequences(docs if kind is None else [d for d in docs if d.kind == kind], seq_len, self.eos_id)

    def kinds(self, split: str) -> dict[str, int]:
        """Documents per kind on one side, in order of first appearance (documents without a kind not counted)."""
        counts: dict[str, int] = {}
        for doc in self.sides[split]:
            if doc.kind is not None:
                counts[doc.kind] = counts.get(doc.kind, 0) + 1
        return counts


class EpochShuffler:
    """The endless stream of sequence indices: epoch ``e`` is a permutation seeded by ``(seed, e)``."""

    def __init__(self, n_sequences: int, seed: int) -> None:
        if n_sequences < 1:
            raise HeadscopeError("no training sequence to shuffle")
        self.n, self.seed = n_sequences, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=generator)}  # keep one epoch
        return self._cache[epoch]

    def positions(self, start: int, count: int) -> list[int]:
        """Sequence indices at stream positions ``start ... start + count - 1``."""
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(start, start + count)]


class StageData:
    """The batches of one stage: training sequences (shuffled) and the fixed held-out evaluation set.

    Args:
        train, heldout: packed sequences (any objects with ``len`` and ``[i] -> (seq_len,)`` tensors).
        seed: the stage's shuffle seed.
        eval_sequences: held-out sequences per evaluation (the first ones, in order).
    """

    def __init__(self, train: Any, heldout: Any, seed: int, eval_sequences: int) -> None:
        if len(train) < 1:
            raise HeadscopeError(f"the training data holds fewer tokens than one sequence of {train.seq_len}")
        self.train, self.heldout = train, heldout
        self.shuffler = None if getattr(train, "preshuffled", False) else EpochShuffler(len(train), seed)
        self.n_eval = min(eval_sequences, len(heldout)) if heldout is not None else 0

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This process's rows of global batch ``step``: ``(batch_size // world_size, seq_len)`` int64."""
        per_rank = batch_size // world_size
        start = step * batch_size + rank * per_rank
        if self.shuffler is None:
            indices = [p % len(self.train) for p in range(start, start + per_rank)]
        else:
            indices = self.shuffler.positions(start, per_rank)
        return torch.stack([self.train[i] for i in indices])

    def eval_rows(self, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
        """This process's share of the held-out evaluation sequences, ``(n_rows, seq_len)``, or None.

        Every process gets the same number of rows, ``max(1, n_eval // world_size)``: rows
        ``rank, rank + world_size, ...`` (indices modulo ``n_eval``), so the held-out set is cut to a
        multiple of the process count (or repeated when it holds fewer sequences than processes).
        """
        if self.n_eval == 0:
            return None
        per_rank = max(1, self.n_eval // world_size)
        return torch.stack([self.heldout[(rank + world_size * j) % self.n_eval] for j in range(per_rank)])
