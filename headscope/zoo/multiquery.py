"""Training-only documents for key matching and multihop binding: multi-query associative recall (MQAR),
a multi-hop ladder and multi-query chains.

The probes ask one question per prompt, so a training row holds only a few answers that need a key
matched before a value is copied (``needle_multikey``, ``kv_recall``, ``multihop``). A small model trained on
those alone learns to copy *some* value (one of the needles) long before it learns *which*: the key
lookup needs a feature "the key two tokens back" at every value position, and one answer per document is
too weak a signal for it (the first demo model stayed at chance on all three tasks after 1B tokens).

An MQAR document (Zoology's multi-query associative recall, in the probes' surface formats) states
``n`` key-value facts and then asks for many of them, each question followed by its answer:

* ``"kv"`` style: ``pipe : 8 2 , pencil : 3 9 , ... . recall pencil : 3 9 . recall pipe : 8 2 .``
* ``"needle"`` style: the facts ``the special magic number for pipe is 8 2 .`` scattered through haystack
  text, then ``what is the special magic number for pipe ? answer : 8 2 .`` per question.

Keys, values and templates come from ``headscope.probes.tasks`` (the probes' own pools), so the skill
transfers to the probe formats. The document is returned as turns ``[(text, answer), ...]``: the corpus
weighs and scores every answer.

Two corpus tasks use these documents: ``"mqar"`` (``MIN_PAIRS``-``MAX_PAIRS`` facts, up to ~320 tokens
before filler: it only fits rows of 1024) and ``"mqar_dense"`` (``DENSE_PAIRS``, at most ~145 tokens: it
fits the short rows of the first training phase). The reasoning: in a short row the right fact is one of
a few dozen positions, so a matching head gets a useful gradient from its first steps, while at 1024
tokens of haystack its initial attention to the right fact is ~1/1000. The first demo model's curriculum
had no key-matching document that fit its short rows (``"mqar"`` needs more than 256 tokens). What was
shown side by side is narrower: with this corpus, lr 1e-3 learnt key matching and lr 3e-3 did not (see
the demo model's HISTORY.md); the dense documents' own share was not isolated (they are ~12% of
short-phase documents, ``headscope.zoo.corpus.task_mix``).

Multihop (``c = lynx . d = c . f = d . what is f ?``) needs three chained look-ups. Single-question
chains never taught it: with the probe's format and the ``"hop_ladder"`` (0-2 hops, one question), a
6-layer and an 8-layer demo model stayed at chance, answering with a random chain's root. Two more
documents from ``sample_chain_queries`` did: ``"hop_queries"`` states 2-4 chains and asks about many of
their variables at the end, ``"hop_steps"`` asks each question right after its variable's statement,
where the right-hand side is a few tokens back and the only far look-up resolves it. With both in the
corpus, four runs (two weightings) learnt multihop, their training-stream accuracy leaving ~0.55 after
1,050-2,325 steps of 256-token rows and passing 0.9 by step 1,175-3,100 (probe argmax 1.00 at 256 tokens
in all four);
which of the two documents is needed was not isolated (the demo model's HISTORY.md).
"""

from __future__ import annotations

import random

from headscope.probes.haystack import haystack_sentences, insert_facts, take_window
from headscope.probes.tasks import (MULTIHOP_HOPS, Pools, draw_values, interleave, needle_query_words, needle_words, sample_multihop,
                                    sample_task_text)

MIN_PAIRS, MAX_PAIRS = 4, 16
DENSE_PAIRS = (2, 6)
STYLES = ("kv", "needle")
CHAIN_COUNT = (2, 4)
LITERAL_SHARE = 0.25


