"""How the probe tasks are worded: the plain surface the demo model was trained on, and natural text.

A task (``headscope.probes.tasks``) decides WHAT an instance holds (which key, which value, which name is
the indirect object); a ``Surface`` decides how it reads. Two surfaces:

* ``PLAIN``: lowercase, every word and punctuation mark separated by a space, no instruction
  (``what is the special magic word for barrel ? answer :``). This is the format the bundled demo model and
  its word-level tokenizer were trained on; its prompts are unchanged from earlier releases.
* ``NATURAL``: text as a pretrained model saw it in training: sentence case, punctuation attached
  (``The special magic word for barrel is tiger.``), capitalised names, the essay haystack rendered the
  same way, a one-line instruction before retrieval tasks, and questions that end where the answer is due
  as the model would write it (``... The special magic word for barrel is`` -> `` tiger``, the answer
  token with its leading space), as RULER's answer prefixes do.

``surface_for(tokenizer)`` picks PLAIN for word-level tokenizers (they cannot spell natural text) and
NATURAL for every subword tokenizer (BPE, SentencePiece), i.e. for every real pretrained model.

Prompts are still assembled word by word (``headscope.probes.tokens``): a natural "word" is a
whitespace-separated chunk such as ``tiger.``, tokenised as the model would continue text with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Words = tuple[str, ...]


@dataclass(frozen=True)
class Surface:
    """Format strings of every task's facts and questions (``{slot}`` fields) plus haystack rendering.

    A text becomes words with ``str.split``: punctuation that stands apart in PLAIN is its own word.
    """

    name: str
    needle: str  # {kind} {key} {value}
    needle_query: str  # {kind} {key}
    kv_pair: str  # {key} {value}
    kv_separator: str
    kv_block: str  # {pairs}
    kv_query: str  # {key}
    hop_root: str  # {var} {value}
    hop: str  # {var} {prev}
    hop_query: str  # {var}
    ioi: str  # {first} {second} {place} {giver} {thing}
    comparison_fact: str  # {more_one} {comparative} {less_one}
    comparison_query: str  # {asked} {first} {second}
    intros: dict[str, str] = field(default_factory=dict)  # task name -> instruction ({kind}), prompt start
    capitalise_names: bool = False
    natural_haystack: bool = False
    max_sizes: dict[str, int] = field(default_factory=dict)  # task name -> cap on its growing size (kv pairs)

    def words(self, template: str, **slots: str) -> Words:
        return tuple(template.format(**slots).split())

    def intro(self, task: str, kind: str = "word") -> Words:
        """The instruction that opens a prompt of ``task`` (empty when the surface has none)."""
        return self.words(self.intros[task], kind=kind) if task in self.intros else ()

    def name_form(self, name: str) -> str:
        return name.capitalize() if self.capitalise_names else name

    def sentence(self, words: Words) -> Words:
        """A haystack sentence (stored PLAIN: lowercase, punctuation apart) rendered in this surface."""
        if not self.natural_haystack:
            return words
        out: list[str] = []
        for word in words:
            if word in ".,?:;!" and out:
                out[-1] += word
            else:
                out.append(word)
        if out:
            out[0] = out[0][:1].upper() + out[0][1:]
        return tuple(out)


PLAIN = Surface(
    name="plain",
    needle="the special magic {kind} for {key} is {value} .",
    needle_query="what is the special magic {kind} for {key} ? answer :",
    kv_pair="{key} : {value}",
    kv_separator=" , ",
    kv_block="{pairs} .",
    kv_query="recall {key} :",
    hop_root="{var} = {value} .",
    hop="{var} = {prev} .",
    hop_query="what is {var} ? answer :",
    ioi="when {first} and {second} went to the {place} , {giver} gave a {thing} to",
    comparison_fact="{more_one} is {comparative} than {less_one} .",
    comparison_query="who is {asked} , {first} or {second} ? answer :",
)

NATURAL = Surface(
    name="natural",
    needle="The special magic {kind} for {key} is {value}.",
    needle_query="What is the special magic {kind} for {key}? The special magic {kind} for {key} is",
    kv_pair="{key}: {value}",
    kv_separator=", ",
    kv_block="Keys and values: {pairs}.",
    kv_query="What is the value of {key}? {key}:",
    hop_root="Let {var} be {value}.",
    hop="Let {var} be {prev}.",
    hop_query="What is {var}? {var} is",
    ioi="When {first} and {second} went to the {place}, {giver} gave a {thing} to",
    comparison_fact="{more_one} is {comparative} than {less_one}.",
    comparison_query="Question: Who is {asked}, {first} or {second}? Answer:",
    intros={
        "needle_single": "A special magic {kind} is hidden in the text below. Remember it; you will be asked for it.",
        "needle_multikey": "Special magic {kind}s are hidden in the text below. Remember them; you will be asked for one.",
        "kv_recall": "The text below holds a list of keys and their values. Remember the list; you will be asked for one value.",
        "multihop": "The text below defines some variables. Follow the definitions; you will be asked for the value of one.",
    },
    capitalise_names=True,
    natural_haystack=True,
    # SmolLM2-135M recalls 0.41 / 0.31 of 4 pairs at 512 / 2048 tokens, 0.12 of 32 (the plain cap)
    max_sizes={"kv_recall": 4},
)

SURFACES: dict[str, Surface] = {surface.name: surface for surface in (PLAIN, NATURAL)}


def surface_for(tokenizer: Any) -> Surface:
    """PLAIN for a word-level tokenizer (it has no tokens for ``tiger.`` or ``Mary``), NATURAL otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = type(getattr(backend, "model", None)).__name__
    return PLAIN if model == "WordLevel" else NATURAL
