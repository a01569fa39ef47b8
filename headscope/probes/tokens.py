"""Token-level assembly of probe prompts for any tokenizer (word-level, byte-level BPE, SentencePiece).

Prompts are built word by word at the token level, never by tokenising the final string, so that clean
and corrupt prompts have equal length by construction and the filler can be cut to an exact budget:

* A word inside a prompt is tokenised the way the tokenizer continues text with it after a space:
  ``ids(ANCHOR + " " + word)`` minus the ids of ``ANCHOR``. For GPT-2-like byte-level BPE this gives the
  ``Ġword`` form, for SentencePiece the ``▁word`` form, for a word-level tokenizer just ``word``. Every
  word of a prompt, the first included, uses this form (one convention everywhere). A word is a
  whitespace-separated chunk of the surface's text (``tiger.`` in NATURAL, ``tiger`` and ``.`` in PLAIN),
  so this equals tokenising the joined text for tokenizers that pre-split on whitespace.
* Slot words (keys, values, names, variables, induction words) are only taken from the lists in
  ``headscope.probes.vocab`` whose continuation is exactly ONE token that is neither unknown nor special,
  so the answer and wrong words are single tokens; a substitution keeps the token count (in NATURAL,
  where punctuation attaches to a slot word, an instance whose clean and corrupt lengths differ is
  redrawn). Shared
  context words (IOI places and objects, comparatives, template words) may take several tokens.
* The tokenizer's special prefix (the BOS a Llama tokenizer adds, nothing for GPT-2 or Qwen) starts
  every prompt and counts towards its length.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from headscope.probes.base import PromptPair
from headscope.probes.haystack import haystack_sentences, insert_facts, take_window
from headscope.probes.surface import Surface, surface_for
from headscope.probes.tasks import SLOT_POOLS, Pools, Task, TaskInstance

ANCHOR = "."


def encode_plain(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (one batched call)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text when asked for special tokens (e.g. ``[bos]``)."""
    with_special = list(tokenizer("probe")["input_ids"])
    (plain,) = encode_plain(tokenizer, ["probe"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


class TokenVocab:
    """One tokenizer's continuation ids of words (cached) and its single-token task pools.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).
        surface: how prompts read (default ``surface_for(tokenizer)``).
    """

    def __init__(self, tokenizer: Any, surface: Surface | None = None) -> None:
        self.tokenizer = tokenizer
        self.surface = surface or surface_for(tokenizer)
        self.prefix = special_prefix(tokenizer)
        self.excluded_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        if getattr(tokenizer, "unk_token_id", None) is not None:
            self.excluded_ids.add(tokenizer.unk_token_id)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._sentences: dict[tuple[str, int], list[int]] = {}
        self._rendered: dict[str, list[tuple[str, ...]]] = {}  # haystack kind -> its sentences in the surface

    def _encode_words(self, words: set[str]) -> None:
        missing = sorted(w for w in words if w not in self._cache)
        if not missing:
            return
        (anchor,) = encode_plain(self.tokenizer, [ANCHOR])
        for word, ids in zip(missing, encode_plain(self.tokenizer, [f"{ANCHOR} {w}" for w in missing])):
            if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
                self._cache[word] = tuple(ids[len(anchor) :])
            else:  # the anchor merged with the word: fall back to the word on its own
                (alone,) = encode_plain(self.tokenizer, [word])
                self._cache[word] = tuple(alone)

    def ids(self, words: Sequence[str]) -> list[int]:
        """Continuation ids of ``words`` joined by spaces."""
        self._encode_words(set(words))
        return [i for word in words for i in self._cache[word]]

    def single_token(self, word: str) -> int | None:
        """The word's one continuation id, or None if it takes several tokens or an unknown/special one."""
        ids = self.ids([word])
        return ids[0] if len(ids) == 1 and ids[0] not in self.excluded_ids else None

    def pools(self) -> Pools:
        """The task pools with slot words restricted to single tokens in the surface's form (a name as
        ``Mary`` in NATURAL); the first word wins when two share an id."""
        full = Pools.full()
        slot_pools = {name: getattr(full, name) for name in SLOT_POOLS}
        form = {name: self.surface.name_form if name == "names" else str for name in SLOT_POOLS}
        self._encode_words({form[name](w) for name, pool in slot_pools.items() for w in pool})
        seen: dict[int, str] = {}
        for name, pool in slot_pools.items():
            for word in pool:
                token = self.single_token(form[name](word))
                if token is not None:
                    seen.setdefault(token, word)
        kept = set(seen.values())
        return full.restricted(kept.__contains__)

    def sentence_ids(self, kind: str, index: int) -> list[int]:
        """Continuation ids of sentence ``index`` of haystack ``kind`` (cached)."""
        key = (kind, index)
        if key not in self._sentences:
            if kind not in self._rendered:  # first use: render it and encode its whole vocabulary in one call
                self._rendered[kind] = [self.surface.sentence(s) for s in haystack_sentences(kind)]
                self._encode_words({w for s in self._rendered[kind] for w in s})
            self._sentences[key] = self.ids(self._rendered[kind][index])
        return self._sentences[key]

    def cost(self, instance: TaskInstance) -> int:
        """Tokens of an instance's intro, facts and query plus the special prefix (the filler excluded)."""
        facts = sum(len(self.ids(f.clean)) for f in instance.facts)
        return len(self.prefix) + len(self.ids(instance.intro)) + facts + len(self.ids(instance.query.clean))

    def equal_lengths(self, instance: TaskInstance) -> bool:
        """Whether clean and corrupt facts and query tokenise to equal lengths (always so in PLAIN, where
        slot words stand alone; in NATURAL a slot word carries punctuation, e.g. ``tiger.``)."""
        segments = (*instance.facts, instance.query)
        return all(len(self.ids(s.clean)) == len(self.ids(s.corrupt)) for s in segments)


def assemble_pair(task: Task, instance: TaskInstance, vocab: TokenVocab, length: int, rng: random.Random) -> PromptPair:
    """Tokenise ``instance`` and pad it with haystack filler to exactly ``length`` tokens.

    Args:
        task: the task (which haystack).
        instance: the sampled clean/corrupt content.
        vocab: the tokenizer's word ids.
        length: the prompt length in tokens, special prefix included.
        rng: random source for the filler window and the facts' depths.

    Returns:
        the ``PromptPair``; clean and corrupt share the filler and differ only inside facts and query.

    The caller checks ``vocab.cost(instance) <= length`` (equality for tasks without a haystack).
    """
    required = vocab.cost(instance)
    clean_facts = [vocab.ids(f.clean) for f in instance.facts]
    corrupt_facts = [vocab.ids(f.corrupt) for f in instance.facts]
    window: list[list[int]] = []
    if task.haystack is not None:
        kind = task.haystack
        window = take_window(lambda i: vocab.sentence_ids(kind, i), len(haystack_sentences(kind)), rng, length - required)
    depth_state = rng.getstate()  # the same depths for clean and corrupt
    clean, _ = insert_facts(window, clean_facts, rng)
    rng.setstate(depth_state)
    corrupt, _ = insert_facts(window, corrupt_facts, rng)
    intro = vocab.ids(instance.intro)
    clean = vocab.prefix + intro + clean + vocab.ids(instance.query.clean)
    corrupt = vocab.prefix + intro + corrupt + vocab.ids(instance.query.corrupt)
    answer, wrong = vocab.single_token(instance.answer), vocab.single_token(instance.wrong)
    if len(clean) != length or len(corrupt) != length or answer is None or wrong is None or answer == wrong:  # a bug
        raise RuntimeError(f"probe {task.name}: assembled a bad pair (lengths {len(clean)}/{len(corrupt)} for {length}, "
                           f"answer {instance.answer!r} -> {answer}, wrong {instance.wrong!r} -> {wrong})")
    return PromptPair(tuple(clean), tuple(corrupt), answer, wrong)