def sample_multi_query(rng: random.Random, n_filler_words: int, pairs: tuple[int, int] = (MIN_PAIRS, MAX_PAIRS)) -> list[tuple[str, str]]:
    """One MQAR document as turns.

    Args:
        rng: the random source (the only one used).
        n_filler_words: haystack words around the facts (both styles put the facts in haystack text).
        pairs: the smallest and largest number of facts (drawn uniformly).

    Returns:
        ``[(text, answer), ...]``: the document is ``text_1 answer_1 text_2 answer_2 ...`` joined by spaces;
        the first text holds the haystack and the facts, every later text one question.
    """
    pools = Pools.full()
    n_pairs = rng.randint(*pairs)
    keys = rng.sample(list(pools.keys), n_pairs)
    kind, values = draw_values(rng, pools, n_pairs)
    asked = rng.sample(range(n_pairs), rng.randint(max(1, n_pairs // 2), n_pairs))
    sentences = haystack_sentences("essay")
    window = take_window(lambda i: sentences[i], len(sentences), rng, n_filler_words)
    if rng.choice(STYLES) == "kv":
        block = tuple(" , ".join(f"{k} : {v}" for k, v in zip(keys, values)).split()) + (".",)
        words, _ = insert_facts(window, [block], rng)
        questions = [f"recall {keys[i]} :" for i in asked]
    else:
        facts = [needle_words(kind, k, v) for k, v in zip(keys, values)]
        words, _ = insert_facts(window, facts, rng)
        questions = [" ".join(needle_query_words(kind, keys[i])) for i in asked]
    turns = [(" ".join(words + questions[0].split()), values[asked[0]])]
    turns += [(". " + question, values[i]) for question, i in zip(questions[1:], asked[1:])]
    return turns


def sample_hop_ladder(rng: random.Random, n_filler_words: int) -> tuple[str, str]:
    """A ``multihop`` instance with 0 to ``MULTIHOP_HOPS`` hops (uniform), in the probe's format and noise
    haystack: ``c = 42 . ... d = c . ... what is d ? answer :`` -> ``42`` for one hop.

    The probe's two hops are three chained look-ups; a model that cannot yet do one has no gradient
    towards the second, so the ladder's shorter chains teach each look-up on its own first.
    """
    instance = sample_multihop(rng, Pools.full(), hops=rng.randint(0, MULTIHOP_HOPS))
    sentences = haystack_sentences("noise")
    window = take_window(lambda i: sentences[i], len(sentences), rng, n_filler_words)
    words, _ = insert_facts(window, [fact.clean for fact in instance.facts], rng)
    return " ".join(words + list(instance.query.clean)), instance.answer


def sample_chain_queries(rng: random.Random, n_filler_words: int, literal_share: float = 0.0,
                         after_statement: bool = False) -> list[tuple[str, str]]:
    """A multi-query multihop document: ``CHAIN_COUNT`` interleaved chains of 0 to ``MULTIHOP_HOPS`` hops
    each, in noise haystack, with questions on many of their variables, each followed by its answer.

    ``what is X ?`` is answered by the root value of X's chain (the probe's question); with probability
    ``literal_share`` a question is ``recall X :`` instead, answered by X's literal right-hand side (a
    variable for a copy). The questions come after all statements
    (``c = lynx . ... d = c . ... what is d ? answer : lynx . what is c ? answer : lynx .``), or with
    ``after_statement`` each right after the statement of its variable
    (``c = lynx . ... d = c . what is d ? answer : lynx . ...``): then the variable's right-hand side is a
    few tokens back and the only far look-up is the one that resolves it, which teaches the model to
    resolve a copy where it is stated (so that the probe's question needs one look-up per hop already
    resolved).

    Returns:
        ``[(text, answer), ...]`` turns, as ``sample_multi_query``.
    """
    pools = Pools.full()
    n_chains = rng.randint(*CHAIN_COUNT)
    hops = [rng.randint(0, MULTIHOP_HOPS) for _ in range(n_chains)]
    names = rng.sample(list(pools.variables), sum(h + 1 for h in hops))
    _, roots = draw_values(rng, pools, n_chains)
    chains, start = [], 0
    for h in hops:
        chains.append(names[start : start + h + 1])
        start += h + 1
    rhs, value = {}, {}  # variable -> its literal right-hand side, its chain's root value
    for chain, root in zip(chains, roots):
        for depth, name in enumerate(chain):
            rhs[name], value[name] = (root if depth == 0 else chain[depth - 1]), root
    statements = [chains[c][position] for c, position in interleave(rng, [len(chain) for chain in chains])]
    asked = set(rng.sample(names, rng.randint(max(1, len(names) // 2), len(names))))

    def question(name: str) -> tuple[list[str], str]:
        literal = rng.random() < literal_share
        words = f"recall {name} :" if literal else f"what is {name} ? answer :"
        return words.split(), rhs[name] if literal else value[name]

    # Facts are word lists; an answer is a turn break, marked by its index into ``answers``.
    answers: list[str] = []
    facts = []
    for name in statements:
        fact = f"{name} = {rhs[name]} .".split()
        if after_statement and name in asked:
            words, answer = question(name)
            fact += words + [_AnswerMark(len(answers))] + ["."]
            answers.append(answer)
        facts.append(fact)
    sentences = haystack_sentences("noise")
    window = take_window(lambda i: sentences[i], len(sentences), rng, n_filler_words)
    flat, _ = insert_facts(window, facts, rng)
    if not after_statement:
        for name in rng.sample(sorted(asked), len(asked)):
            words, answer = question(name)
            flat += words + [_AnswerMark(len(answers))] + ["."]
            answers.append(answer)
        flat.pop()  # the document ends on the last answer
    turns, text = [], []
    for unit in flat:
        if isinstance(unit, _AnswerMark):
            turns.append((" ".join(text), answers[unit.index]))
            text = []
        else:
            text.append(unit)
    if text:  # statements and filler after the last answer (questions after statements)
        turns.append((" ".join(text), ""))
    return turns


class _AnswerMark:
    """Where an answer goes in a flat word list (``sample_chain_queries``)."""

    def __init__(self, index: int) -> None:
        self.index = index


TRAINING_ONLY_TASKS = ("mqar", "mqar_dense", "hop_ladder", "hop_queries", "hop_steps")


def sample_training_task(name: str, rng: random.Random, n_filler_words: int) -> tuple[str, str] | list[tuple[str, str]]:
    """The demo corpus's sampler: ``"mqar"`` and ``"mqar_dense"`` documents from ``sample_multi_query``,
    ``"hop_ladder"`` from ``sample_hop_ladder``, the probe tasks from
    ``headscope.probes.tasks.sample_task_text`` (arguments as there)."""
    if name == "mqar":
        return sample_multi_query(rng, n_filler_words)
    if name == "mqar_dense":
        return sample_multi_query(rng, n_filler_words, DENSE_PAIRS)
    if name == "hop_ladder":
        return sample_hop_ladder(rng, n_filler_words)
    if name == "hop_queries":
        return sample_chain_queries(rng, n_filler_words, LITERAL_SHARE)
    if name == "hop_steps":
        return sample_chain_queries(rng, n_filler_words, LITERAL_SHARE, after_statement=True)
    return sample_task_text(name, rng, n_filler_words)
