"""The finite word lists the probe tasks draw their keys, values, names and variables from.

Every task slot (a needle's key and value, an IOI name, a multi-hop variable ...) is filled from one of
these lists. The lists are finite so that a word-level tokenizer can cover them (``task_vocabulary`` in
``headscope.probes.tasks`` lists every word a task can emit). A token-level probe only uses the words of
a list that the given tokenizer continues a prompt with as ONE token (see ``headscope.probes.tokens``).

The lists are disjoint from each other and from the haystack vocabulary (a test checks this), so a slot
word never appears by accident in the filler text or in another slot's role.
"""

from __future__ import annotations

# Needle and key-value keys: concrete nouns.
KEYS: tuple[str, ...] = tuple(
    """
    anchor badge barrel basket beacon bucket button candle carpet castle chisel cloak compass crown dagger
    drum engine fiddle flask flute glove hammer helmet kettle kite ladder lantern lever locket magnet mirror
    oven paddle parcel pencil piano pillow pipe puzzle quilt rocket saddle scarf shield shovel spoon statue
    sword tablet teapot ticket trumpet tunnel umbrella vase wagon whistle wallet wheel window bottle jacket
    """.split()
)

# Values: two-digit numbers (single tokens in GPT-2-like tokenizers) and animal words (single tokens in
# tokenizers that split digits, like Qwen's and Llama 3's).
NUMBER_VALUES: tuple[str, ...] = tuple(str(n) for n in range(10, 100))
WORD_VALUES: tuple[str, ...] = tuple(
    """
    tiger zebra otter falcon badger beaver camel cobra coyote eagle ferret gecko goose hawk heron hyena
    jaguar koala lemur llama lynx moose newt panda parrot pelican penguin puma rabbit raven salmon seal
    shark sheep snail spider swan turtle walrus whale wolf
    """.split()
)

# People (IOI and comparison). Lowercase like every other word of the task formats.
NAMES: tuple[str, ...] = tuple(
    """
    mary john tom ann kate paul sarah james lucy peter emma david alice henry laura george susan frank
    helen oscar nina victor rosa hugo clara felix irene simon diana edward olivia martin julia daniel
    sophie robert grace adam
    """.split()
)

# Multi-hop variables: single letters, without "a" and "i" (English words in the filler).
VARIABLES: tuple[str, ...] = tuple("bcdefghjklmnpqrstuvwxyz")

# IOI scenery: where the two people went and what was handed over ("a <object>": consonant-initial).
PLACES: tuple[str, ...] = tuple("store park market school station beach library hospital bakery museum cinema theater".split())
OBJECTS: tuple[str, ...] = tuple("drink book ball letter gift cake bag pen ring toy hat cup".split())

# Comparison: (comparative, its opposite). "x is <comparative> than y" answers "who is <comparative>" with x
# and "who is <opposite>" with y.
COMPARATIVES: tuple[tuple[str, str], ...] = (
    ("taller", "shorter"),
    ("older", "younger"),
    ("faster", "slower"),
    ("stronger", "weaker"),
    ("richer", "poorer"),
    ("heavier", "lighter"),
    ("louder", "quieter"),
    ("happier", "sadder"),
)

WORD_LISTS: dict[str, tuple[str, ...]] = {
    "keys": KEYS,
    "number_values": NUMBER_VALUES,
    "word_values": WORD_VALUES,
    "names": NAMES,
    "variables": VARIABLES,
    "places": PLACES,
    "objects": OBJECTS,
    "comparatives": tuple(word for pair in COMPARATIVES for word in pair),
}
