"""The probe tasks at the text level: one surface format per task, shared by the probes and training data.

Every task samples a ``TaskInstance``: facts to hide in the haystack (each a clean and a corrupt word
sequence of equal length), a query that ends the prompt, the answer word and the wrong word. The
corrupt version differs from the clean one only where the capability matters, so that its answer is the
wrong word. The token-level probe generators (``headscope.probes.builtin``) and ``sample_task_text``
(training text for the demo model) assemble the SAME instances, so a model trained on the text sees
exactly the probes' format. How an instance reads is its ``Surface`` (``headscope.probes.surface``):
below in the PLAIN surface (lowercase, punctuation split off by spaces: the demo model's format); the
NATURAL surface used for pretrained tokenizers words the same content as natural text.

Formats (``<filler>`` is haystack sentences; facts sit between them at random depths):

* ``needle_single``: ``... the special magic number for lantern is 42 . ... what is the special magic
  number for lantern ? answer :`` -> ``42``. Values are two-digit numbers ("number") or animal words
  ("word": ``the special magic word for ...``). Corrupt: the needle holds another value.
* ``needle_multikey``: four needles with different keys; the query names one. Corrupt: the query names
  another needle's key, so the answer becomes that needle's value.
* ``kv_recall`` (MQAR-like): ``... lantern : 42 , kettle : 17 , ... . ... recall kettle :`` -> ``17``.
  Corrupt: the queried pair and one other pair swap values (same tokens present, other binding).
* ``induction``: random words ``w1 .. wm`` then their repeat cut after ``wk``; predict ``w(k+1)``.
  Corrupt: ``w(k+1)`` in the first copy is replaced by another word.
* ``multihop``: ``c = 42 . ... d = c . ... f = d . ... what is f ? answer :`` -> ``42``, interleaved with
  two distractor chains (noise haystack, as RULER's variable tracking). Corrupt: the first hop of the
  queried chain points at a distractor chain's root (``d = g .``), so the answer is that root's value.
* ``ioi``: ``... when mary and john went to the store , john gave a drink to`` -> ``mary``. Corrupt: the
  second subject is the other name (``, mary gave a drink to`` -> ``john``).
* ``comparison``: ``... tom is taller than ann . ... kate is taller than paul . ... who is shorter , ann
  or tom ? answer :`` -> ``ann``. Corrupt: the queried fact swaps its two names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Sequence

from headscope.heads import HeadscopeError
from headscope.probes import vocab
from headscope.probes.haystack import haystack_sentences, haystack_words, insert_facts, take_window
from headscope.probes.surface import PLAIN, Surface

Words = tuple[str, ...]

KV_MAX_PAIRS = 32
MULTIKEY_NEEDLES = 4
MULTIHOP_CHAINS = 3  # the queried chain and two distractors
MULTIHOP_HOPS = 2  # root binding then two copies: c = 42 . d = c . f = d .
MIN_INDUCTION_WORDS = 4
# The fixed words of the formats below (a test checks that sampled text uses nothing else besides the
# word lists and the haystack).
TEMPLATE_WORDS = tuple("the special magic number word for is . what ? answer : , recall = when and went to gave a who than or".split())


@dataclass(frozen=True)
class Segment:
    """A clean and a corrupt word sequence of equal length (equal words where nothing changes)."""

    clean: Words
    corrupt: Words

    @classmethod
    def same(cls, text: str) -> "Segment":
        words = tuple(text.split())
        return cls(words, words)


@dataclass(frozen=True)
class TaskInstance:
    """One sampled clean/corrupt example of a task, before the haystack is added."""

    facts: tuple[Segment, ...]  # placed in order at random depths of the filler
    query: Segment  # ends the prompt
    answer: str  # the word the clean prompt asks for
    wrong: str  # the word the corrupt prompt asks for
    intro: Words = ()  # opens the prompt, before the filler (the surface's instruction, if any)


@dataclass(frozen=True)
class Pools:
    """The word lists a task may draw slot words from (for a tokenizer: its single-token words)."""

    keys: Words
    number_values: Words
    word_values: Words
    names: Words
    variables: Words
    places: Words
    objects: Words
    comparatives: tuple[tuple[str, str], ...]
    induction: Words  # the haystack's words (no punctuation)

    @classmethod
    @lru_cache(maxsize=None)
    def full(cls) -> "Pools":
        """Every word list in full (built once: the haystack scan dominates a training sample's cost)."""
        return cls(
            vocab.KEYS, vocab.NUMBER_VALUES, vocab.WORD_VALUES, vocab.NAMES, vocab.VARIABLES, vocab.PLACES,
            vocab.OBJECTS, vocab.COMPARATIVES, tuple(sorted(w for w in haystack_words() if w.isalpha())),
        )

    def restricted(self, keep: Callable[[str], bool]) -> "Pools":
        """Keep the slot words (``SLOT_POOLS``) for which ``keep`` holds; the shared context words
        (places, objects, comparatives: equal in clean and corrupt, never answers) stay as they are."""
        return replace(self, **{name: tuple(w for w in getattr(self, name) if keep(w)) for name in SLOT_POOLS})


# Pools whose words are answers, differ between clean and corrupt, or set the token cost of a growing task:
# a tokenizer must continue a prompt with each of them as exactly one token.
SLOT_POOLS = ("keys", "number_values", "word_values", "names", "variables", "induction")


def _draw(rng: random.Random, pool: Sequence[str], k: int, what: str) -> list[str]:
    """``k`` distinct words of ``pool``; a HeadscopeError when the pool is too small."""
    if len(pool) < k:
        raise HeadscopeError(f"needs {k} distinct {what} but only {len(pool)} are usable (single tokens) with this tokenizer")
    return rng.sample(list(pool), k)


def draw_values(rng: random.Random, pools: Pools, k: int) -> tuple[str, list[str]]:
    """A value kind ("number" or "word", among those with >= k usable values) and k distinct values."""
    kinds = [kind for kind, pool in (("number", pools.number_values), ("word", pools.word_values)) if len(pool) >= k]
    if not kinds:
        usable = max(len(pools.number_values), len(pools.word_values))
        raise HeadscopeError(f"needs {k} distinct values but only {usable} are usable (single tokens) with this tokenizer")
    kind = rng.choice(kinds)
    return kind, rng.sample(list(pools.number_values if kind == "number" else pools.word_values), k)


def needle_words(kind: str, key: str, value: str, surface: Surface = PLAIN) -> Words:
    """A needle fact (PLAIN: ``the special magic {kind} for {key} is {value} .``) as words."""
    return surface.words(surface.needle, kind=kind, key=key, value=value)


def needle_query_words(kind: str, key: str, surface: Surface = PLAIN) -> Words:
    """The question that asks for a needle (PLAIN: ``what is the special magic {kind} for {key} ? answer :``)."""
    return surface.words(surface.needle_query, kind=kind, key=key)


def sample_needle_single(rng: random.Random, pools: Pools, size: int = 0, surface: Surface = PLAIN) -> TaskInstance:
    """One needle; the corrupt needle holds another value of the same kind (``size`` unused)."""
    kind, (value, other) = draw_values(rng, pools, 2)
    (key,) = _draw(rng, pools.keys, 1, "keys")
    fact = Segment(needle_words(kind, key, value, surface), needle_words(kind, key, other, surface))
    query = needle_query_words(kind, key, surface)
    return TaskInstance((fact,), Segment(query, query), value, other, surface.intro("needle_single", kind))


def sample_needle_multikey(rng: random.Random, pools: Pools, size: int = 0, surface: Surface = PLAIN) -> TaskInstance:
    """``MULTIKEY_NEEDLES`` needles; the corrupt query names another needle's key (``size`` unused)."""
    kind, values = draw_values(rng, pools, MULTIKEY_NEEDLES)
    keys = _draw(rng, pools.keys, MULTIKEY_NEEDLES, "keys")
    asked, other = rng.sample(range(MULTIKEY_NEEDLES), 2)
    facts = tuple(Segment.same(" ".join(needle_words(kind, k, v, surface))) for k, v in zip(keys, values))
    query = Segment(needle_query_words(kind, keys[asked], surface), needle_query_words(kind, keys[other], surface))
    return TaskInstance(facts, query, values[asked], values[other], surface.intro("needle_multikey", kind))


def sample_kv_recall(rng: random.Random, pools: Pools, size: int = 2, surface: Surface = PLAIN) -> TaskInstance:
    """``size`` key-value pairs (>= 2) in one block; the corrupt block swaps the asked pair's value with
    another pair's."""
    keys = _draw(rng, pools.keys, size, "keys")
    kind, (value, other) = draw_values(rng, pools, 2)
    value_pool = pools.number_values if kind == "number" else pools.word_values
    rest = [v for v in value_pool if v not in (value, other)]
    fillers = iter(rng.sample(rest, size - 2) if len(rest) >= size - 2 else rng.choices(rest, k=size - 2))
    asked, swapped = rng.sample(range(size), 2)
    values = [value if i == asked else other if i == swapped else next(fillers) for i in range(size)]
    corrupt_values = list(values)
    corrupt_values[asked], corrupt_values[swapped] = values[swapped], values[asked]

    def block(vals: list[str]) -> Words:
        pairs = surface.kv_separator.join(surface.kv_pair.format(key=k, value=v) for k, v in zip(keys, vals))
        return surface.words(surface.kv_block, pairs=pairs)

    query = Segment.same(surface.kv_query.format(key=keys[asked]))
    return TaskInstance((Segment(block(values), block(corrupt_values)),), query, value, other, surface.intro("kv_recall", kind))


def sample_induction(rng: random.Random, pools: Pools, size: int = MIN_INDUCTION_WORDS, surface: Surface = PLAIN) -> TaskInstance:
    """``size`` words in all (>= 4): a segment of m = size // 2 + 1 words, then its first k = size - m.

    The k-th word (the trigger), the answer after it and the corrupt replacement occur nowhere else, so
    the repeat's next word is unambiguous; the other words may repeat when the pool is small. Random words
    read alike in every surface.
    """
    first = size // 2 + 1
    repeat = size - first
    trigger, answer, wrong = _draw(rng, pools.induction, 3, "induction words")
    rest = [w for w in pools.induction if w not in (trigger, answer, wrong)]
    if not rest:
        raise HeadscopeError("needs 4 distinct induction words but only 3 are usable (single tokens) with this tokenizer")
    others = rng.sample(rest, first - 2) if len(rest) >= first - 2 else rng.choices(rest, k=first - 2)
    segment = others[: repeat - 1] + [trigger, answer] + others[repeat - 1 :]
    corrupt = list(segment)
    corrupt[repeat] = wrong
    return TaskInstance((), Segment(tuple(segment + segment[:repeat]), tuple(corrupt + segment[:repeat])), answer, wrong)


def interleave(rng: random.Random, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """The statements of chains of these ``lengths`` interleaved at random, each chain in its own order.

    Returns:
        ``(chain, position in the chain)`` per statement, in document order.
    """
    order = [chain for chain, length in enumerate(lengths) for _ in range(length)]
    rng.shuffle(order)
    emitted = [0] * len(lengths)
    statements = []
    for chain in order:
        statements.append((chain, emitted[chain]))
        emitted[chain] += 1
    return statements


def sample_multihop(rng: random.Random, pools: Pools, size: int = 0, surface: Surface = PLAIN, hops: int = MULTIHOP_HOPS) -> TaskInstance:
    """``MULTIHOP_CHAINS`` chains of ``hops`` copies, interleaved; chain 0 is asked and its first hop points
    at chain 1's root in the corrupt version (``size`` unused; the probes use ``MULTIHOP_HOPS``, the demo
    model's training curriculum fewer). With ``hops=0`` there is no hop to rewire: the corrupt prompt equals
    the clean one, so such instances serve as training text only, never as a probe pair."""
    names = _draw(rng, pools.variables, MULTIHOP_CHAINS * (hops + 1), "variables")
    kind, roots = draw_values(rng, pools, MULTIHOP_CHAINS)
    chains = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(MULTIHOP_CHAINS)]
    statements = [[surface.hop_root.format(var=chain[0], value=root)]
                  + [surface.hop.format(var=chain[h], prev=chain[h - 1]) for h in range(1, hops + 1)]
                  for chain, root in zip(chains, roots)]
    facts = []
    for c, position in interleave(rng, [hops + 1] * MULTIHOP_CHAINS):
        segment = Segment.same(statements[c][position])
        if c == 0 and position == 1:
            segment = Segment(segment.clean, surface.words(surface.hop, var=chains[0][1], prev=chains[1][0]))
        facts.append(segment)
    query = Segment.same(surface.hop_query.format(var=chains[0][-1]))
    return TaskInstance(tuple(facts), query, roots[0], roots[1], surface.intro("multihop", kind))


def sample_ioi(rng: random.Random, pools: Pools, size: int = 0, surface: Surface = PLAIN) -> TaskInstance:
    """One IOI sentence (ABBA or BABA order); the corrupt second subject is the indirect object."""
    indirect, subject = map(surface.name_form, _draw(rng, pools.names, 2, "names"))
    (place,) = _draw(rng, pools.places, 1, "places")
    (thing,) = _draw(rng, pools.objects, 1, "objects")
    first, second = (indirect, subject) if rng.random() < 0.5 else (subject, indirect)

    def sentence(giver: str) -> Words:
        return surface.words(surface.ioi, first=first, second=second, place=place, giver=giver, thing=thing)

    return TaskInstance((), Segment(sentence(subject), sentence(indirect)), indirect, subject)


def sample_comparison(rng: random.Random, pools: Pools, size: int = 0, surface: Surface = PLAIN) -> TaskInstance:
    """The queried comparison plus a distractor one (same comparative, other names); the query asks the
    comparative or its opposite; the corrupt fact swaps the two names (``size`` unused)."""
    big, small, other_big, other_small = map(surface.name_form, _draw(rng, pools.names, 4, "names"))
    if not pools.comparatives:
        raise HeadscopeError("needs a comparative pair (taller/shorter ...) of single tokens but none is usable with this tokenizer")
    more, less = rng.choice(pools.comparatives)
    def compared(more_one: str, less_one: str) -> Words:
        return surface.words(surface.comparison_fact, more_one=more_one, comparative=more, less_one=less_one)

    fact = Segment(compared(big, small), compared(small, big))
    distractor = Segment(compared(other_big, other_small), compared(other_big, other_small))
    asked, answer, wrong = (more, big, small) if rng.random() < 0.5 else (less, small, big)
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    facts = (fact, distractor) if rng.random() < 0.5 else (distractor, fact)
    query = Segment.same(surface.comparison_query.format(asked=asked, first=first, second=second))
    return TaskInstance(facts, query, answer, wrong)


@dataclass(frozen=True)
class Task:
    """A task: its sampler, capability, haystack and, for tasks whose content grows with the prompt,
    ``sizes = (smallest size, largest size for the pools, share of the token budget the content may take)``
    (the size is the sampler's third argument: pairs for ``kv_recall``, words for ``induction``)."""

    name: str
    capability: str
    description: str
    haystack: str | None
    sample: Callable[[random.Random, Pools, int, Surface], TaskInstance]
    sizes: tuple[int, Callable[[Pools], int], float] | None = None


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("needle_single", "retrieval", "needle in a haystack: one key, recall its value (corrupt: other value)", "essay", sample_needle_single),
        Task("needle_multikey", "retrieval", f"RULER multikey: {MULTIKEY_NEEDLES} needles, one queried (corrupt: another key queried)", "essay", sample_needle_multikey),
        Task("kv_recall", "retrieval", f"MQAR-like key-value block (2-{KV_MAX_PAIRS} pairs), recall one key (corrupt: two values swapped)", "essay", sample_kv_recall,
             (2, lambda pools: min(KV_MAX_PAIRS, len(pools.keys)), 0.5)),
        Task("induction", "retrieval", "a random word segment repeated; predict the next word of the repeat (corrupt: that word changed)", None, sample_induction,
             (MIN_INDUCTION_WORDS, lambda pools: 10**9, 1.0)),
        Task("multihop", "reasoning", f"variable binding, {MULTIHOP_HOPS} hops, {MULTIHOP_CHAINS - 1} distractor chains (corrupt: a hop rewired)", "noise", sample_multihop),
        Task("ioi", "reasoning", "indirect object identification (corrupt: the second subject is the other name)", "essay", sample_ioi),
        Task("comparison", "reasoning", "who is taller/shorter among two facts (corrupt: the names of the queried fact swapped)", "essay", sample_comparison),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; a HeadscopeError listing the built-ins for an unknown name."""
    if name not in TASKS:
        raise HeadscopeError(f"unknown probe {name!r}; built-in probes: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def sample_task_text(name: str, rng: random.Random, n_filler_words: int, surface: Surface = PLAIN) -> tuple[str, str]:
    """One training example of task ``name`` in the probes' format, worded by ``surface``.

    Args:
        name: one of ``TASK_NAMES``.
        rng: the random source (the only one used).
        n_filler_words: haystack words around the facts; for ``induction`` (no haystack) the total number
            of words of the segment and its partial repeat (at least 4).

    Returns:
        ``(prompt_text, answer_text)``: the prompt ends where the answer is due; the training string is
        ``prompt_text + " " + answer_text``. ``kv_recall`` draws 2 to 32 pairs (at most the surface's cap).
        In NATURAL, names are capitalised in the pools' place (every name word of the text is capitalised).
    """
    task = get_task(name)
    if n_filler_words < 0:
        raise HeadscopeError(f"n_filler_words must be >= 0, got {n_filler_words}")
    pools = Pools.full()
    size = 0
    if task.haystack is None and task.sizes is not None:  # induction: its content is the whole prompt
        size = max(task.sizes[0], n_filler_words)
    elif task.sizes is not None:
        largest = task.sizes[1](pools)
        size = rng.randint(task.sizes[0], min(largest, surface.max_sizes.get(name, largest)))
    instance = task.sample(rng, pools, size, surface)
    window: list[list[str]] = []
    if task.haystack is not None:
        sentences = [surface.sentence(s) for s in haystack_sentences(task.haystack)]
        window = take_window(lambda i: sentences[i], len(sentences), rng, n_filler_words)
    words, _ = insert_facts(window, [fact.clean for fact in instance.facts], rng)
    return " ".join(list(instance.intro) + words + list(instance.query.clean)), instance.answer


def task_vocabulary() -> list[str]:
    """Every word ``sample_task_text`` and the built-in probes can emit (for word-level tokenizers)."""
    return sorted(set(haystack_words()) | set(TEMPLATE_WORDS) | {w for pool in vocab.WORD_LISTS.values() for w in pool})
