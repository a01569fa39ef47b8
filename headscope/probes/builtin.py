"""Built-in probe generators and their registry.

Each generator ``(tokenizer, length, n_pairs, seed) -> Probe`` samples ``n_pairs`` instances of one task
of ``headscope.probes.tasks`` from the single-token word pools of ``tokenizer`` and assembles them at the
token level (``headscope.probes.tokens``) into prompts of exactly ``length`` tokens. Tasks whose content
grows with the prompt (``kv_recall``: number of pairs; ``induction``: segment length) pick their size from
``length``; every other task pads with haystack filler. Generators are deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from headscope.heads import HeadscopeError
from headscope.probes.base import Probe
from headscope.probes.surface import SURFACES, Surface
from headscope.probes.tasks import TASK_NAMES, TASKS, Pools, Task, get_task
from headscope.probes.tokens import TokenVocab, assemble_pair

Generator = Callable[[Any, int, int, int], Probe]


@dataclass(frozen=True)
class BuiltinProbe:
    """A registry entry: the generator ``(tokenizer, length, n_pairs, seed) -> Probe`` and what it probes."""

    generator: Generator
    capability: str
    description: str


def _content_size(task: Task, vocab: TokenVocab, pools: Pools, length: int) -> int:
    """The sampler size (pairs, words) whose facts and query take ``share`` of ``length`` tokens.

    The token cost is affine in the size (every slot word is one token), so two trial instances give it.
    """
    if task.sizes is None:
        return 0
    smallest, largest_for, share = task.sizes
    largest = min(largest_for(pools), vocab.surface.max_sizes.get(task.name, largest_for(pools)))
    trial = random.Random(0)
    base = vocab.cost(task.sample(trial, pools, smallest, vocab.surface))
    if base > length:
        raise HeadscopeError(f"probe {task.name} needs prompts of at least {base} tokens with this tokenizer, got length {length}")
    if largest <= smallest:
        return smallest
    per_unit = vocab.cost(task.sample(trial, pools, smallest + 1, vocab.surface)) - base
    extra = int((share * length - base) // per_unit) if share * length > base else 0
    return min(smallest + extra, largest)


def _sample_instances(task: Task, vocab: TokenVocab, pools: Pools, size: int, n_pairs: int, rng: random.Random) -> list:
    """``n_pairs`` instances whose clean and corrupt texts tokenise to equal lengths (others are redrawn)."""
    instances = []
    for _ in range(20 * n_pairs):
        instance = task.sample(rng, pools, size, vocab.surface)
        if vocab.equal_lengths(instance):
            instances.append(instance)
            if len(instances) == n_pairs:
                return instances
    raise HeadscopeError(f"with this tokenizer, clean and corrupt prompts rarely tokenise to equal lengths ({len(instances)} of "
                         f"{20 * n_pairs} draws); try surface 'plain'")


def generate_task_probe(task: Task, tokenizer: Any, length: int, n_pairs: int, seed: int = 0, surface: Surface | None = None) -> Probe:
    """``n_pairs`` prompt pairs of ``task``, each exactly ``length`` tokens, deterministic for ``seed``.

    ``surface`` defaults to ``surface_for(tokenizer)`` (natural text for subword tokenizers).

    Raises:
        HeadscopeError: the tokenizer has too few single-token words for the task, or ``length`` is
            shorter than the task needs (the message says the minimum).
    """
    vocab = TokenVocab(tokenizer, surface)
    try:
        pools = vocab.pools()
        size = _content_size(task, vocab, pools, length)
        rng = random.Random(f"{task.name}/{seed}")
        instances = _sample_instances(task, vocab, pools, size, n_pairs, rng)
    except HeadscopeError as err:
        message = str(err)
        raise HeadscopeError(message if message.startswith("probe ") else f"probe {task.name} {message}") from None
    required = max(vocab.cost(instance) for instance in instances)
    if required > length:
        raise HeadscopeError(f"probe {task.name} needs prompts of at least {required} tokens with this tokenizer, got length {length}")
    pairs = [assemble_pair(task, instance, vocab, length, rng) for instance in instances]
    meta = {
        "generator": task.name, "length": length, "seed": seed, "n_pairs": n_pairs, "size": size,
        "haystack": task.haystack or "none", "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
        "surface": vocab.surface.name,
    }
    return Probe(task.name, task.capability, pairs, meta=meta)


def _generator(task: Task) -> Generator:
    def generate(tokenizer: Any, length: int, n_pairs: int, seed: int = 0, surface: Surface | None = None) -> Probe:
        return generate_task_probe(task, tokenizer, length, n_pairs, seed, surface)

    generate.__name__ = task.name
    generate.__doc__ = f"Built-in probe {task.name}: {task.description}."
    return generate


BUILTIN_PROBES: dict[str, BuiltinProbe] = {
    name: BuiltinProbe(_generator(TASKS[name]), TASKS[name].capability, TASKS[name].description) for name in TASK_NAMES
}


def list_probes() -> list[str]:
    """The built-in probe names (``BUILTIN_PROBES[name]`` has capability and description)."""
    return list(BUILTIN_PROBES)


def make_probe(name: str, tokenizer: Any, length: int = 256, n_pairs: int = 16, seed: int = 0, surface: str | None = None) -> Probe:
    """Generate built-in probe ``name`` for ``tokenizer``.

    Args:
        name: a key of ``BUILTIN_PROBES``.
        tokenizer: a Hugging Face tokenizer (any kind: word-level, BPE, SentencePiece).
        length: tokens per prompt, the tokenizer's special prefix (BOS) included.
        n_pairs: prompt pairs to generate.
        seed: generator seed; equal seeds give equal probes.
        surface: ``"plain"`` or ``"natural"`` (``headscope.probes.surface``); default: natural text for
            subword tokenizers, plain for word-level ones.

    Returns:
        the ``Probe``; ``Probe.check_fits`` tests it against a model's context.
    """
    task = get_task(name)
    if tokenizer is None:
        raise HeadscopeError(f"built-in probe {name} needs a tokenizer")
    if length < 1 or n_pairs < 1:
        raise HeadscopeError(f"probe {name}: length and n_pairs must be at least 1, got length={length}, n_pairs={n_pairs}")
    if surface is not None and surface not in SURFACES:
        raise HeadscopeError(f"unknown probe surface {surface!r}; known: {', '.join(SURFACES)}")
    return generate_task_probe(task, tokenizer, length, n_pairs, seed, SURFACES[surface] if surface else None)
