"""The demo model's training corpus: haystack filler with probe tasks embedded, packed into rows.

The corpus is generated, never stored. Every task instance comes from a sampler
``(name, rng, n_filler_words) -> (prompt_text, answer_text)`` or ``-> [(text, answer), ...]`` (several
question-answer turns, e.g. ``headscope.zoo.multiquery``); the demo model uses
``headscope.probes.tasks.sample_task_text``, the same sampler the probes use, so training text and probe
prompts share one surface format. A document is
either plain haystack text or 1..``max_tasks_per_doc`` task instances (prompt then answer) in a row. Rows
of ``seq_len + 1`` token ids are filled with documents separated by ``<eos>``:

* every row starts at a document start (position 0, no BOS, like a probe prompt); the first document of
  a row fills the whole row with probability ``full_row_prob``, so answers at every position up to
  ``seq_len`` are seen; other documents take a random length up to what is left;
* a task document never gets cut: if it comes out too long it is resampled with less filler, and the
  short tail of a row is haystack text;
* the loss weight of a target token is ``answer_weight`` where the target is part of an answer, else 1;
  ``answer_task`` marks those targets with the task's index (``-1`` elsewhere) for per-task accuracy.

Row ``i`` of a stream with seed ``s`` is drawn from ``random.Random(f"headscope-corpus:{s}:{i}")`` alone, so
the stream is the same for any number of data-loader workers, and a run can resume at any batch.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from headscope.heads import HeadscopeError

if TYPE_CHECKING:
    from headscope.probes.surface import Surface

# Tasks that need a key matched before a value is copied (multi-key needles, key-value recall, multi-hop
# binding) get more weight: they are the slowest to learn. The single needle and IOI are learnt early.
# "mqar" and "mqar_dense" (headscope.zoo.multiquery) ask many questions per document: the dense signal for
# key matching; "mqar" needs rows of 1024, "mqar_dense" fits short rows. "hop_ladder" is multihop with
# 0-2 hops; "hop_queries" asks about many variables of 2-4 chains at once, "hop_steps" asks each right
# after its statement: the documents with which the demo model learnt multihop (see its HISTORY.md).
DEFAULT_TASK_WEIGHTS = {
    "needle_single": 0.5,
    "needle_multikey": 1.5,
    "kv_recall": 1.5,
    "induction": 1.0,
    "multihop": 2.5,
    "ioi": 0.5,
    "comparison": 1.0,
    "mqar": 2.0,
    "mqar_dense": 0.5,
    "hop_ladder": 0.25,
    "hop_queries": 2.0,
    "hop_steps": 4.0,
}
# The short-row phase of the demo model's curriculum (same tasks, same order): weighted towards the
# key-matching tasks, learnt at short range before they must work across 1024 tokens. These are draw
# weights: the tasks of a document are drawn first and its budget sized to hold them, but a task too long
# for what is left of a row gives way to one that fits (``task_mix`` measures the realised shares; with
# the demo tokenizer, in 256-token rows mqar_dense ends up near 12% of documents instead of 18%, multihop
# near 21% instead of 15%).
SHORT_PHASE_TASK_WEIGHTS = DEFAULT_TASK_WEIGHTS | {"needle_single": 0.25, "ioi": 0.25, "comparison": 0.5, "mqar": 0.0, "mqar_dense": 3.0,
                                                   "hop_ladder": 0.5, "hop_queries": 2.0, "hop_steps": 4.0}
SHORT_PHASE_FILLER_FILL = 0.25  # short-phase documents carry little haystack: more answers per row

TaskSampler = Callable[[str, random.Random, int], "tuple[str, str] | list[tuple[str, str]]"]


def as_turns(sample: "tuple[str, str] | list[tuple[str, str]]") -> list[tuple[str, str]]:
    """A sampler's output as a list of ``(text, answer)`` turns."""
    return [sample] if isinstance(sample, tuple) else list(sample)


@dataclass(frozen=True)
class CorpusConfig:
    """How documents are drawn and packed.

    Attributes:
        seq_len: tokens a row feeds the model (rows hold ``seq_len + 1`` ids: inputs and shifted targets).
        task_weights: relative frequency of each task among task instances.
        filler_doc_prob: probability that a document is plain haystack text.
        max_tasks_per_doc: task instances in one document are 1..this, fewer more likely.
        full_row_prob: probability that a row's first document is sized to fill the whole row.
        min_doc_tokens: below this many free tokens the row is finished with haystack text.
        answer_weight: loss weight of answer targets (other targets weigh 1).
        filler_fill: share of a task document's spare budget filled with haystack text (1: the document
            fills its budget; lower: shorter documents, more of them per row, denser answers).
    """

    seq_len: int = 1024
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    filler_doc_prob: float = 0.08
    max_tasks_per_doc: int = 3
    full_row_prob: float = 0.35
    min_doc_tokens: int = 48
    answer_weight: float = 5.0
    filler_fill: float = 1.0

    @property
    def task_names(self) -> list[str]:
        return list(self.task_weights)


