"""The demo model's tokenizer, corpus rows and stream, and the training schedule (no training here)."""

from __future__ import annotations

import random
import re

import pytest
import torch
from torch.utils.data import DataLoader

from headscope.heads import HeadscopeError
from headscope.zoo.corpus import CorpusConfig, CorpusStream, Haystack, RowBuilder, row_rng, task_mix
from headscope.zoo.tokenizer import build_demo_tokenizer, build_vocab, split_words
from headscope.zoo.train_demo import learning_rate

TASKS = ("lookup", "echo")
FILLER = "the quiet river runs past the old mill . people walk to work in the morning , and traders shout 12 prices ."
WORDS = FILLER.split() + "anchor badge candle tiger zebra otter holds say".split()


def fake_task(name: str, rng: random.Random, n_filler_words: int) -> tuple[str, str]:
    """A stand-in sampler with the real signature: filler, a key-value fact, a query; answers are animals."""
    words = (FILLER.split() * (n_filler_words // 10 + 1))[:n_filler_words]
    key, value = rng.choice(["anchor", "badge", "candle"]), rng.choice(["tiger", "zebra", "otter"])
    cut = rng.randint(0, len(words))
    if name == "lookup":
        return " ".join(words[:cut] + [f"the {key} holds {value} ."] + words[cut:]) + f" the {key} holds", value
    return " ".join(words) + f" say {value} : ", value


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_demo_tokenizer(fake_task, TASKS, WORDS, seed=0, samples_per_task=50, model_max_length=128)
    core = tokenizer.backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731
    haystack = Haystack(" ".join([FILLER] * 200), tokens_per_word=1.0)
    config = CorpusConfig(seq_len=128, task_weights={"lookup": 1.0, "echo": 1.0}, answer_weight=4.0, min_doc_tokens=24)
    builder = RowBuilder(encode, tokenizer.eos_token_id, fake_task, haystack, config)
    return tokenizer, builder, config


def test_split_words_isolates_digits_and_punctuation():
    assert split_words("Room 42, then-home.") == ["Room", "4", "2", ",", "then", "-", "home", "."]


def test_vocab_keeps_task_words_and_is_deterministic(parts):
    tokenizer = parts[0]
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<eos>", "<pad>")] == [0, 1, 2]
    assert all(word in vocab for word in ("tiger", "zebra", "otter", "anchor", "holds", "7", "?"))
    assert "12" not in vocab  # numbers are digit tokens
    again = build_demo_tokenizer(fake_task, TASKS, WORDS, seed=0, samples_per_task=50)
    assert again.get_vocab() == vocab
    ids = tokenizer("the anchor holds zzzz", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.unk_token_id and len(ids) == 4


def test_vocab_order_and_missing_words():
    vocab = build_vocab(["alpha", "beta", "x42"], ["beta beta gamma"])
    assert vocab["beta"] < vocab["gamma"] < vocab["alpha"] < vocab["x"]  # by frequency, then alphabetical
    assert "4" in vocab and "x42" not in vocab
    with pytest.raises(HeadscopeError, match="missing from its word list"):
        build_demo_tokenizer(fake_task, TASKS, WORDS[:-3], samples_per_task=5)


def test_rows_mark_exactly_the_answer_targets(parts):
    tokenizer, builder, config = parts
    animal_ids = {tokenizer.convert_tokens_to_ids(w) for w in ("tiger", "zebra", "otter")}
    n_answers = 0
    for row in range(40):
        ids, weights, answer_task = builder.build(row_rng(3, row))
        assert ids.shape == (129,) and weights.shape == (128,) and answer_task.shape == (128,)
        assert ids[0] != tokenizer.eos_token_id  # a row starts at a document start
        targets = ids[1:]
        is_answer = answer_task >= 0
        # answers are animals; animals occur in prompts too (the fact), so only one direction is exact
        assert all(int(t) in animal_ids for t in targets[is_answer])
        assert (weights[is_answer] == 4.0).all() and (weights[~is_answer] == 1.0).all()
        # an answer follows the query "holds" or the ':' of "say X :"
        previous = tokenizer.convert_ids_to_tokens(ids[:-1][is_answer].tolist())
        assert set(previous) <= {"holds", ":"}
        n_answers += int(is_answer.sum())
    assert n_answers > 40


def test_stream_is_the_same_for_any_worker_count(parts):
    builder = parts[1]
    stream = CorpusStream(lambda: builder, seed=5, batch_size=2, start_batch=1)
    serial = [batch["ids"] for _, batch in zip(range(3), DataLoader(stream, batch_size=None, num_workers=0))]
    parallel = [batch["ids"] for _, batch in zip(range(3), DataLoader(stream, batch_size=None, num_workers=2))]
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
    expected = torch.from_numpy(builder.build(row_rng(5, 1 * 2 + 1))[0])  # batch 1 (start), row 1
    assert torch.equal(serial[0][1], expected)


def test_learning_rate_schedule():
    peak = 1e-3
    assert learning_rate(0, 100, peak, 10) == pytest.approx(peak / 10)
    assert learning_rate(9, 100, peak, 10) == pytest.approx(peak)
    assert learning_rate(55, 100, peak, 10) == pytest.approx(peak * 0.55)
    assert learning_rate(100, 100, peak, 10) == pytest.approx(peak * 0.1)


def test_multi_query_documents_answer_from_their_own_facts():
    from headscope.zoo.multiquery import sample_multi_query

    for seed in range(20):
        turns = sample_multi_query(random.Random(seed), 30)
        facts = turns[0][0]
        assert len(turns) >= 2
        for text, answer in turns:
            key = text.split()[-2] if text.endswith("recall " + text.split()[-2] + " :") else text.split()[-4]
            stated = re.search(rf"{key} (?::|is) (\S+)", facts)
            assert stated is not None and stated.group(1) == answer, (seed, key, answer)


def test_rows_mark_every_answer_of_a_multi_turn_document(parts):
    tokenizer, _, config = parts
    core = tokenizer.backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731

    def two_turns(name, rng, n_filler_words):
        return [("say", "tiger"), (". say", "zebra")]

    builder = RowBuilder(encode, tokenizer.eos_token_id, two_turns, Haystack(" ".join([FILLER] * 200), 1.0),
                         CorpusConfig(seq_len=128, task_weights={"pair": 1.0}, filler_doc_prob=0.0, min_doc_tokens=24))
    ids, weights, marks = builder.build(random.Random(0))
    answers = [tokenizer.convert_ids_to_tokens(int(ids[t + 1])) for t in range(len(marks)) if marks[t] >= 0]
    assert answers[:2] == ["tiger", "zebra"]


def test_demo_model_unties_embeddings_by_default(parts):
    """Tied embeddings collapse the never-predicted key words onto one direction (mean pairwise cosine 0.93 in
    the first demo model), which kept every key-matching task at chance: the recipe must not tie them."""
    from headscope.zoo.train_demo import model_config, parse_args

    tokenizer = parts[0]
    assert model_config("tiny", tokenizer, 128).tie_word_embeddings is False
    assert parse_args([]).tie_embeddings is False
    assert model_config("tiny", tokenizer, 128, tie_embeddings=True).tie_word_embeddings is True


def test_demo_recipe_defaults_are_the_ones_that_learnt_key_matching():
    """Side by side on one H100 (2026-11-26), lr 3e-3 left needle_multikey / kv_recall at 0.48 / 0.17 after
    8.2k steps while lr 1e-3 reached 1.00 / 1.00; the shipped model planned 70% of its steps on short rows
    (74% happened: the step count is re-planned from the measured pace of each phase)."""
    from headscope.zoo.train_demo import parse_args

    args = parse_args([])
    assert args.lr == pytest.approx(1e-3) and args.short_fraction == pytest.approx(0.7) and args.short_seq_len == 256


def test_embedding_similarity_measures_key_collapse(parts):
    from transformers import Qwen3ForCausalLM

    from headscope.zoo.evaluate import embedding_similarity
    from headscope.zoo.train_demo import model_config

    tokenizer = parts[0]
    model = Qwen3ForCausalLM(model_config("tiny", tokenizer, 128))
    vocab = tokenizer.get_vocab()
    words = ["anchor", "badge", "candle"]
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[[vocab[w] for w in words]] = torch.eye(weight.shape[1])[:3]
    assert embedding_similarity(model, tokenizer, words) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        weight[[vocab[w] for w in words]] = torch.ones(weight.shape[1]) * torch.tensor([[1.0], [2.0], [3.0]])
    assert embedding_similarity(model, tokenizer, words + ["not-a-word"]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        embedding_similarity(model, tokenizer, ["anchor"])


def test_a_task_that_does_not_fit_gives_way_to_one_that_does(parts):
    """A budget below the drawn task's size used to turn the document into plain filler; the builder now
    draws among the tasks that fit, so a short row still carries answers."""
    tokenizer, _, _ = parts
    core = tokenizer.backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731

    def sized(name, rng, n_filler_words):
        return ("say " * (300 if name == "big" else 2)).strip(), "tiger"

    config = CorpusConfig(seq_len=128, task_weights={"big": 1e6, "small": 1.0}, filler_doc_prob=0.0, min_doc_tokens=24)
    builder = RowBuilder(encode, tokenizer.eos_token_id, sized, Haystack(" ".join([FILLER] * 200), 1.0), config)
    marks = [m for seed in range(20) for m in builder.build(random.Random(seed))[2].tolist() if m >= 0]
    assert marks.count(builder.names.index("small")) >= 20  # "big" (300 words) never fits a 128-token row
    mix = task_mix(builder, n_rows=20)  # the realised mix, not the draw weights
    assert mix == {"big": 0.0, "small": 1.0}


def test_less_filler_packs_more_answers_per_row(parts):
    _, builder, config = parts
    from dataclasses import replace

    lean = RowBuilder(builder.encode, builder.eos_id, builder.sample_task, builder.haystack, replace(config, filler_fill=0.2))

    def answers(b):
        return sum(int((b.build(random.Random(seed))[2] >= 0).sum()) for seed in range(30))

    assert answers(lean) > 1.5 * answers(builder)


def test_dense_key_value_documents_fit_and_appear_in_the_short_rows():
    """The short-row phase exists to grow key-matching heads: its dense documents must fit 256-token rows
    (with the shipped tokenizer) and really be built there, not only be given a weight."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from headscope.zoo import demo_model_path
    from headscope.zoo.corpus import DEFAULT_TASK_WEIGHTS, SHORT_PHASE_FILLER_FILL, SHORT_PHASE_TASK_WEIGHTS
    from headscope.zoo.multiquery import sample_training_task

    assert list(SHORT_PHASE_TASK_WEIGHTS) == list(DEFAULT_TASK_WEIGHTS)  # same task order: same task indices
    core = AutoTokenizer.from_pretrained(demo_model_path()).backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731
    longest = max(sum(len(encode(part)) for turn in sample_training_task("mqar_dense", random.Random(seed), 0) for part in turn)
                  for seed in range(200))
    assert longest <= 160
    config = replace(CorpusConfig(seq_len=256), task_weights=dict(SHORT_PHASE_TASK_WEIGHTS), filler_fill=SHORT_PHASE_FILLER_FILL)
    builder = RowBuilder(encode, 1, sample_training_task, Haystack.essay(encode), config)
    mix = task_mix(builder, n_rows=60)
    assert mix["mqar_dense"] >= 0.03 and mix["mqar"] == 0.0
    assert mix["hop_steps"] >= 0.1 and mix["hop_queries"] >= 0.05  # the documents that taught multihop
    key_matching = ("mqar_dense", "hop_ladder", "hop_queries", "hop_steps", "multihop", "needle_multikey", "kv_recall")
    assert sum(mix[name] for name in key_matching) >= 0.6


def test_hop_ladder_answers_the_root_of_the_asked_chain():
    from headscope.zoo.multiquery import sample_hop_ladder

    hops_seen = set()
    for seed in range(60):
        prompt, answer = sample_hop_ladder(random.Random(seed), 20)
        binding = dict(re.findall(r"\b([b-z]) = (\S+) \.", prompt))
        var = re.search(r"what is ([b-z]) \? answer :$", prompt).group(1)
        hops = 0
        while binding[var] in binding:
            var, hops = binding[var], hops + 1
        assert binding[var] == answer
        hops_seen.add(hops)
    assert hops_seen == {0, 1, 2}


def test_card_shows_each_phase_draw_weights_and_realised_mix():
    import json

    from headscope.zoo import DEMO_MODEL_DIR
    from headscope.zoo.card import TrainingLog, model_card
    from headscope.zoo.evaluate import ProbeAccuracy

    summary = json.loads((DEMO_MODEL_DIR / "training_summary.json").read_text())
    card = model_card(summary, [ProbeAccuracy(**row) for row in summary["accuracy"]])
    short, long = summary["phases"]
    assert f"* rows of {short['seq_len']} tokens:" in card and f"* rows of {long['seq_len']} tokens:" in card
    share = short["task_weights"]["mqar_dense"] / sum(short["task_weights"].values())
    assert f"mqar_dense {share:.0%} -> {short['realised_task_mix']['mqar_dense']:.0%}" in card

    log = TrainingLog(["a", "b"], batch_tokens=8)
    log.add(1, 1.0, 1e-3, 0.5, [2.0, 1.0, 3.0, 2.0, 1.5, 0.0, 3.0, 0.0, 2.0, 0.0], 8)  # no answer of task b
    assert log.rows[-1]["answer_acc_a"] == pytest.approx(2 / 3) and log.rows[-1]["answer_acc_b"] != log.rows[-1]["answer_acc_b"]


def test_hop_queries_answer_each_question_by_its_chain():
    """``what is X ?`` is answered by the root of X's chain (any depth), ``recall X :`` by X's literal
    right-hand side; every chain keeps its own order, all depths up to the probe's are asked, and with
    ``after_statement`` each question follows its variable's statement."""
    from headscope.probes.tasks import MULTIHOP_HOPS
    from headscope.zoo.multiquery import sample_chain_queries

    for after_statement in (False, True):
        depths, literals = set(), 0
        for seed in range(80):
            turns = sample_chain_queries(random.Random(seed), 15, literal_share=0.3, after_statement=after_statement)
            document = " ".join(f"{text} {answer}" for text, answer in turns)
            statements = re.findall(r"\b([b-z]) = (\S+) \.", document)
            binding = dict(statements)
            seen = set()
            for name, rhs in statements:  # a copy names a variable bound earlier
                assert rhs not in binding or rhs in seen
                seen.add(name)
            for index, (text, answer) in enumerate(turns):
                if not answer:  # only statements and filler after the last question
                    assert index == len(turns) - 1 and after_statement
                    continue
                question = re.search(r"(?:what is ([b-z]) \? answer :|recall ([b-z]) :)$", text)
                var = question.group(1) or question.group(2)
                if after_statement:
                    assert text[: question.start()].endswith(f"{var} = {binding[var]} . ")
                if question.group(2):
                    literals += 1
                    assert answer == binding[var]
                    continue
                depth = 0
                while binding[var] in binding:
                    var, depth = binding[var], depth + 1
                assert answer == binding[var]
                depths.add(depth)
        assert depths == set(range(MULTIHOP_HOPS + 1)) and literals > 20


def test_card_status_is_derived_from_the_measured_accuracies():
    from headscope.zoo.card import status_section
    from headscope.zoo.evaluate import ProbeAccuracy

    rows = [ProbeAccuracy("ioi", 256, 16, 1.0, 1.0, 9.0), ProbeAccuracy("ioi", 1024, 16, 0.9, 0.95, 7.0),
            ProbeAccuracy("multihop", 256, 16, 0.8, 0.9, 2.0), ProbeAccuracy("multihop", 1024, 16, 0.31, 0.6, 0.5)]
    text = status_section(rows)
    assert text.startswith("1 of 2 probe tasks learnt") and "256, 1024 tokens" in text
    assert "Learnt: ioi." in text and "Not learnt: multihop (argmax down to 0.31)." in text
    assert status_section(rows[:2]).endswith(": ioi.")


def test_task_weight_overrides_are_checked():
    from headscope.zoo.train_demo import parse_task_weights

    names = ["multihop", "hop_queries"]
    assert parse_task_weights(["hop_queries=4", "multihop=0"], names) == {"hop_queries": 4.0, "multihop": 0.0}
    for bad, message in (("hops=1", "unknown task 'hops'"), ("multihop=x", "must be a number"), ("multihop=-1", ">= 0")):
        with pytest.raises(HeadscopeError, match=message):
            parse_task_weights([bad], names)


def test_step_clock_keeps_estimating_so_a_run_is_replanned():
    """A plan made once from the first steps let a data-bound short phase eat the whole budget; the clock
    now reports the mean pace at the second mark and every ``every`` steps after it."""
    from headscope.zoo.train_demo import StepClock

    clock = StepClock(torch.device("cpu"), first=2, second=5, every=10)
    estimates = {step: clock.tick(step) for step in range(1, 40)}
    assert [step for step, value in estimates.items() if value is not None] == [5, 15, 25, 35]
    assert all(value > 0 for value in estimates.values() if value is not None)


def test_replan_keeps_the_plan_consistent():
    from headscope.zoo.train_demo import RunState, replan

    run = RunState(step=100)
    replan(run, seconds_left=90.0, step_seconds=0.1, short_fraction=0.7)
    assert (run.total_steps, run.short_steps) == (1000, 700)
    run.step = 800  # slower than planned: the short phase ends now, not in the past
    replan(run, seconds_left=5.0, step_seconds=0.1, short_fraction=0.7)
    assert (run.total_steps, run.short_steps) == (850, 800)
    replan(run, seconds_left=-3.0, step_seconds=0.1, short_fraction=None)  # out of time
    assert run.total_steps == run.step == 800 and run.short_steps == 800


def test_drawn_tasks_that_do_not_fit_together_keep_the_longest_fitting_prefix(parts):
    tokenizer, _, _ = parts
    core = tokenizer.backend_tokenizer
    encode = lambda text: core.encode(text, add_special_tokens=False).ids  # noqa: E731

    def sized(name, rng, n_filler_words):
        return ("say " * {"a": 30, "b": 30, "c": 2}[name]).strip(), "tiger"

    config = CorpusConfig(seq_len=128, task_weights={"a": 1.0, "b": 1.0, "c": 0.0}, filler_doc_prob=0.0, min_doc_tokens=24)
    builder = RowBuilder(encode, tokenizer.eos_token_id, sized, Haystack(" ".join([FILLER] * 200), 1.0), config)
    drawn = [builder._draw_tasks(random.Random(seed), 70) for seed in range(40)]
    assert all(1 <= len(names) <= 2 and "c" not in names for names in drawn)  # 3 x 31 tokens never fit 70
    assert any(len(names) == 2 for names in drawn)
    assert builder._draw_tasks(random.Random(0), 10) == []  # only "c" fits 10 tokens, and its weight is 0
    with pytest.raises(HeadscopeError, match="every task weight is 0"):
        RowBuilder(encode, 0, sized, builder.haystack, CorpusConfig(seq_len=128, task_weights={"a": 0.0}))


def test_train_demo_end_to_end_writes_a_card_and_resumes_only_with_the_same_corpus(tmp_path):
    """A few steps of the real training loop on the tiny preset: weights, tokenizer, log, summary and a
    card with a generated Status; the saved state resumes, but not under other task-weight overrides."""
    import json

    from headscope.zoo.train_demo import main

    out = tmp_path / "run"
    argv = ["--tiny", "--out", str(out), "--steps", "4", "--seq-len", "128", "--short-seq-len", "64", "--batch-size", "2",
            "--workers", "0", "--eval-pairs", "2", "--eval-lengths", "128", "--log-every", "2", "--checkpoint-minutes", "0",
            "--task-weight", "hop_steps=3"]
    assert main(argv) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["run"]["step"] == 4 and summary["run"]["short_steps"] == 2
    assert summary["run"]["task_weights"] == {"hop_steps": 3.0}
    assert [phase["task_weights"]["hop_steps"] for phase in summary["phases"]] == [3.0, 3.0]
    card = (out / "README.md").read_text()
    assert "## Status" in card and "probe tasks learnt" in card and "--task-weight hop_steps=3" in card
    assert (out / "model.safetensors").is_file() and not (out / "train_state.pt").exists()  # a finished run drops its state

    from transformers import Qwen3ForCausalLM

    from headscope.zoo.card import TrainingLog
    from headscope.zoo.train_demo import RunState, make_optimizer, save_state

    model = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32)  # an interrupted run, half way
    state = RunState(step=2, total_steps=4, short_steps=2, task_weights={"hop_steps": 3.0})
    save_state(out / "train_state.pt", model, make_optimizer(model, 1e-3, fused=False), state, TrainingLog([], 256))
    with pytest.raises(HeadscopeError, match="pass the same --task-weight"):
        main([*argv[:-2], "--resume"])
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "training_summary.json").read_text())["run"]["step"] == 4
