"""Probes: clean/corrupt prompt pairs that isolate one capability (retrieval or reasoning).

* ``make_probe(name, tokenizer, length=256, n_pairs=16, seed=0)``: a built-in probe (``list_probes()``,
  ``BUILTIN_PROBES``: name -> generator, capability, description) built for any tokenizer at an exact
  token length.
* ``load_probe_jsonl(path, tokenizer=None)`` / ``save_probe_jsonl(probe, path)``: user probes, one pair
  per line (format in ``headscope.probes.jsonl``).
* ``sample_task_text(name, rng, n_filler_words)``: training text in the built-in probes' format.
"""

from headscope.probes.base import CAPABILITIES, Probe, PromptPair
from headscope.probes.builtin import BUILTIN_PROBES, BuiltinProbe, list_probes, make_probe
from headscope.probes.jsonl import load_probe_jsonl, save_probe_jsonl
from headscope.probes.tasks import TASK_NAMES, sample_task_text, task_vocabulary

__all__ = [
    "BUILTIN_PROBES",
    "BuiltinProbe",
    "CAPABILITIES",
    "Probe",
    "PromptPair",
    "TASK_NAMES",
    "list_probes",
    "load_probe_jsonl",
    "make_probe",
    "sample_task_text",
    "save_probe_jsonl",
    "task_vocabulary",
]
