"""Tests of the three-stage transfer pipeline on tiny models (the distributed path: test_transfer_distributed.py)."""

from __future__ import annotations

import copy
import json
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import VOCAB, save_model, tiny_qwen3, word_tokenizer
from headscope.heads import HeadscopeError
from headscope.mask import random_mask
from headscope.models import load_model
from headscope.transfer import TrainingDiverged, align_hybrid, build_student, config_from_dict, load_config, run_transfer
from headscope.transfer.checkpoint import CheckpointState, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from headscope.transfer.config import DataConfig
from headscope.transfer.data import Document, PackedSequences, StageData, key_fraction, read_documents, split_documents
from headscope.transfer.losses import (distillation_kl, distillation_kl_reference, layer_alignment_loss,
                                       layer_alignment_loss_reference, next_token_loss, next_token_loss_reference)
from headscope.transfer.objectives import AlignObjective, attention_modules, layer_io

pytestmark = pytest.mark.usefixtures("one_thread")


def hybrid_of(teacher, ratio="3:1", seed=0):
    """The real head-wise hybrid of ``teacher`` under a random mask."""
    return build_student(teacher, random_mask(load_model(teacher).fingerprint, ratio=ratio, seed=seed), {})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny Qwen3 (with tokenizer) and a .jsonl corpus of random ids."""
    root = tmp_path_factory.mktemp("transfer")
    model_dir = save_model(tiny_qwen3(), root / "model")
    rng = random.Random(0)
    data_dir = root / "data"
    data_dir.mkdir()
    with open(data_dir / "docs.jsonl", "w") as stream:
        for _ in range(80):
            stream.write(json.dumps({"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randrange(10, 60))]}) + "\n")
    return {"model": model_dir, "data": str(data_dir), "root": root}


def make_config(setup, **overrides) -> dict:
    config = {
        "model": setup["model"],
        "hybrid": {"baseline": "random", "ratio": "3:1"},
        "data": {"paths": [setup["data"]], "heldout_fraction": 0.1, "eval_sequences": 4},
        "stages": [
            {"kind": "align", "steps": 3, "lr": 3e-3, "batch_size": 4, "seq_len": 24},
            {"kind": "distill", "steps": 3, "lr": 1e-3, "batch_size": 4, "micro_batch": 2, "seq_len": 24, "ce_weight": 0.5},
        ],
        "log_every": 1, "checkpoint_every": 2, "eval_every": 2, "keep_checkpoints": 10, "progress": False, "seed": 0,
    }
    config.update(overrides)
    return config


# --- losses ------------------------------------------------------------------------------------
def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).abs() / reference.abs().clamp_min(1e-12))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_losses_match_float64_references(temperature):
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 7, 16, generator=gen) for _ in range(3)]
    teacher = [s + 0.3 * torch.randn(2, 7, 16, generator=gen) for s in student]
    for normalize in (False, True):
        total, per_layer = layer_alignment_loss(student, teacher, normalize)
        assert per_layer.shape == (3,)
        assert rel_error(total, layer_alignment_loss_reference(student, teacher, normalize)) < 1e-6
    logits_s, logits_t = 3 * torch.randn(2, 7, 50, generator=gen), 3 * torch.randn(2, 7, 50, generator=gen)
    kl = distillation_kl(logits_s, logits_t, temperature)
    assert rel_error(kl, distillation_kl_reference(logits_s, logits_t, temperature)) < 1e-5
    assert float(distillation_kl(logits_t, logits_t, temperature)) == pytest.approx(0.0, abs=1e-6)
    ids = torch.randint(0, 50, (2, 7), generator=gen)
    assert rel_error(next_token_loss(logits_s, ids), next_token_loss_reference(logits_s, ids)) < 1e-6


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(lod_every=3), "unknown config key 'lod_every' (did you mean 'log_every'?)"),
    (lambda c: c["stages"][0].update(lrr=1.0), "unknown config key 'stages[0].lrr' (did you mean 'lr'?)"),
    (lambda c: c.pop("model"), "missing the required key 'model'"),
    (lambda c: c["stages"][1].pop("steps"), "missing the required key 'stages[1].steps'"),
    (lambda c: c["stages"][0].update(lr="fast"), "'stages[0].lr': expected float, got 'fast'"),
    (lambda c: c["stages"][0].update(steps=2.5), "'stages[0].steps': expected int"),
    (lambda c: c["stages"][0].update(temperature=2.0), "'stages[0].temperature' only applies to distill stages"),
    (lambda c: c["stages"][0].update(kind="finetune"), "'stages[0].kind': must be one of align, distill, long_context"),
    (lambda c: c["data"].update(bin_dtype="int8"), "'data.bin_dtype': must be 'uint16' or 'uint32'"),
    (lambda c: c["hybrid"].update(mask="m.json"), "give exactly one of 'mask'"),
    (lambda c: c.update(stages=[]), "'stages': must be a non-empty list"),
    (lambda c: c["stages"][0].update(warmup=9), "'stages[0].warmup': must be in [0, steps]"),
    (lambda c: c["stages"][1].update(betas=[0.9, 1.0]), "'stages[1].betas': must be two numbers in [0, 1)"),
    (lambda c: c["stages"][1].update(weight_decay=-0.1), "'stages[1].weight_decay': must be >= 0"),
    (lambda c: c["stages"][1].update(micro_batch=3), "'stages[1].micro_batch': must divide batch_size 4"),
    (lambda c: c["stages"][0].update(lr="3e-3"), "YAML reads 3e-3 as a string: write it with a decimal point"),
])
def test_config_errors_name_the_key(setup, change, message):
    config = make_config(setup)
    change(config)
    with pytest.raises(HeadscopeError, match=None) as err:
        config_from_dict(config)
    assert message in str(err.value)


def test_yaml_and_toml_configs_agree_and_resolve_paths(tmp_path):
    import yaml

    raw = {"model": "m", "hybrid": {"baseline": "layerwise"}, "data": {"paths": ["corpus"]},
           "stages": [{"kind": "long_context", "steps": 2, "lr": 1e-4, "batch_size": 1, "seq_len": 64}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "run.toml").write_text('model = "m"\n[hybrid]\nbaseline = "layerwise"\n[data]\npaths = ["corpus"]\n'
                                       '[[stages]]\nkind = "long_context"\nsteps = 2\nlr = 1e-4\nbatch_size = 1\nseq_len = 64\n')
    from_yaml, from_toml = load_config(tmp_path / "run.yaml"), load_config(tmp_path / "run.toml")
    assert from_yaml == from_toml
    assert from_yaml.model == str(tmp_path / "m") and from_yaml.data.paths == [str(tmp_path / "corpus")]
    assert from_yaml.stages[0].name == "long_context" and from_yaml.stages[0].trainable == "all"


def test_example_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "headscope" / "transfer" / "example.yaml")
    assert [s.kind for s in config.stages] == ["align", "distill", "long_context"]
    assert config.stages[0].trainable == "attention" and config.stages[0].align_inputs == "teacher"


# --- data --------------------------------------------------------------------------------------
def test_readers_and_packing(tmp_path):
    (tmp_path / "a.txt").write_text("w3 w4 w5")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "w7 w8"}) + "\n\n" + json.dumps({"input_ids": [9, 10, 11, 12]}) + "\n")
    np.arange(20, 31, dtype=np.uint16).tofile(tmp_path / "c.bin")
    np.array([40, 41, 42], dtype=np.uint32).tofile(tmp_path / "d.bin")
    docs = read_documents(DataConfig(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.bin")], bin_doc_tokens=4),
                          word_tokenizer(), vocab_size=VOCAB)
    assert [d.key for d in docs] == ["a.txt#0", "b.jsonl#0", "b.jsonl#2", "c.bin#0", "c.bin#1", "c.bin#2"]
    assert [d.tokens.tolist() for d in docs[:3]] == [[5, 6, 7], [9, 10], [9, 10, 11, 12]]
    assert np.concatenate([d.tokens for d in docs[3:]]).tolist() == list(range(20, 31))
    assert [d.separated for d in docs] == [True] * 3 + [False] * 3
    wide = read_documents(DataConfig(paths=[str(tmp_path / "d.bin")], bin_dtype="uint32"))
    assert wide[0].tokens.tolist() == [40, 41, 42]
    # eos (1) after each text document, none between .bin blocks; the tail is dropped
    stream = [5, 6, 7, 1, 9, 10, 1, 9, 10, 11, 12, 1] + list(range(20, 31))
    packed = PackedSequences(docs, seq_len=5, eos_id=1)
    assert len(packed) == len(stream) // 5
    assert torch.cat([packed[i] for i in range(len(packed))]).tolist() == stream[: 5 * len(packed)]
    with pytest.raises(HeadscopeError, match="vocab size"):
        read_documents(DataConfig(paths=[str(tmp_path / "c.bin")]), vocab_size=25)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(HeadscopeError, match="not a multiple of 2"):
        read_documents(DataConfig(paths=[str(tmp_path / "odd.bin")]))
    with pytest.raises(HeadscopeError, match="has no tokenizer|no tokenizer"):
        read_documents(DataConfig(paths=[str(tmp_path / "a.txt")]), tokenizer=None)


def test_heldout_split_is_deterministic(tmp_path):
    rng = random.Random(1)
    for name in ("x.jsonl", "y.jsonl"):
        with open(tmp_path / name, "w") as stream:
            for _ in range(300):
                stream.write(json.dumps({"input_ids": [rng.randrange(2, VOCAB) for _ in range(5)]}) + "\n")
    one = read_documents(DataConfig(paths=[str(tmp_path / "x.jsonl")]))
    both = read_documents(DataConfig(paths=[str(tmp_path)]))
    train, held = split_documents(one, "hash", 0.2)
    assert [d.key for d in held] == [d.key for d in split_documents(one, "hash", 0.2)[1]]
    assert 0.1 < len(held) / len(one) < 0.3
    assert all(key_fraction(d.key) < 0.2 for d in held) and all(key_fraction(d.key) >= 0.2 for d in train)
    held_both = {d.key for d in split_documents(both, "hash", 0.2)[1]}
    assert {d.key for d in held} == {k for k in held_both if k.startswith("x.jsonl")}  # adding y moved nothing
    train_f, held_f = split_documents(one, "fraction", 0.1)
    assert [d.key for d in held_f] == [d.key for d in one[-30:]] and len(train_f) == 270


def test_jsonl_kinds_are_kept_and_heldout_rows_of_a_kind_hold_only_its_documents(tmp_path):
    from headscope.transfer.data import sequence_source

    rng = random.Random(2)
    kinds = {"real": range(2, 20), "synthetic": range(20, VOCAB)}  # each kind's ids in its own range
    with open(tmp_path / "mix.jsonl", "w") as stream:
        for index in range(400):
            kind = rng.choice(sorted(kinds))
            record = {"input_ids": [rng.choice(kinds[kind]) for _ in range(rng.randrange(3, 9))]}
            stream.write(json.dumps(record if index % 50 == 0 else {**record, "kind": kind}) + "\n")  # a few without a kind
    (tmp_path / "plain.txt").write_text("w3 w4")
    config = DataConfig(paths=[str(tmp_path)], heldout_fraction=0.2, eos_id=1)
    docs = read_documents(config, word_tokenizer())
    records = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert [d.kind for d in docs] == [r.get("kind") for r in records] + [None]  # .txt: no kind
    train, held = split_documents(docs, "hash", 0.2)
    source = sequence_source(config, 0, word_tokenizer())
    # training and all-documents held-out packing are unchanged by kinds
    for split, side in (("train", train), ("heldout", held)):
        assert torch.equal(torch.stack(list(source(split, 0, 16))), torch.stack(list(PackedSequences(side, 16, 1))))
    assert source.kinds("heldout") == {k: sum(d.kind == k for d in held) for k in dict.fromkeys(d.kind for d in held if d.kind)}
    assert set(source.kinds("heldout")) == set(kinds) and sum(source.kinds("train").values()) == sum(d.kind is not None for d in train)
    for kind, ids in kinds.items():
        rows = torch.stack(list(source("heldout", 0, 16, kind=kind)))  # (n, 16)
        mine = [d for d in held if d.kind == kind]
        assert torch.equal(rows, torch.stack(list(PackedSequences(mine, 16, 1))))  # the same packing, of this kind's documents
        assert len(rows) == sum(len(d.tokens) + 1 for d in mine) // 16 > 3
        assert set(rows.unique().tolist()) <= set(ids) | {1}  # eos separators and this kind's ids only
    assert len(source("heldout", 0, 16, kind="absent")) == 0
    (tmp_path / "mix.jsonl").write_text(json.dumps({"input_ids": [2, 3], "kind": 7}) + "\n")
    with pytest.raises(HeadscopeError, match="'kind' must be a string"):
        read_documents(DataConfig(paths=[str(tmp_path / "mix.jsonl")]))


def test_documents_packed_without_a_separator_get_a_note():
    from types import SimpleNamespace

    from headscope.transfer.data import separator_note

    files, no_eos = DataConfig(paths=["x.jsonl"]), SimpleNamespace(eos_token_id=None)
    assert "no eos token" in separator_note(files, no_eos) and "data.eos_id" in separator_note(files, no_eos)
    assert separator_note(DataConfig(paths=["x.jsonl"], eos_id=0), no_eos) is None  # the config names one
    assert separator_note(files, word_tokenizer()) is None  # the tokenizer has one
    assert separator_note(DataConfig(source="demo_corpus"), no_eos) is None  # (the demo corpus needs one anyway)


def test_batches_are_a_function_of_the_step_and_split_over_ranks():
    sequences = PackedSequences([Document(f"d#{i}", np.arange(i * 10, i * 10 + 10)) for i in range(10)], seq_len=5, eos_id=None)
    data, again = StageData(sequences, sequences, seed=3, eval_sequences=3), StageData(sequences, sequences, seed=3, eval_sequences=3)
    assert torch.equal(data.batch(7, 4), again.batch(7, 4))
    assert torch.equal(torch.cat([data.batch(7, 4, rank=r, world_size=2) for r in range(2)]), data.batch(7, 4))
    epoch = torch.cat([data.batch(s, 4) for s in range(5)])  # 20 rows = exactly one epoch
    assert sorted(int(row[0]) for row in epoch) == sorted(int(sequences[i][0]) for i in range(20))
    assert not torch.equal(data.batch(0, 4), StageData(sequences, sequences, seed=4, eval_sequences=3).batch(0, 4))
    assert data.eval_rows().shape == (3, 5) and data.eval_rows(rank=1, world_size=2).shape == (1, 5)


def test_demo_corpus_rows_and_run(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from headscope.probes.tasks import TASK_NAMES, sample_task_text, task_vocabulary
    from headscope.transfer.data import sequence_source
    from headscope.zoo.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(sample_task_text, TASK_NAMES, task_vocabulary(), seed=0, samples_per_task=3)
    source = sequence_source(DataConfig(source="demo_corpus"), run_seed=0, tokenizer=tokenizer)
    train, held, stage2 = source("train", 0, 48), source("heldout", 0, 48), source("train", 1, 48)
    rows = torch.stack([train[i] for i in range(4)])
    assert rows.shape == (4, 48) and int(rows.max()) < len(tokenizer)
    assert torch.equal(rows, torch.stack([source("train", 0, 48)[i] for i in range(4)]))
    assert not torch.equal(rows[0], held[0]) and not torch.equal(rows[0], stage2[0])
    assert (rows == tokenizer.eos_token_id).any()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "demo")
    tokenizer.save_pretrained(tmp_path / "demo")
    config = {"model": str(tmp_path / "demo"), "hybrid": {"baseline": "layerwise", "ratio": "1:1"}, "progress": False,
              "data": {"source": "demo_corpus", "eval_sequences": 2}, "log_every": 0,
              "stages": [{"kind": "align", "steps": 2, "lr": 1e-3, "batch_size": 2, "seq_len": 48}]}
    result = run_transfer(config, tmp_path / "run")
    assert result.stages[0].steps == 2 and np.isfinite(result.stages[0].heldout["heldout_loss"])
    assert result.stages[0].tokens == 2 * 2 * 48 and result.stages[0].final_loss is None  # log_every 0: no loss logged, steps still ran


# --- objectives --------------------------------------------------------------------------------
def test_teacher_forcing_makes_the_alignment_layer_local():
    teacher = tiny_qwen3()
    student = copy.deepcopy(teacher)
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    forced, free = AlignObjective("teacher"), AlignObjective("student")
    assert float(forced(student, teacher, ids).loss.detach()) == 0.0
    with torch.no_grad():
        attention_modules(student)[0].o_proj.weight.mul_(1.5)  # only layer 0 differs
    per_layer_forced = forced(student, teacher, ids).layer_mse
    per_layer_free = free(student, teacher, ids).layer_mse
    assert per_layer_forced[0] > 0 and torch.all(per_layer_forced[1:] == 0)
    assert torch.all(per_layer_free[1:] > 0)


def test_align_reports_the_students_own_logits():
    """The held-out CE of the align stage is the student's: under teacher forcing the aligned forward's logits are
    the teacher's residual stream plus one student layer (they read ~the teacher's CE while the student's was far
    worse), so the logits come from a forward of the student on its own."""
    teacher = tiny_qwen3()
    student = hybrid_of(teacher)
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = student(input_ids=ids).logits
        for objective in (AlignObjective("teacher"), AlignObjective("student")):
            assert torch.equal(objective(student, teacher, ids, need_logits=True).logits, own)


def test_teacher_forced_gradients_stay_in_their_layer_of_the_hybrid():
    teacher = tiny_qwen3()
    student = hybrid_of(teacher).train()
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), layer_io(teacher) as (teacher_in, teacher_out):
        teacher(input_ids=ids)
    with layer_io(student, replace_inputs=teacher_in) as (student_in, student_out):
        student(input_ids=ids)
    assert all(torch.equal(s, t) for s, t in zip(student_in, teacher_in))
    torch.nn.functional.mse_loss(student_out[1], teacher_out[1]).backward()
    attention = attention_modules(student)
    assert all(p.grad is None for p in attention[0].parameters()) and all(p.grad is None for p in attention[2].parameters())
    assert attention[1].q_proj.weight.grad.abs().sum() > 0


def test_align_hybrid_lowers_the_loss_on_a_fixed_batch():
    teacher = tiny_qwen3()
    student = hybrid_of(teacher)
    ids = torch.randint(2, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    losses = align_hybrid(student, teacher, ids, steps=25, lr=3e-3, progress=False)
    assert len(losses) == 25 and losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in student.parameters())


# --- the pipeline ------------------------------------------------------------------------------
def run(setup, name, config=None, **kwargs):
    return run_transfer(config or make_config(setup), setup["root"] / name, **kwargs)


def test_stage1_trains_only_attention_and_stage2_everything(setup):
    built = {}

    def builder(teacher, mask, options):
        built["student"] = build_student(teacher, mask, options)
        built["initial"] = {k: v.clone() for k, v in built["student"].state_dict().items()}
        built["teacher"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        built["teacher_module"] = teacher
        return built["student"]

    result = run(setup, "freeze", student_builder=builder)
    after_align = load_checkpoint([p for p in list_checkpoints(result.run_dir) if p.name == "s00-align-00000003"][0]).model
    after_distill = result.model.state_dict()
    attention = [k for k in after_align if ".self_attn." in k]
    assert attention and all(not torch.equal(after_align[k], built["initial"][k]) for k in attention)
    assert all(torch.equal(after_align[k], built["initial"][k]) for k in after_align if k not in attention)
    assert all(not torch.equal(after_distill[k], after_align[k]) for k in after_align)
    teacher_after = built["teacher_module"].state_dict()
    assert all(torch.equal(teacher_after[k], v) for k, v in built["teacher"].items())  # the teacher never trains
    records = [json.loads(line) for line in open(result.log_path)]
    evals = [r for r in records if r["event"] == "eval"]
    assert {r["stage"] for r in evals} == {"align", "distill"} and all(np.isfinite(r["heldout_loss"]) for r in evals)
    assert "heldout_layer_mse" in evals[0] and {"kl", "ce", "lr", "tokens"} <= set(records[-2]) | set(records[-3])
    assert (result.run_dir / "loss_curves.html").stat().st_size > 10000
    assert result.stages[1].heldout["heldout_loss"] == evals[-1]["heldout_loss"]


def test_resume_is_bit_identical(setup):
    reference = run(setup, "uninterrupted")

    def interrupt_at(stage, step):
        def hook(info):
            if (info.stage, info.step) == (stage, step):
                raise KeyboardInterrupt
        return hook

    with pytest.raises(KeyboardInterrupt):  # after the align stage's final checkpoint
        run(setup, "interrupted", on_step=interrupt_at("distill", 1))
    assert latest_checkpoint(setup["root"] / "interrupted").name == "s00-align-00000003"
    with pytest.raises(KeyboardInterrupt):  # mid-stage: the latest checkpoint is distill step 2
        run(setup, "interrupted", resume=True, on_step=interrupt_at("distill", 3))
    assert latest_checkpoint(setup["root"] / "interrupted").name == "s01-distill-00000002"
    resumed = run(setup, "interrupted", resume=True)
    assert resumed.resumed_from.endswith("s01-distill-00000002")
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in open(path)]  # noqa: E731
    assert strip(resumed.log_path) == strip(reference.log_path)
    with pytest.raises(HeadscopeError, match="already holds a transfer run"):
        run(setup, "interrupted")
    changed = make_config(setup, seed=5, log_every=2)  # log_every may change, the seed may not
    with pytest.raises(HeadscopeError, match=r"config differs from the run's in seed$"):
        run(setup, "interrupted", config=changed, resume=True)


def test_resume_before_any_checkpoint_and_changed_data(setup, tmp_path):
    """A run stopped before its first checkpoint starts over on --resume without keeping its first log records
    (they were written twice); a run whose data files changed since it started is not resumed."""
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    config = make_config(setup, checkpoint_every=0, data={"paths": [str(data)], "heldout_fraction": 0.1, "eval_sequences": 4})
    config["stages"] = config["stages"][:1]
    reference = run_transfer(config, tmp_path / "reference")

    def stop(info):
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_transfer(config, tmp_path / "run", on_step=stop)
    assert latest_checkpoint(tmp_path / "run") is None
    resumed = run_transfer(config, tmp_path / "run", resume=True)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in open(path)]  # noqa: E731
    assert strip(resumed.log_path) == strip(reference.log_path)
    (data / "more.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7, 8]}) + "\n")
    with pytest.raises(HeadscopeError, match="its data files changed since it started"):
        run_transfer(config, tmp_path / "run", resume=True)


def test_a_checkpoint_deletes_what_a_killed_writer_left(tmp_path):
    """A writer killed after ``state.pt`` but before the rename leaves ``.tmp-<tag>-<pid>`` (a whole model and
    optimizer state); the resumed run writes under another pid, so the next checkpoint must delete it."""
    leftover = tmp_path / "checkpoints" / ".tmp-s00-align-00000002-999"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"the killed write")
    state = CheckpointState(0, "align", 1, False, 96, {"w": torch.ones(2)}, {"state": {}}, {}, [], "digest")
    save_checkpoint(tmp_path, state, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "s00-align-00000001"]
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path)).model["w"], torch.ones(2))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(setup):
    def poison(info):
        if (info.stage, info.step) == ("align", 2):
            with torch.no_grad():
                attention_modules(info.model)[1].o_proj.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged) as err:
        run(setup, "nan", on_step=poison)
    message = str(err.value)
    assert "stage 'align' step 3: the loss is nan" in message and "s00-align-00000002" in message
    assert [p.name for p in list_checkpoints(setup["root"] / "nan")] == ["s00-align-00000002"]
    state = load_checkpoint(latest_checkpoint(setup["root"] / "nan"))
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())
    resumed = run(setup, "nan", resume=True)  # the poison was never saved: the run completes
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_cli_runs_a_yaml_config_and_reports_config_errors(setup, tmp_path, capsys):
    import yaml

    from headscope.transfer.__main__ import main

    config = make_config(setup, stages=[{"kind": "long_context", "steps": 2, "lr": 1e-3, "batch_size": 2, "seq_len": 48}])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert "1. long_context [long_context]: 2 steps, 192 tokens" in capsys.readouterr().out
    for name in ("log.jsonl", "loss_curves.html", "result.json", "mask.json", "final/config.json", "final/headscope_mask.json"):
        assert (tmp_path / "run" / name).is_file(), name
    from headscope.heads import file_mode

    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run" / "final").iterdir()} == {
        p.name: file_mode() for p in (tmp_path / "run" / "final").iterdir()}  # the weights too (safetensors: owner-only)
    assert main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"), "--resume"]) == 0  # nothing left
    config["stages"][0]["sequence_length"] = 48
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "other")]) == 2
    assert "unknown config key 'stages[0].sequence_length'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_pipeline(setup):
    """On CUDA the stages run under bf16 autocast (fp32 master weights) and resume still works."""
    config = make_config(setup, device="cuda")
    config["stages"][0]["steps"] = 20
    result = run(setup, "cuda", config=config)
    records = [json.loads(line) for line in open(result.log_path)]
    align = [r["loss"] for r in records if r["event"] == "train" and r["stage"] == "align"]
    assert all(np.isfinite(r["loss"]) for r in records if r["event"] == "train") and align[-1] < align[0]
    assert next(result.model.parameters()).dtype == torch.float32 and next(result.model.parameters()).is_cuda


def test_fresh_runs_start_each_fused_head_at_its_pretrained_scale(setup):
    from headscope.transfer.api import calibrate_student
    from headscope.transfer.config import HybridSpec
    from headscope.transfer.data import sequence_source

    teacher = load_model(setup["model"]).model
    cfg = config_from_dict(make_config(setup))
    sequences = sequence_source(cfg.data, 0, vocab_size=VOCAB)
    student = hybrid_of(teacher)
    assert calibrate_student(student, teacher, sequences, HybridSpec(baseline="random", calibrate_gamma=0), 24) is None
    assert all(bool((layer.self_attn.gamma == 1).all()) for layer in student.model.layers)
    rms = calibrate_student(student, teacher, sequences, cfg.hybrid, 24)  # the default: 8 rows
    assert cfg.hybrid.calibrate_gamma == 8 and rms.shape == (len(student.model.layers), teacher.config.num_attention_heads)
    rows = sequences("train", 0, 24)
    ids = torch.stack([torch.as_tensor(rows[i]) for i in range(8)])
    outputs = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: outputs.__setitem__(l, a[0]))
             for l, layer in enumerate(teacher.model.layers)]
    try:
        with torch.no_grad():
            teacher(ids)
    finally:
        for hook in hooks:
            hook.remove()
    for l, layer in enumerate(student.model.layers):
        attention = layer.self_attn
        want = outputs[l].reshape(-1, teacher.config.num_attention_heads, teacher.config.head_dim).pow(2).mean((0, 2)).sqrt()
        order = list(student.config.layer_plan(l).head_order)
        gdn = slice(attention.spec.n_fa_heads, None)  # GDN heads: no gate, gamma is the RMS itself
        assert torch.allclose(attention.gamma[gdn].detach(), want[order][gdn], rtol=1e-4)
    with pytest.raises(HeadscopeError, match="calibrate_gamma"):
        config_from_dict(make_config(setup, hybrid={"baseline": "random", "calibrate_gamma": -1}))