class Haystack:
    """Filler text as a list of words; windows of it are plain-text documents.

    Args:
        text: the filler (for the demo model: the probes' essay haystack).
        tokens_per_word: mean tokens per whitespace word of ``text`` under the model's tokenizer.
    """

    def __init__(self, text: str, tokens_per_word: float) -> None:
        self.words = text.split()
        if len(self.words) < 2000:
            raise HeadscopeError(f"the haystack has only {len(self.words)} words; at least 2000 are needed")
        self.tokens_per_word = tokens_per_word

    def window(self, rng: random.Random, n_words: int) -> str:
        """``n_words`` consecutive words from a random place (wrapping around at the end)."""
        start = rng.randrange(len(self.words))
        end = start + n_words
        if end <= len(self.words):
            return " ".join(self.words[start:end])
        return " ".join(self.words[start:] + self.words[: end - len(self.words)])

    @classmethod
    def essay(cls, encode: Callable[[str], list[int]], sample_words: int = 20000, surface: Surface | None = None) -> Haystack:
        """The probes' essay haystack, its tokens per word measured under ``encode`` on its first words.

        Args:
            encode: text -> token ids (no special tokens), the model's tokenizer.
            sample_words: how many leading words the token rate is measured on.
            surface: how its sentences are written (``Surface.sentence``; default PLAIN, as stored).
        """
        from headscope.probes.haystack import haystack_sentences

        render = surface.sentence if surface is not None else tuple
        text = " ".join(" ".join(render(tuple(sentence))) for sentence in haystack_sentences("essay"))
        sample = text.split()[:sample_words]
        return cls(text, len(encode(" ".join(sample))) / len(sample))


