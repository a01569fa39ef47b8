"""Probes: built-in generators for any tokenizer, their task semantics, JSONL files, haystack, CLI."""

from __future__ import annotations

import json
import random
import re
import warnings

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from fixtures import make_bpe_tokenizer, make_word_tokenizer
from headscope import HeadscopeError
from headscope.cli import main
from headscope.probes import BUILTIN_PROBES, TASK_NAMES, list_probes, load_probe_jsonl, make_probe, sample_task_text, save_probe_jsonl, task_vocabulary
from headscope.probes import haystack, vocab
from headscope.probes.surface import NATURAL, PLAIN, SURFACES, surface_for
from headscope.probes.tokens import TokenVocab

LENGTHS = (64, 150, 513)
NATURAL_LENGTHS = (150, 257, 513)  # the instruction and the answer prefixes take more tokens
# Positions where clean and corrupt differ: exactly where the capability matters.
CHANGED_TOKENS = {"needle_single": 1, "needle_multikey": 1, "kv_recall": 2, "induction": 1, "multihop": 1, "ioi": 1, "comparison": 2}


@pytest.fixture(scope="module")
def tokenizers():
    rng = random.Random(0)
    texts = [" ".join(s) for s in haystack.haystack_sentences("essay")[:1000]]
    texts += [" ".join(sample_task_text(name, rng, 5)) for name in TASK_NAMES for _ in range(200)]
    natural = [" ".join(NATURAL.sentence(s)) for s in haystack.haystack_sentences("essay")[:1000]]
    natural += [" ".join(sample_task_text(name, rng, 5, NATURAL)) for name in TASK_NAMES for _ in range(200)]
    return {
        "bpe_nat": make_bpe_tokenizer(natural, vocab_size=1300),
        "spm_nat": make_bpe_tokenizer(natural, vocab_size=1100, sentencepiece_style=True),
        "word": make_word_tokenizer(task_vocabulary(), add_bos=True),
        "bpe": make_bpe_tokenizer(texts, vocab_size=1100),  # rarer words (numbers, places ...) split
        "spm": make_bpe_tokenizer(texts, vocab_size=800, sentencepiece_style=True),  # BOS, digits split: word values
    }


def words_of(tok, ids) -> list[str]:
    return tok.decode([i for i in ids if i not in tok.all_special_ids]).split()


def solve(name: str, words: list[str]) -> str:
    """What a prompt asks for, read off its words by the task's rule (each fact must be unambiguous)."""
    def only(found: list[str]) -> str:
        assert len(found) == 1, found
        return found[0]

    n = len(words)
    if name in ("needle_single", "needle_multikey"):  # ... for KEY ? answer :
        key = words[-4]
        return only([words[i + 3] for i in range(n - 3) if words[i : i + 3] == ["for", key, "is"]])
    if name == "kv_recall":  # recall KEY :
        return only([words[i + 2] for i in range(n - 3) if words[i] == words[-2] and words[i + 1] == ":"])
    if name == "induction":
        return only([words[i + 1] for i in range(n - 1) if words[i] == words[-1]])
    if name == "multihop":  # what is VAR ? answer :
        bindings = {}
        for i in range(n - 3):
            if words[i + 1] == "=" and words[i + 3] == ".":
                assert words[i] not in bindings
                bindings[words[i]] = words[i + 2]
        value = words[-4]
        while value in bindings:
            value = bindings[value]
        return value
    if name == "ioi":  # when X and Y went to the PLACE , S gave a OBJECT to
        start = max(i for i in range(n) if words[i] == "when")
        first, second, subject = words[start + 1], words[start + 3], words[n - 5]
        assert subject in (first, second) and first != second
        return second if subject == first else first
    if name == "comparison":  # who is ASKED , X or Y ? answer :
        asked, x, y = words[-8], words[-6], words[-4]
        facts = [(words[i], words[i + 2], words[i + 4]) for i in range(n - 4) if words[i + 1] == "is" and words[i + 3] == "than"]
        big, more, small = only([f for f in facts if {f[0], f[2]} == {x, y}])
        return big if asked == more else small
    raise AssertionError(name)


