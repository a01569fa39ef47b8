"""Tiny tokenizers built locally for tests (no hub access): word-level and byte-level BPE."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def make_word_tokenizer(words: Iterable[str], add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``words`` plus ``[UNK]``, ``<bos>`` and ``<eos>``.

    Args:
        words: the vocabulary (duplicates ignored, order kept).
        add_bos: prepend ``<bos>`` when called with special tokens (like a Llama tokenizer).
    """
    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces, keeps " ."
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>")


def make_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (leading-space ``Ġ`` convention) trained on ``texts``.

    A small ``vocab_size`` leaves rarer words as several tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
