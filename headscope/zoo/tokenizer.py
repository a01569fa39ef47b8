"""The demo model's word-level tokenizer.

The demo model reads text produced by ``headscope.probes.tasks`` (task templates) and the haystack
files under ``data/haystack/``. A word-level vocabulary over exactly that text keeps every task word one
token (so a probe's answer is a single next token) and keeps the model small. Pre-tokenisation:

* NFKC normalisation (typographic quotes and dashes fold to one form);
* split on whitespace, then isolate every punctuation character, then every digit
  (``"Room 42."`` -> ``Room``, ``4``, ``2``, ``.``), so numbers of any length use the ten digit tokens.

The vocabulary is: the special tokens ``<unk>`` (id 0), ``<eos>`` (1), ``<pad>`` (2); the ten digits and
ASCII punctuation; then every word seen in the task samples (always kept); then haystack words by
frequency (ties alphabetical) down to ``min_count``, up to ``max_vocab``. The order depends only on the
counts, so the same text always builds the same tokenizer. No special token is added on encoding
(no BOS): a prompt's ids are the concatenation of its words' ids.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Callable, Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from headscope.heads import HeadscopeError

UNK, EOS, PAD = "<unk>", "<eos>", "<pad>"
SPECIAL_TOKENS = (UNK, EOS, PAD)
BASE_SYMBOLS = tuple(string.digits) + tuple(string.punctuation)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


_NORMALIZER = normalizers.NFKC()
_PRE_TOKENIZER = _pre_tokenizer()


def split_words(text: str) -> list[str]:
    """The word pieces the tokenizer sees for ``text`` (after normalisation and pre-tokenisation)."""
    return [piece for piece, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def count_words(texts: Iterable[str]) -> Counter:
    """Word-piece counts over ``texts`` (see :func:`split_words`)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(split_words(text))
    return counts


def build_vocab(
    task_counts: Counter, haystack_counts: Counter, min_count: int = 2, max_vocab: int = 16384
) -> dict[str, int]:
    """Token -> id. Task words are always kept; haystack words fill up to ``max_vocab``.

    Args:
        task_counts: counts of words in task texts (templates, keys, values, names, answers).
        haystack_counts: counts of words in the filler text.
        min_count: haystack words seen fewer times become ``<unk>``.
        max_vocab: the vocabulary's largest size.
    Returns:
        The vocabulary, ids contiguous from 0.
    Raises:
        HeadscopeError: if the task words alone do not fit in ``max_vocab``.
    """
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + BASE_SYMBOLS:
        vocab.setdefault(token, len(vocab))
    by_frequency = lambda counts: sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # noqa: E731
    for word, _ in by_frequency(task_counts):
        vocab.setdefault(word, len(vocab))
    if len(vocab) > max_vocab:
        raise HeadscopeError(
            f"the task texts alone use {len(vocab)} distinct words, more than max_vocab={max_vocab}"
        )
    for word, count in by_frequency(haystack_counts):
        if len(vocab) >= max_vocab or count < min_count:
            break
        vocab.setdefault(word, len(vocab))
    return vocab


def tokenizer_from_vocab(vocab: dict[str, int], model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Wrap a word-level vocabulary (from :func:`build_vocab`) as a Hugging Face fast tokenizer."""
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise HeadscopeError(f"the vocabulary lacks the special token {token}")
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = _NORMALIZER
    core.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_demo_tokenizer(
    sample_task: Callable[[str, random.Random, int], tuple[str, str]],
    task_names: Sequence[str],
    haystack_text: str,
    seed: int = 0,
    samples_per_task: int = 3000,
    min_count: int = 2,
    max_vocab: int = 16384,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """The demo model's tokenizer: task words from sampled task texts, filler words from the haystack.

    Args:
        sample_task: ``(name, rng, n_filler_words) -> (prompt_text, answer_text)``.
        task_names: the tasks to sample.
        haystack_text: all filler text.
        seed: seeds the task samples.
        samples_per_task: task instances drawn per task (one in ten with 50 filler words, so filler
            words the sampler makes itself are kept too).
        min_count, max_vocab: see :func:`build_vocab`.
        model_max_length: the context the tokenizer advertises.
    Returns:
        A ``PreTrainedTokenizerFast`` with ``<unk>``, ``<eos>`` and ``<pad>``.
    """
    rng = random.Random(f"headscope-tokenizer:{seed}")
    task_texts = []
    for name in task_names:
        for index in range(samples_per_task):
            task_texts.extend(sample_task(name, rng, 50 if index % 10 == 0 else 0))
    vocab = build_vocab(count_words(task_texts), count_words([haystack_text]), min_count, max_vocab)
    return tokenizer_from_vocab(vocab, model_max_length)
