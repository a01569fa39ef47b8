"""User probes as JSONL files: one clean/corrupt prompt pair per line.

Format (one JSON object per line; blank lines are skipped; one format per file):

* ids (no tokenizer needed; what ``save_probe_jsonl`` writes)::

    {"clean_ids": [12, 7, 99, 4], "corrupt_ids": [12, 8, 99, 4], "answer_id": 31, "wrong_id": 40}

* text (needs the model's tokenizer)::

    {"clean": "when mary and john went to the store , john gave a drink to",
     "corrupt": "when mary and john went to the store , mary gave a drink to",
     "answer": "mary", "wrong": "john"}

Rules, checked for every line (a violation raises ``HeadscopeError`` naming the file and line number;
nothing is returned until the whole file is valid):

* clean and corrupt must have the same number of tokens (after tokenisation for text lines), all lines
  the same number, and clean must differ from corrupt; answer and wrong must differ.
* text prompts are tokenised as the model would read them: special prefix (e.g. BOS) included.
* ``answer`` and ``wrong`` must each be exactly ONE token. They are tokenised as the tokenizer continues
  the clean prompt (leading/trailing spaces of answer and wrong are ignored): first as the next word
  after a space, ``ids(clean + " " + answer)`` minus ``ids(clean)`` (GPT-2's ``Ġmary``, SentencePiece's
  ``▁mary``); if that is not one token for both, glued to the prompt, ``ids(clean + answer)`` minus
  ``ids(clean)`` (answers like ``","``). A prompt that ends in whitespace is only tried glued (a BPE
  tokenizer keeps a trailing space as a token of its own; better drop it). A form counts only if it
  leaves the prompt's own tokens unchanged and gives ONE token for both answer and wrong; the probe's
  ``meta["answer_forms"]`` records which forms were used. ``SPACE_SPLIT`` marks a glued answer whose spaced
  form is a bare space token and then the same token (digits with SmolLM2's tokenizer: ``" 5"`` is ``[" ",
  "5"]``): the metric then reads the answer right after the prompt, where the model may put the space first;
  ``headscope score`` says so (end such prompts with the space if the model writes one). An optional
  ``"answer_form": "space"`` or ``"glued"`` on a text line takes that form only (a prompt ending in ``"``
  or ``(`` is continued glued, ``Paris`` and not `` Paris``; the spaced form would otherwise win).
* keys: exactly ``clean, corrupt, answer, wrong`` or exactly ``clean_ids, corrupt_ids, answer_id,
  wrong_id``; ids are non-negative integers.

The probe is named after the file (``name`` overrides) and has capability ``"retrieval"`` unless the
``capability`` argument (the CLI's ``--capability``) says ``"reasoning"``; ``fuse`` weights capabilities equally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from headscope.heads import HeadscopeError, read_jsonl, write_text_atomic
from headscope.probes.base import Probe, PromptPair
from headscope.probes.tokens import encode_plain, special_prefix

TEXT_KEYS = ("clean", "corrupt", "answer", "wrong")
OPTIONAL_TEXT_KEYS = ("answer_form",)
ANSWER_FORMS = ("space", "glued")
ID_KEYS = ("clean_ids", "corrupt_ids", "answer_id", "wrong_id")


def _line_format(obj: Any, where: str) -> str:
    """``"text"`` or ``"ids"`` for one parsed line, or a HeadscopeError on bad keys."""
    if not isinstance(obj, dict):
        raise HeadscopeError(f"{where}: expected a JSON object with keys {', '.join(ID_KEYS)} or {', '.join(TEXT_KEYS)}")
    keys = set(obj)
    text, ids = keys & set(TEXT_KEYS), keys & set(ID_KEYS)
    if text and ids:
        raise HeadscopeError(f"{where}: mixes text keys ({', '.join(sorted(text))}) with id keys ({', '.join(sorted(ids))}); use one format")
    unknown = keys - set(TEXT_KEYS) - set(ID_KEYS) - (set(OPTIONAL_TEXT_KEYS) if text else set())
    if unknown:
        raise HeadscopeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    expected = TEXT_KEYS if text else ID_KEYS
    missing = [k for k in expected if k not in keys]
    if missing:
        raise HeadscopeError(f"{where}: missing key(s) {', '.join(missing)}")
    return "text" if text else "ids"


def _token_ids(value: Any, key: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise HeadscopeError(f"{where}: {key} must be a non-empty list of non-negative integer token ids")
    return tuple(value)


def _token_id(value: Any, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HeadscopeError(f"{where}: {key} must be a non-negative integer token id, got {value!r}")
    return value


SPACE_SPLIT = "glued (its spaced form is a space token + it)"


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise HeadscopeError(f"{where}: {key} must be a non-empty string")
    return value


def _continuation(tokenizer: Any, prompt_ids: list[int], full: str) -> list[int] | None:
    """The ids ``full`` adds after the prompt, or None when tokenising ``full`` changes the prompt's ids."""
    (ids,) = encode_plain(tokenizer, [full])
    return ids[len(prompt_ids) :] if ids[: len(prompt_ids)] == prompt_ids else None