def solve_natural(name: str, text: str) -> str:
    """``solve`` for the NATURAL wording (``headscope.probes.surface``), read off the decoded text."""
    def only(found: list[str]) -> str:
        assert len(found) == 1, found
        return found[0]

    if name in ("needle_single", "needle_multikey"):  # ... The special magic KIND for KEY is
        key = re.search(r"for (\w+) is$", text).group(1)
        return only(re.findall(rf"for {key} is (\w+)\.", text))
    if name == "kv_recall":  # What is the value of KEY? KEY:
        key = re.search(r"(\w+):$", text).group(1)
        return only(re.findall(rf"\b{key}: (\w+)[,.]", text))
    if name == "induction":
        return solve(name, text.split())
    if name == "multihop":  # Let X be Y. ... What is X? X is
        bindings = dict(re.findall(r"Let (\w+) be (\w+)\.", text))
        value = re.search(r"(\w+) is$", text).group(1)
        while value in bindings:
            value = bindings[value]
        return value
    if name == "ioi":  # When X and Y went to the PLACE, S gave a OBJECT to
        first, second, subject = re.findall(r"When (\w+) and (\w+) went to the \w+, (\w+) gave a \w+ to$", text)[0]
        assert subject in (first, second) and first != second
        return second if subject == first else first
    if name == "comparison":  # Question: Who is ASKED, X or Y? Answer:
        asked, x, y = re.search(r"Who is (\w+), (\w+) or (\w+)\? Answer:$", text).groups()
        facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", text)
        big, more, small = only([f for f in facts if {f[0], f[2]} == {x, y}])
        return big if asked == more else small
    raise AssertionError(name)


# tokenizer kind, surface: the word-level tokenizer can only spell PLAIN; subword ones both
SURFACE_CASES = [("word", "plain"), ("bpe", "plain"), ("spm", "plain"), ("bpe_nat", "natural"), ("spm_nat", "natural")]


def test_surface_defaults(tokenizers):
    assert surface_for(tokenizers["word"]) is PLAIN
    assert surface_for(tokenizers["bpe"]) is NATURAL and surface_for(tokenizers["spm"]) is NATURAL
    assert make_probe("ioi", tokenizers["bpe_nat"], length=64, n_pairs=1).meta["surface"] == "natural"
    with pytest.raises(HeadscopeError, match="unknown probe surface 'fancy'; known: plain, natural"):
        make_probe("ioi", tokenizers["bpe"], surface="fancy")
    assert NATURAL.sentence(("in", "the", "morning", ",", "the", "road", "ends", ".")) == ("In", "the", "morning,", "the", "road", "ends.")


