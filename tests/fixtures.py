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


def make_bpe_tokenizer(texts: Iterable[str], vocab_size: int, sentencepiece_style: bool = False) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts``; a small ``vocab_size`` leaves rarer words as several tokens.

    Args:
        texts: training text.
        vocab_size: target vocabulary size.
        sentencepiece_style: False: GPT-2-style byte-level BPE (leading space as ``Ġ``, no BOS).
            True: Llama-2-style (``▁`` word prefix, digits split one by one, ``<s>`` prepended).
    """
    if sentencepiece_style:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"), pre_tokenizers.Digits(individual_digits=True)]
        )
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