def answer_tokens(tokenizer: Any, clean: str, answer: str, wrong: str, where: str, only: str | None = None) -> tuple[int, int, str]:
    """The single-token ids of ``answer`` and ``wrong`` continuing ``clean``, and the form used.

    Args:
        only: ``"space"`` or ``"glued"``: that form alone (the line's ``answer_form``); None: space, then glued.
    Returns:
        ``(answer_id, wrong_id, form)`` with form ``"space"`` or ``"glued"`` (module docstring).
    """
    (prompt_ids,) = encode_plain(tokenizer, [clean])
    words = (answer.strip(), wrong.strip())
    forms = {"glued": [_continuation(tokenizer, prompt_ids, clean + w) for w in words]}
    if not clean[-1:].isspace():
        forms = {"space": [_continuation(tokenizer, prompt_ids, f"{clean} {w}") for w in words], **forms}
    if only is not None:
        if only not in forms:
            raise HeadscopeError(f"{where}: answer_form 'space' after a prompt that ends in whitespace; drop the whitespace")
        forms = {only: forms[only]}
    for form, (answer_ids, wrong_ids) in forms.items():
        if answer_ids is not None and wrong_ids is not None and len(answer_ids) == 1 and len(wrong_ids) == 1:
            spaced = forms.get("space", [None])[0]
            if form == "glued" and spaced is not None and len(spaced) == 2 and spaced[1] == answer_ids[0]:
                form = SPACE_SPLIT  # " 5" is [" ", "5"]: the model may well write the space token first
            return answer_ids[0], wrong_ids[0], form
    hint = "; the prompt ends in whitespace, which BPE tokenizers keep as a token of its own: drop it" if clean[-1:].isspace() else ""
    for index, (key, word) in enumerate(zip(("answer", "wrong"), words)):
        tried = {form: ids[index] for form, ids in forms.items()}
        if not any(ids is not None and len(ids) == 1 for ids in tried.values()):
            shown = "; ".join(f"{form}: {ids if ids is not None else 'changes the prompt tokens'}" for form, ids in tried.items())
            raise HeadscopeError(f"{where}: {key} {word!r} is not a single token with this tokenizer ({shown}){hint}")
    raise HeadscopeError(f"{where}: answer {words[0]!r} and wrong {words[1]!r} are single tokens only in different forms "
                         f"({', '.join(forms)}); give both in one form")


def _check_prompts(clean: tuple[int, ...], corrupt: tuple[int, ...], where: str) -> None:
    if len(clean) != len(corrupt):
        raise HeadscopeError(f"{where}: clean has {len(clean)} tokens but corrupt has {len(corrupt)}; they must have equal token length")
    if clean == corrupt:
        raise HeadscopeError(f"{where}: clean and corrupt prompts are identical")