@pytest.mark.parametrize("kind,surface", SURFACE_CASES)
@pytest.mark.parametrize("name", TASK_NAMES)
def test_builtin_probe_pairs(tokenizers, kind, surface, name):
    tok = tokenizers[kind]
    vocab_ = TokenVocab(tok, SURFACES[surface])
    for length in LENGTHS if surface == "plain" else NATURAL_LENGTHS:
        probe = make_probe(name, tok, length=length, n_pairs=3, seed=length, surface=surface)
        assert probe.length == length and len(probe) == 3 and probe.capability == BUILTIN_PROBES[name].capability
        for pair in probe.pairs:
            assert len(pair.clean_ids) == len(pair.corrupt_ids) == length
            assert list(pair.clean_ids[: len(vocab_.prefix)]) == vocab_.prefix
            changed = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupt_ids)) if a != b]
            if surface == "plain":
                assert len(changed) == CHANGED_TOKENS[name]
            else:  # a slot word may merge with the punctuation attached to it (``kettle?``), so more may differ
                assert CHANGED_TOKENS[name] <= len(changed) <= 3 * CHANGED_TOKENS[name]
            assert pair.answer_id != pair.wrong_id
            answer, wrong = tok.decode([pair.answer_id]).strip(), tok.decode([pair.wrong_id]).strip()
            assert vocab_.ids([answer]) == [pair.answer_id] and vocab_.ids([wrong]) == [pair.wrong_id]  # single tokens
            if surface == "plain":
                assert solve(name, words_of(tok, pair.clean_ids)) == answer
                assert solve(name, words_of(tok, pair.corrupt_ids)) == wrong
            else:
                assert solve_natural(name, " ".join(words_of(tok, pair.clean_ids))) == answer
                assert solve_natural(name, " ".join(words_of(tok, pair.corrupt_ids))) == wrong
        if kind == "spm" and name in ("needle_single", "kv_recall", "multihop"):
            assert not any(w.isdigit() for w in words_of(tok, probe.pairs[0].clean_ids))  # numbers are 3 tokens here
        if kind.startswith("bpe"):  # per-word assembly equals tokenising the decoded text (whitespace pre-split)
            clean = probe.pairs[0].clean_ids
            assert tok(tok.decode(clean), add_special_tokens=False)["input_ids"] == list(clean)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_deterministic_for_a_seed(tokenizers, name):
    tok = tokenizers["bpe_nat"]
    first = make_probe(name, tok, length=160, n_pairs=4, seed=7)
    assert make_probe(name, tok, length=160, n_pairs=4, seed=7).pairs == first.pairs
    assert make_probe(name, tok, length=160, n_pairs=4, seed=8).pairs != first.pairs


@pytest.mark.parametrize("name", TASK_NAMES)
def test_too_short_says_the_minimum(tokenizers, name):
    tok = tokenizers["word"]
    with pytest.raises(HeadscopeError, match=rf"probe {name} needs prompts of at least \d+ tokens") as err:
        make_probe(name, tok, length=4, n_pairs=2)
    minimum = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert make_probe(name, tok, length=minimum, n_pairs=2).length == minimum
    with pytest.raises(HeadscopeError, match="at least"):
        make_probe(name, tok, length=minimum - 1, n_pairs=2)


def test_registry_and_errors(tokenizers):
    assert list_probes() == list(TASK_NAMES) and len(TASK_NAMES) == 7
    assert {BUILTIN_PROBES[n].capability for n in TASK_NAMES} == {"retrieval", "reasoning"}
    with pytest.raises(HeadscopeError, match="unknown probe 'nope'; built-in probes: needle_single, needle_multikey"):
        make_probe("nope", tokenizers["word"])
    with pytest.raises(HeadscopeError, match="needs a tokenizer"):
        make_probe("ioi", None)
    no_names = make_word_tokenizer([w for w in task_vocabulary() if w not in vocab.NAMES])
    with pytest.raises(HeadscopeError, match="probe ioi needs 2 distinct names but only 0 are usable"):
        make_probe("ioi", no_names, length=64)
    probe = make_probe("ioi", tokenizers["word"], length=64, n_pairs=1)
    with pytest.raises(HeadscopeError, match="context is 32 tokens"):
        probe.check_fits(32)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_text_matches_probe_format(name):
    rng = random.Random(3)
    known = set(task_vocabulary())
    for n_filler in (0, 7, 40):
        prompt, answer = sample_task_text(name, rng, n_filler)
        words = prompt.split()
        assert set(words) <= known and " " not in answer
        assert solve(name, words) == answer
    assert sample_task_text(name, random.Random(5), 30) == sample_task_text(name, random.Random(5), 30)


def test_word_lists_disjoint_and_haystack_shipped():
    lists = [set(words) for words in vocab.WORD_LISTS.values()]
    assert sum(len(s) for s in lists) == len(set().union(*lists))
    assert not set().union(*lists) & haystack.haystack_words()
    shipped = (haystack.HAYSTACK_DIR / "essay.txt").read_text(encoding="utf-8").splitlines()
    assert shipped == haystack.generate_essay()
    assert (haystack.HAYSTACK_DIR / "noise.txt").read_text(encoding="utf-8").splitlines() == list(haystack.NOISE_SENTENCES)


