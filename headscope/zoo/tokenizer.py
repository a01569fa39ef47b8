"""The demo model's word-level tokenizer.

The demo model reads only text produced by ``headscope.probes.tasks``: task templates, slot words from
``headscope.probes.vocab`` and the haystack. That word list is finite (``task_vocabulary()``), so a
word-level vocabulary covers it exactly: every task word is one token (numbers are split into digits),
nothing is ever ``<unk>`` in the model's own text, and the embedding stays tiny.
Pre-tokenisation:

* NFKC normalisation (typographic quotes and dashes fold to one form);
* split on whitespace, then isolate every punctuation character, then every digit
  (``"Room 42."`` -> ``Room``, ``4``, ``2``, ``.``), so numbers of any length use the ten digit tokens.

The vocabulary is: the special tokens ``<unk>`` (id 0), ``<eos>`` (1), ``<pad>`` (2); the ten digits and
ASCII punctuation; then the words of sampled task text by frequency (ties alphabetical); then any other
word of the task word list, alphabetically. The same inputs always build the same tokenizer. No special
token is added on encoding (no BOS): a prompt's ids are the concatenation of its words' ids.
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


def build_vocab(words: Iterable[str], texts: Iterable[str] = ()) -> dict[str, int]:
    """Token -> id: special tokens, digits and ASCII punctuation, then the word pieces of ``texts`` by
    frequency (ties alphabetical), then the remaining pieces of ``words`` alphabetically.

    Args:
        words: every word the model must know (each is split like text, so ``"42"`` adds ``4`` and ``2``).
        texts: sample text whose word frequencies order the vocabulary.
    Returns:
        The vocabulary, ids contiguous from 0.
    """
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + BASE_SYMBOLS:
        vocab.setdefault(token, len(vocab))
    for word, _ in sorted(count_words(texts).items(), key=lambda item: (-item[1], item[0])):
        vocab.setdefault(word, len(vocab))
    for word in sorted({piece for word in words for piece in split_words(word)}):
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
    task_words: Iterable[str],
    seed: int = 0,
    samples_per_task: int = 200,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """The demo model's tokenizer: every task and haystack word, ordered by frequency in sampled tasks.

    Args:
        sample_task: ``(name, rng, n_filler_words) -> (prompt_text, answer_text)``.
        task_names: the tasks to sample.
        task_words: every word the sampler can emit (``headscope.probes.tasks.task_vocabulary()``).
        seed: seeds the task samples.
        samples_per_task: task instances (with 100 filler words) drawn per task to order the vocabulary.
        model_max_length: the context the tokenizer advertises.
    Returns:
        A ``PreTrainedTokenizerFast`` with ``<unk>``, ``<eos>`` and ``<pad>``.
    Raises:
        HeadscopeError: if a sampled text has a word outside ``task_words`` (the word list is incomplete).
    """
    rng = random.Random(f"headscope-tokenizer:{seed}")
    texts = [text for name in task_names for _ in range(samples_per_task) for text in sample_task(name, rng, 100)]
    known = {piece for word in task_words for piece in split_words(word)} | set(BASE_SYMBOLS)
    stray = sorted(set(count_words(texts)) - known)
    if stray:
        raise HeadscopeError(f"the task sampler emits words missing from its word list: {stray[:10]}")
    return tokenizer_from_vocab(build_vocab(task_words, texts), model_max_length)