def _pair(obj: dict, line_format: str, tokenizer: Any, prefix: list[int], where: str) -> tuple[PromptPair, str]:
    if line_format == "ids":
        clean = _token_ids(obj["clean_ids"], "clean_ids", where)
        corrupt = _token_ids(obj["corrupt_ids"], "corrupt_ids", where)
        _check_prompts(clean, corrupt, where)
        answer, wrong, form = _token_id(obj["answer_id"], "answer_id", where), _token_id(obj["wrong_id"], "wrong_id", where), "ids"
    else:
        texts = {key: _text(obj[key], key, where) for key in TEXT_KEYS}
        clean_ids, corrupt_ids = encode_plain(tokenizer, [texts["clean"], texts["corrupt"]])
        clean, corrupt = tuple(prefix + clean_ids), tuple(prefix + corrupt_ids)
        _check_prompts(clean, corrupt, where)
        only = obj.get("answer_form")
        if only is not None and only not in ANSWER_FORMS:
            raise HeadscopeError(f"{where}: answer_form must be one of {', '.join(ANSWER_FORMS)}, got {only!r}")
        answer, wrong, form = answer_tokens(tokenizer, texts["clean"], texts["answer"], texts["wrong"], where, only)
    if answer == wrong:
        raise HeadscopeError(f"{where}: answer and wrong are the same token ({answer})")
    return PromptPair(clean, corrupt, answer, wrong), form


def load_probe_jsonl(path: str | os.PathLike, tokenizer: Any = None, name: str | None = None, capability: str = "retrieval") -> Probe:
    """Read a probe from a JSONL file (format in the module docstring).

    Args:
        path: the ``.jsonl`` file.
        tokenizer: the model's Hugging Face tokenizer; required for text lines.
        name: probe name (default: the file name without extension).
        capability: ``"retrieval"`` or ``"reasoning"``.

    Returns:
        the ``Probe`` (``meta``: source, format, answer_forms).

    Raises:
        HeadscopeError: the file is missing or empty, or a line breaks a rule (with its line number).
    """
    source = Path(path)
    if not source.is_file():
        raise HeadscopeError(f"probe file not found: {source}")
    records: list[tuple[int, dict, str]] = []  # (line number, object, format)
    for number, where, obj in read_jsonl(source, "probe"):
        line_format = _line_format(obj, where)
        if records and line_format != records[0][2]:
            raise HeadscopeError(f"{where}: uses the {line_format} format but line {records[0][0]} uses the "
                                 f"{records[0][2]} format; use one format per file")
        records.append((number, obj, line_format))
    if not records:
        raise HeadscopeError(f"probe file {source} has no prompt pairs")
    first_line, _, file_format = records[0]
    if file_format == "text" and tokenizer is None:
        raise HeadscopeError(f"{source}, line {first_line}: text lines need the model's tokenizer, but none was given")
    prefix = special_prefix(tokenizer) if tokenizer is not None else []
    pairs, forms = [], set()
    for number, obj, line_format in records:
        pair, form = _pair(obj, line_format, tokenizer, prefix, f"{source}, line {number}")
        if pairs and len(pair.clean_ids) != len(pairs[0].clean_ids):
            raise HeadscopeError(f"{source}, line {number}: prompts have {len(pair.clean_ids)} tokens but line {first_line} has "
                                 f"{len(pairs[0].clean_ids)}; all pairs of a probe must have one length")
        pairs.append(pair)
        forms.add(form)
    meta = {"source": str(source), "format": file_format, "answer_forms": ",".join(sorted(forms))}
    return Probe(name or source.stem, capability, pairs, meta=meta)


def save_probe_jsonl(probe: Probe, path: str | os.PathLike) -> Path:
    """Write ``probe`` in the ids format, atomically (temporary file, then rename).

    Returns:
        the path written.
    """
    lines = [
        json.dumps({"clean_ids": list(p.clean_ids), "corrupt_ids": list(p.corrupt_ids), "answer_id": p.answer_id, "wrong_id": p.wrong_id})
        for p in probe.pairs
    ]
    return write_text_atomic(path, "\n".join(lines) + "\n")