def test_haystack_generated_when_file_missing(monkeypatch, tmp_path):
    shipped = haystack.haystack_sentences("essay")
    monkeypatch.setattr(haystack, "HAYSTACK_DIR", tmp_path)
    haystack.haystack_sentences.cache_clear()
    try:
        with pytest.warns(UserWarning, match="generating the essay haystack"):
            assert haystack.haystack_sentences("essay") == shipped
    finally:
        haystack.haystack_sentences.cache_clear()


def test_window_is_exact_and_ends_on_a_sentence():
    sentences = [[f"s{i}w{j}" for j in range(1 + i % 4)] + ["."] for i in range(10)]
    rng = random.Random(0)
    for budget in (0, 1, 3, 17, 60):
        window = haystack.take_window(lambda i: sentences[i], len(sentences), rng, budget)
        assert sum(map(len, window)) == budget
        assert all(s in sentences for s in window[1:]) and (not window or window[-1][-1] == ".")
        flat, starts = haystack.insert_facts(window, [["F1"], ["F2", "x"]], rng)
        assert len(flat) == budget + 3 and flat[starts[0]] == "F1" and flat[starts[1]] == "F2" and starts[0] < starts[1]


def test_jsonl_round_trip(tokenizers, tmp_path):
    probe = make_probe("kv_recall", tokenizers["bpe"], length=80, n_pairs=3, surface="plain")
    path = save_probe_jsonl(probe, tmp_path / "kv.jsonl")
    loaded = load_probe_jsonl(path, name="kv", capability="retrieval")
    assert loaded.pairs == probe.pairs and loaded.name == "kv" and loaded.meta["format"] == "ids"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["word", "bpe", "spm"])
def test_jsonl_text_format(tokenizers, tmp_path, kind):
    tok = tokenizers[kind]
    clean = "when mary and john went to the store , john gave a drink to"
    corrupt = "when mary and john went to the store , mary gave a drink to"
    path = tmp_path / "ioi.jsonl"
    path.write_text(json.dumps({"clean": clean, "corrupt": corrupt, "answer": "mary", "wrong": " john"}) + "\n\n")
    probe = load_probe_jsonl(path, tokenizer=tok, capability="reasoning")
    pair = probe.pairs[0]
    assert probe.name == "ioi" and probe.capability == "reasoning" and probe.meta["answer_forms"] == "space"
    assert list(pair.clean_ids) == tok(clean)["input_ids"]
    assert [pair.answer_id, pair.wrong_id] == TokenVocab(tok).ids(["mary", "john"])
    # A prompt ending in a space: word-level continues with the glued word; BPE tokenizers end the prompt
    # with a lone space token that the glued answer would absorb: an error that says so.
    path.write_text(json.dumps({"clean": clean + " ", "corrupt": corrupt + " ", "answer": "mary", "wrong": "john"}) + "\n")
    if kind == "word":
        assert load_probe_jsonl(path, tokenizer=tok).meta["answer_forms"] == "glued"
    else:
        with pytest.raises(HeadscopeError, match=r"line 1: answer 'mary' is not a single token .*glued: changes the prompt tokens.*ends in whitespace"):
            load_probe_jsonl(path, tokenizer=tok)
    # Punctuation answers: whichever form makes "." and "," single tokens.
    path.write_text(json.dumps({"clean": "mary and john went", "corrupt": "john and mary went", "answer": ".", "wrong": ","}) + "\n")
    assert load_probe_jsonl(path, tokenizer=tok).meta["answer_forms"] in ("space", "glued")