class RowBuilder:
    """Builds packed training rows (see the module docstring).

    Args:
        encode: text -> token ids, no special tokens.
        eos_id: the document separator.
        sample_task: ``(name, rng, n_filler_words) -> (prompt_text, answer_text)``.
        haystack: filler text.
        config: corpus settings.
    """

    def __init__(
        self, encode: Callable[[str], list[int]], eos_id: int, sample_task: TaskSampler,
        haystack: Haystack, config: CorpusConfig,
    ) -> None:
        self.encode, self.eos_id, self.sample_task = encode, eos_id, sample_task
        self.haystack, self.config = haystack, config
        self.names = config.task_names
        self.weights = [config.task_weights[name] for name in self.names]
        if not sum(self.weights) > 0:
            raise HeadscopeError(f"every task weight is 0 in rows of {config.seq_len}: give at least one task a weight > 0")
        self.overhead = {name: self._task_overhead(name) for name in self.names}
        self.documents = Counter()  # task documents built per task (the realised mix, see task_mix)

    def _task_overhead(self, name: str, n_samples: int = 24) -> int:
        """Tokens a task instance takes beyond its filler: the largest of ``n_samples`` instances drawn with a
        fixed seed, an estimate (about 1 in 10 multihop-chain documents is longer; ``_task_doc`` then
        redraws with less filler). Changing it changes every row of the corpus."""
        rng = random.Random(f"headscope-corpus-overhead:{name}")
        return max(
            sum(len(self.encode(text)) for turn in as_turns(self.sample_task(name, rng, 0)) for text in turn)
            for _ in range(n_samples)
        )

    def _filler_ids(self, rng: random.Random, n_tokens: int) -> list[int]:
        n_words = int(n_tokens / self.haystack.tokens_per_word) + 8
        return self.encode(self.haystack.window(rng, n_words))[:n_tokens]

    def _draw_tasks(self, rng: random.Random, free: int) -> list[str]:
        """1..``max_tasks_per_doc`` task names by weight whose text fits ``free`` tokens together; when the
        drawn ones do not, the longest prefix of them that fits, else one task among those that fit alone
        (by weight); [] if none fits."""
        n_tasks = min(rng.choice([1, 1, 1, 2, 2, 3]), self.config.max_tasks_per_doc)
        names = rng.choices(self.names, weights=self.weights, k=n_tasks)
        while names and sum(self.overhead[name] for name in names) > free:
            names.pop()
        if names:
            return names
        fits = [weight if self.overhead[name] <= free else 0.0 for name, weight in zip(self.names, self.weights)]
        return rng.choices(self.names, weights=fits, k=1) if any(fits) else []

    def _task_doc(self, rng: random.Random, names: list[str], budget: int) -> tuple[list[int], list[int]] | None:
        """Ids and per-id task marks (-1, or the task index on answer ids) of one document of ``names``.

        The filler is sized from the budget; a document that comes out longer is redrawn with the filler
        scaled down by the overshoot; returns None if it never fits.
        """
        filler_tokens = [max(budget / len(names) - self.overhead[name], 0.0) * self.config.filler_fill for name in names]
        if rng.random() < 0.3:
            filler_tokens = [rng.uniform(0.5, 1.0) * tokens for tokens in filler_tokens]
        for attempt in range(5):
            ids: list[int] = []
            marks: list[int] = []
            for name, tokens in zip(names, filler_tokens):
                n_words = int(tokens / self.haystack.tokens_per_word) if attempt < 4 else 0
                for prompt, answer in as_turns(self.sample_task(name, rng, n_words)):
                    prompt_ids, answer_ids = self.encode(prompt), self.encode(answer)
                    ids += prompt_ids + answer_ids
                    marks += [-1] * len(prompt_ids) + [self.names.index(name)] * len(answer_ids)
            if len(ids) <= budget:
                self.documents.update(names)
                return ids, marks
            overshoot = len(ids) - budget
            total_filler = sum(filler_tokens) or 1.0
            filler_tokens = [max(t * (1.0 - 1.05 * overshoot / total_filler), 0.0) for t in filler_tokens]
        return None

    def build(self, rng: random.Random) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One row.

        Returns:
            ids ``(seq_len + 1,)`` int64; weights ``(seq_len,)`` float32, the loss weight of target
            ``ids[t + 1]``; answer_task ``(seq_len,)`` int8, the task index of answer targets, else -1.
        """
        cfg = self.config
        total = cfg.seq_len + 1
        ids: list[int] = []
        marks: list[int] = []
        while len(ids) < total:
            free = total - len(ids)
            if free < cfg.min_doc_tokens:
                tail = self._filler_ids(rng, free)
                ids += tail
                marks += [-1] * len(tail)
                continue
            full = not ids and rng.random() < cfg.full_row_prob
            names = [] if rng.random() < cfg.filler_doc_prob else self._draw_tasks(rng, free - 1)
            # The tasks are drawn first and the budget sized to hold them, so that the realised task mix
            # follows the weights (a task only gives way when it cannot fit what is left of the row).
            need = sum(self.overhead[name] for name in names) + 1
            budget = free if full else rng.randint(min(max(cfg.min_doc_tokens, need), free), free)
            doc = self._task_doc(rng, names, budget - 1) if names else None
            if doc is None:
                doc_ids = self._filler_ids(rng, budget - 1)
                doc = (doc_ids, [-1] * len(doc_ids))
            ids += doc[0] + [self.eos_id]
            marks += doc[1] + [-1]
        ids, marks = ids[:total], marks[:total]
        answer_task = np.asarray(marks[1:], dtype=np.int8)
        weights = np.where(answer_task >= 0, cfg.answer_weight, 1.0).astype(np.float32)
        return np.asarray(ids, dtype=np.int64), weights, answer_task


def task_mix(builder: RowBuilder, n_rows: int = 200, seed: str = "task-mix") -> dict[str, float]:
    """The share of task documents each task gets in ``n_rows`` rows of ``builder``.

    This differs from the configured weights: a task whose text does not fit what is left of a row gives
    way to one that fits, so long tasks (multi-query recall, long key-value blocks) are rarer than their
    weight, short ones more frequent, and more so in short rows.

    Returns:
        task name -> share of documents (the shares sum to 1; 0.0 for tasks never built).
    """
    before = Counter(builder.documents)
    for row in range(n_rows):
        builder.build(row_rng(seed, row))
    built = builder.documents - before
    total = sum(built.values()) or 1
    return {name: built[name] / total for name in builder.names}


def row_rng(seed: int | str, row: int) -> random.Random:
    """The random source of row ``row`` of a run seeded ``seed``."""
    return random.Random(f"headscope-corpus:{seed}:{row}")


class CorpusStream(IterableDataset):
    """Endless batches of rows; batch ``b`` holds rows ``b * batch_size ...``; worker ``k`` of ``W`` makes
    the batches ``b = k (mod W)``, which a ``DataLoader(batch_size=None)`` returns in order.

    Yields:
        dict of ``ids (B, seq_len + 1)`` int64, ``weights (B, seq_len)`` float32, ``answer_task
        (B, seq_len)`` int8.
    """

    def __init__(self, make_builder: Callable[[], RowBuilder], seed: int | str, batch_size: int, start_batch: int = 0):
        super().__init__()
        self.make_builder, self.seed, self.batch_size, self.start_batch = make_builder, seed, batch_size, start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        builder = self.make_builder()
        batch = self.start_batch + worker
        while True:
            rows = [builder.build(row_rng(self.seed, batch * self.batch_size + r)) for r in range(self.batch_size)]
            yield {
                "ids": torch.from_numpy(np.stack([r[0] for r in rows])),
                "weights": torch.from_numpy(np.stack([r[1] for r in rows])),
                "answer_task": torch.from_numpy(np.stack([r[2] for r in rows])),
            }
            batch += n_workers