def test_a_line_can_fix_the_answers_form(tmp_path):
    """``answer_form`` takes one form only: after an opening quote the model writes ``"mary``, glued, where the spaced
    form `` mary`` would win by default; a bad value, the key on an ids line, or ``space`` after whitespace are errors."""
    tok = make_bpe_tokenizer(['she said "mary" and he said "john" to mary and john'] * 50, 300)
    line = {"clean": 'she said "', "corrupt": 'he said "', "answer": "mary", "wrong": "john"}
    path = tmp_path / "forms.jsonl"
    path.write_text(json.dumps(line) + "\n")
    spaced = load_probe_jsonl(path, tokenizer=tok)
    assert spaced.meta["answer_forms"] == "space" and tok.convert_ids_to_tokens(spaced.pairs[0].answer_id) == "\u0120mary"
    path.write_text(json.dumps({**line, "answer_form": "glued"}) + "\n")
    glued = load_probe_jsonl(path, tokenizer=tok)
    assert glued.meta["answer_forms"] == "glued" and tok.convert_ids_to_tokens([glued.pairs[0].answer_id, glued.pairs[0].wrong_id]) == ["mary", "john"]
    for bad, message in (({**line, "answer_form": "spaced"}, "answer_form must be one of space, glued"),
                         ({**line, "clean": "she said ", "corrupt": "he said ", "answer_form": "space"}, "ends in whitespace"),
                         ({"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 4, "wrong_id": 5, "answer_form": "glued"}, "unknown key")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(HeadscopeError, match=message):
            load_probe_jsonl(path, tokenizer=tok)


def test_a_digit_answer_after_a_split_off_space_is_marked(tmp_path):
    """Tokenizers that split digits one by one (SmolLM2, Llama 2) make " 5" a bare space token and then "5": the
    glued "5" is scored right after the prompt, where the model may write the space first. The probe marks it
    (``SPACE_SPLIT``), ``headscope score`` prints a note, and ending the prompt with the space removes it."""
    from headscope.probes.jsonl import SPACE_SPLIT

    tok = make_bpe_tokenizer(["2 + 3 = 5 and 2 + 4 = 6 then 7 8 9 0 1 the sum is"] * 20, 200, sentencepiece_style=True)
    assert tok.tokenize(" 5") == ["\u2581", "5"]
    path = tmp_path / "digits.jsonl"
    path.write_text(json.dumps({"clean": "2 + 3 =", "corrupt": "2 + 4 =", "answer": "5", "wrong": "6"}) + "\n")
    assert load_probe_jsonl(path, tokenizer=tok).meta["answer_forms"] == SPACE_SPLIT
    path.write_text(json.dumps({"clean": "2 + 3 = 5", "corrupt": "2 + 4 = 6", "answer": "and", "wrong": "then"}) + "\n")
    assert load_probe_jsonl(path, tokenizer=tok).meta["answer_forms"] != SPACE_SPLIT


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_IDS = json.dumps({"clean_ids": [5, 6, 7], "corrupt_ids": [5, 8, 7], "answer_id": 9, "wrong_id": 10})
GOOD_TEXT = json.dumps({"clean": "the sky is blue . recall", "corrupt": "the sun is blue . recall", "answer": "mary", "wrong": "john"})
BAD_CASES = {
    "malformed": ([GOOD_IDS, '{"clean_ids": [1, 2'], "line 2: malformed JSON"),
    "not_object": ([GOOD_IDS, "[1, 2]"], "line 2: expected a JSON object"),
    "missing": ([GOOD_IDS, json.dumps({"clean_ids": [1], "corrupt_ids": [2], "answer_id": 3})], "line 2: missing key.s. wrong_id"),
    "mixed_line": ([json.dumps({"clean": "a", "corrupt_ids": [1], "answer": "b", "wrong": "c"})], "line 1: mixes text keys"),
    "mixed_file": ([GOOD_IDS, "", GOOD_TEXT], "line 3: uses the text format but line 1 uses the ids format"),
    "unknown_key": ([json.dumps({"clean_ids": [1], "corrupt_ids": [2], "answer_id": 3, "wrong_id": 4, "anwser": 1})], "line 1: unknown key.s. anwser"),
    "unequal_ids": ([GOOD_IDS, json.dumps({"clean_ids": [1, 2], "corrupt_ids": [1, 3, 4], "answer_id": 3, "wrong_id": 4})],
                    "line 2: clean has 2 tokens but corrupt has 3"),
    "unequal_text": ([GOOD_TEXT, json.dumps({"clean": "the sky is blue", "corrupt": "the sky is very blue", "answer": "mary", "wrong": "john"})],
                     "line 2: clean has \\d+ tokens but corrupt has \\d+"),
    "multi_token_answer": ([GOOD_TEXT, json.dumps({"clean": "the sky is blue", "corrupt": "the sun is blue", "answer": "mary john", "wrong": "john"})],
                           "line 2: answer 'mary john' is not a single token"),
    "same_answer": ([GOOD_IDS, json.dumps({"clean_ids": [1], "corrupt_ids": [2], "answer_id": 3, "wrong_id": 3})], "line 2: answer and wrong are the same token"),
    "identical": ([json.dumps({"clean_ids": [1, 2], "corrupt_ids": [1, 2], "answer_id": 3, "wrong_id": 4})], "line 1: clean and corrupt prompts are identical"),
    "bad_ids": ([json.dumps({"clean_ids": [1, -2], "corrupt_ids": [1, 3], "answer_id": 3, "wrong_id": 4})], "line 1: clean_ids must be a non-empty list"),
    "bool_id": ([json.dumps({"clean_ids": [1], "corrupt_ids": [2], "answer_id": True, "wrong_id": 4})], "line 1: answer_id must be a non-negative integer"),
    "lengths_differ": ([GOOD_IDS, json.dumps({"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 3, "wrong_id": 4})],
                       "line 2: prompts have 2 tokens but line 1 has 3"),
    "empty": (["", "  "], "has no prompt pairs"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_jsonl_bad_input(tokenizers, tmp_path, case):
    lines, message = BAD_CASES[case]
    with pytest.raises(HeadscopeError, match=message):
        load_probe_jsonl(_write(tmp_path, lines), tokenizer=tokenizers["bpe"])


def test_jsonl_text_needs_tokenizer_and_file(tmp_path):
    with pytest.raises(HeadscopeError, match="line 1: text lines need the model's tokenizer"):
        load_probe_jsonl(_write(tmp_path, [GOOD_TEXT]))
    with pytest.raises(HeadscopeError, match="probe file not found"):
        load_probe_jsonl(tmp_path / "missing.jsonl")


def test_cli_list_and_show(tokenizers, tmp_path, capsys):
    assert main(["probes"]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s+{BUILTIN_PROBES[name].capability}\s", listed, re.M) for name in TASK_NAMES)
    tok = tokenizers["word"]
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["probes", "show", "ioi", "--model", str(tmp_path), "--length", "40", "--pair", "1"]) == 0
    shown = capsys.readouterr().out
    assert "ioi (reasoning), 40 tokens, pair 1" in shown and len(re.findall(r"\[\[\w+\]\]", shown)) == 2 and "gave a" in shown
    for name, pairs in (("needle_single", None), ("kv_recall", "4")):  # the pair `score` uses with the same settings
        extra = ["--pairs", pairs] if pairs else []
        assert main(["probes", "show", name, "--model", str(tmp_path), "--length", "60", "--pair", "2", *extra]) == 0
        shown = capsys.readouterr().out
        pair = make_probe(name, tok, length=60, n_pairs=int(pairs or 16)).pairs[2]
        assert f"answer:  {tok.decode([pair.answer_id])!r} (id {pair.answer_id})" in shown
        assert tok.decode(list(pair.clean_ids)).split()[:6] == shown.split("clean:")[1].split()[:6]
    assert main(["probes", "show", "ioi", "--model", str(tmp_path), "--pair", "4", "--pairs", "4"]) == 2
    assert main(["probes", "show", "ioi", "--model", str(tmp_path), "--length", "200"]) == 2
    assert "context is 128 tokens" in capsys.readouterr().err
    assert main(["probes", "show", "nope", "--model", str(tmp_path)]) == 2
