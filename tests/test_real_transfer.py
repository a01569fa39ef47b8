"""The real-model path of the quality benchmark on the CPU: transfer data sampled from a tiny random Llama with a
BPE tokenizer (``benchmarks/real_transfer_data.py --quick``), then ``benchmarks/hybrid_quality.py`` on those
files with an extra mask arm, two transfer seeds, KV-matched random arms and the seed summary; layer-matched random
arms added to the finished results in shards and merged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from fixtures import make_bpe_tokenizer
from headscope.heads import HeadscopeError
from headscope.mask import save_mask, select_mask
from headscope.models import load_model
from headscope.probes import haystack, sample_task_text, vocab
from headscope.probes.surface import NATURAL
from headscope.transfer.config import DataConfig
from headscope.transfer.data import read_documents

pytestmark = pytest.mark.usefixtures("one_thread")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LENGTH = 96  # the shortest length every probe below fits with this tokenizer


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def natural_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (4 layers x 4 heads, 2 KV heads) with a byte-level BPE tokenizer in which the probes'
    slot words are single tokens (trained on the essay, natural task text and the word lists)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    texts = [" ".join(NATURAL.sentence(tuple(s))) for s in haystack.haystack_sentences("essay")[:600]]
    texts += [" ".join(sample_task_text(name, rng, 30, NATURAL)) for name in ("needle_single", "needle_multikey", "kv_recall", "ioi") for _ in range(50)]
    words = [*vocab.KEYS, *vocab.WORD_VALUES, *vocab.NUMBER_VALUES, *(n.capitalize() for n in vocab.NAMES), *vocab.PLACES, *vocab.OBJECTS]
    tokenizer = make_bpe_tokenizer(texts + [" ".join(words)] * 30, vocab_size=1500)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=LENGTH, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("natural-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def transfer_data(natural_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "transfer.jsonl"
    assert load("real_transfer_data").main(["--model", str(natural_llama), "--out", str(out), "--quick", "--tokens", "6000"]) == 0
    return out


def test_transfer_data_holds_the_mix_it_records(transfer_data, natural_llama):
    records = [json.loads(line) for line in transfer_data.read_text().splitlines()]
    mix = json.loads(transfer_data.with_suffix(".mix.json").read_text())
    assert mix["mix_asked"] == {"sampled": 0.5, "essay": 0.2, "tasks": 0.3} and mix["documents"] == len(records)
    tokenizer = load_model(natural_llama).tokenizer
    for kind, asked in mix["mix_asked"].items():
        mine = [r for r in records if r["kind"] == kind]
        tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in mine)
        assert tokens == mix["mix_obtained"][kind]["tokens"] and len(mine) == mix["mix_obtained"][kind]["documents"]
        assert abs(tokens / mix["tokens"] - asked) < 0.05 and 6000 * asked <= tokens
    assert sorted(mix["task_documents"]) == ["induction", "ioi", "kv_recall", "needle_multikey", "needle_single"]
    assert sum(mix["prompt_kinds"].values()) == mix["mix_obtained"]["sampled"]["documents"]
    texts = {r.get("task"): r["text"] for r in records if r["kind"] == "tasks"}
    assert "The special magic" in texts["needle_single"] and "Keys and values:" in texts["kv_recall"]  # NATURAL wording
    assert [r["kind"] for r in records] != sorted(r["kind"] for r in records)  # shuffled, not grouped by kind
    assert len(read_documents(DataConfig(paths=[str(transfer_data)]), tokenizer)) == len(records)


def test_transfer_data_reruns_are_no_ops_and_other_settings_need_force(transfer_data, natural_llama):
    module = load("real_transfer_data")
    before = transfer_data.stat().st_mtime_ns
    argv = ["--model", str(natural_llama), "--out", str(transfer_data), "--quick", "--tokens", "6000"]
    assert module.main(argv) == 0 and transfer_data.stat().st_mtime_ns == before
    with pytest.raises(HeadscopeError, match="other settings.*--force"):
        module.main(argv + ["--seed", "1"])
    with pytest.raises(SystemExit):
        module.parse_args(argv + ["--mix", "sampled=0.5,essay=0.2"])  # shares must sum to 1


@pytest.fixture(scope="module")
def quality(natural_llama, transfer_data, tmp_path_factory):
    from headscope.models import load_model

    root = tmp_path_factory.mktemp("quality")
    fp = load_model(natural_llama).fingerprint
    importance = torch.arange(16, dtype=torch.float32).view(4, 4)  # heads of the last layers first
    fused = save_mask(select_mask(importance, fp, n_full=2), root / "fused.json")  # L3H2 L3H3: one KV group
    other = save_mask(select_mask(importance.flip(0), fp, n_full=2), root / "other.json")  # L0H2 L0H3
    argv = ["--smoke", "--model", str(natural_llama), "--data", str(transfer_data), "--heldout-fraction", "0.3", "--teacher-length", str(LENGTH),
            "--length-multiples", "1,2", "--mask", str(fused), "--arm", f"early={other}", "--transfer-seeds", "0,1", "--kv-matched",
            "--random-seeds", "0,1", "--arms", "teacher,headwise_fused_7to1,early,layerwise_3to1,headwise_randomkv_7to1", "--steps", "2,2,2",
            "--retrieval-probes", "needle_single,kv_recall", "--reasoning-probes", "ioi", "--out", str(root / "out"), "--work", str(root / "work")]
    benchmark = load("hybrid_quality")
    assert benchmark.main(argv) == 0
    return benchmark, argv, json.loads((root / "out" / "hybrid_quality.json").read_text()), root / "out"


def test_arms_run_in_rounds_with_transfer_seeds_and_kv_matched_random_masks(quality):
    _, _, data, _ = quality
    assert list(data["arms"]) == ["teacher", "headwise_fused_7to1_t0", "early_t0", "layerwise_3to1", "headwise_randomkv_7to1_s0",
                                  "headwise_fused_7to1_t1", "early_t1", "headwise_randomkv_7to1_s1"]
    arms = data["arms"]
    for name, arm in arms.items():
        assert arm["status"] == "done", (name, arm.get("error"), arm.get("traceback"))
        assert sorted(arm["accuracy"]) == ["ioi", "kv_recall", "needle_single"] and sorted(arm["heldout_loss"]) == ["192", "96"]
    assert [arms[f"headwise_fused_7to1_t{t}"]["transfer_seed"] for t in (0, 1)] == [0, 1]
    assert arms["layerwise_3to1"]["transfer_seed"] == 0
    fused = arms["headwise_fused_7to1_t0"]
    for seed in (0, 1):
        random_arm = arms[f"headwise_randomkv_7to1_s{seed}"]
        assert random_arm["n_full"] == fused["n_full"] == 2 and random_arm["kv_groups"] == fused["kv_groups"] == 1
        assert random_arm["kv_bytes_per_token"] == fused["kv_bytes_per_token"]
    assert arms["early_t0"]["mask"]["full_attention_heads"] == arms["early_t1"]["mask"]["full_attention_heads"]
    # different transfer seeds train differently: the student's initialisation and the data order
    assert fused["training"]["stages"][0]["final_train_loss"] != arms["headwise_fused_7to1_t1"]["training"]["stages"][0]["final_train_loss"]
    assert data["settings"]["data"]["source"] == "files" and data["settings"]["retrieval_probes"] == ["needle_single", "kv_recall"]


def test_summary_has_family_spreads_and_the_goal_checks(quality):
    _, _, data, out = quality
    families = data["summary"]["families"]
    assert list(families) == ["teacher", "headwise_fused_7to1", "early", "layerwise_3to1", "headwise_randomkv_7to1"]
    fused = families["headwise_fused_7to1"]["metrics"]
    runs = [data["arms"][f"headwise_fused_7to1_t{t}"]["heldout_loss"]["96"] for t in (0, 1)]
    assert fused["heldout@96"]["mean"] == pytest.approx(sum(runs) / 2)
    assert fused["heldout@96"]["transfer_sd"] == pytest.approx(abs(runs[0] - runs[1]) / math.sqrt(2))
    assert fused["heldout@96"]["sd"] is None and fused["heldout@96"]["n_runs"] == 2  # one mask
    random_ce = families["headwise_randomkv_7to1"]["metrics"]["heldout@96"]
    assert random_ce["n_masks"] == 2 and random_ce["transfer_sd"] is None and random_ce["sd"] is not None
    goals = {(g["goal"], g["family"], g.get("length")): g for g in data["summary"]["goals"]}
    assert set(goals) == {("beats_random", f, n) for f in ("headwise_fused_7to1", "early") for n in (96, 384)} | {
        ("near_layerwise", f, None) for f in ("headwise_fused_7to1", "early")}
    at_1x = goals[("beats_random", "headwise_fused_7to1", 96)]
    assert at_1x["kv_matched"] and at_1x["threshold"] == pytest.approx(2 * at_1x["transfer_sd"])
    assert at_1x["met"] == (at_1x["margin"] > at_1x["threshold"])
    assert goals[("beats_random", "early", 384)]["met"] is None  # 4x was not evaluated
    near = goals[("near_layerwise", "headwise_fused_7to1", None)]
    assert near["kv_at_most_half"] and sorted(near["gaps"]) == ["reasoning@192", "reasoning@96", "retrieval@192", "retrieval@96"]
    table = (out / "hybrid_quality.md").read_text()
    assert "## Seeds: mean ± sd per arm family" in table and "| headwise_randomkv_7to1 | 2 |" in table and "## Goals" in table
    assert "KV-matched random headwise_randomkv_7to1" in table


def test_a_rerun_with_another_seed_list_adds_only_the_new_arms(quality):
    benchmark, argv, data, out = quality
    again = argv[: argv.index("--transfer-seeds")] + ["--transfer-seeds", "0,1,2"] + argv[argv.index("--transfer-seeds") + 2:]
    again[again.index("--arms") + 1] = "headwise_fused_7to1"
    assert benchmark.main(again) == 0
    arms = json.loads((out / "hybrid_quality.json").read_text())["arms"]
    assert arms["headwise_fused_7to1_t2"]["status"] == "done"
    assert {name: arms[name] for name in data["arms"]} == data["arms"]  # finished arms are kept as they were
    with pytest.raises(HeadscopeError, match="seeded-arms"):
        benchmark.main(again + ["--seeded-arms", "nonsense"])


def test_layer_matched_arms_run_in_shards_beside_finished_results_and_merge_after_them(quality, tmp_path):
    """The way to add a baseline family to finished results: each shard resumes from a copy of them
    (same settings), runs its share of the new arms; ``--merge`` puts the new arms after the old ones."""
    benchmark, argv, _, out = quality
    finished = json.loads((out / "hybrid_quality.json").read_text())
    shards = []
    for index in range(2):
        shard = tmp_path / f"shard{index}"
        shard.mkdir()
        (shard / "hybrid_quality.json").write_text(json.dumps(finished))
        assert benchmark.main(argv + ["--layer-matched", "--arms", "headwise_randomlayer_7to1", "--shard", f"{index}/2",
                                      "--out", str(shard), "--work", str(tmp_path / f"work{index}")]) == 0
        shards.append(str(shard))
    assert benchmark.main(["--merge", ",".join(shards), "--out", str(tmp_path / "merged"), "--work", str(tmp_path / "work_merged")]) == 0
    data = json.loads((tmp_path / "merged" / "hybrid_quality.json").read_text())
    layer_arms = ["headwise_randomlayer_7to1_s0", "headwise_randomlayer_7to1_s1"]
    assert list(data["arms"]) == list(finished["arms"]) + layer_arms
    assert {name: data["arms"][name] for name in finished["arms"]} == finished["arms"]
    fused = finished["arms"]["headwise_fused_7to1_t0"]["mask"]["full_attention_heads"]  # L3H2 L3H3: one KV group of layer 3
    for name in layer_arms:
        arm = data["arms"][name]
        assert arm["status"] == "done" and arm["kind"] == "randomlayer" and arm["transfer_seed"] == 0
        heads = arm["mask"]["full_attention_heads"]
        assert {layer for layer, _ in heads} == {3} and len(heads) == len(fused) and arm["kv_groups"] == 1
    goals = {(g["goal"], g["family"], g.get("length")): g for g in data["summary"]["goals"]}
    layer_goal = goals[("beats_layer_random", "headwise_fused_7to1", 96)]
    assert layer_goal["random_family"] == "headwise_randomlayer_7to1" and layer_goal["random_masks"] == 2
    assert layer_goal["met"] == (layer_goal["margin"] > layer_goal["threshold"])
    before = {(g["goal"], g["family"], g.get("length")): g for g in finished["summary"]["goals"]}
    assert {key: goals[key] for key in before} == before  # the KV-matched goal and the others are unchanged
    assert "layer-matched random headwise_randomlayer_7to1" in (tmp_path / "merged" / "hybrid_quality.md").read_text()


def test_heldout_kinds_add_the_ce_of_each_kind_and_leave_runs_without_them_as_they_were(quality, natural_llama, transfer_data, tmp_path):
    from headscope.quality import heldout_loss
    from headscope.transfer.rowstore import FileRows

    benchmark, argv, data, out = quality
    assert "heldout_kinds" not in data["settings"] and all("heldout_loss_by_kind" not in arm for arm in data["arms"].values())
    before = (out / "hybrid_quality.json").read_text()
    with pytest.raises(HeadscopeError, match="heldout_kinds"):  # a results dir made without the flag does not take it
        benchmark.main(argv + ["--heldout-kinds", "sampled"])
    assert (out / "hybrid_quality.json").read_text() == before
    common = ["--smoke", "--model", str(natural_llama), "--data", str(transfer_data), "--heldout-fraction", "0.3", "--teacher-length",
              str(LENGTH), "--length-multiples", "1,2", "--arms", "teacher,layerwise_7to1", "--steps", "1,1,1",
              "--retrieval-probes", "needle_single", "--reasoning-probes", "ioi", "--work", str(tmp_path / "work")]
    with pytest.raises(HeadscopeError, match=r"no held-out document of kind poetry \(kinds of the held-out documents.*sampled \(\d+\)"):
        benchmark.main(common + ["--heldout-kinds", "sampled,poetry", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "work" / "hybrid_quality.json").exists()
    for bad in (["--heldout-kinds", ""], ["--heldout-kinds", "tasks,tasks"], ["--heldout-kinds", "a@b"]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.parse_args(common + bad)
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--smoke", "--heldout-kinds", "sampled"])  # the demo corpus has no kinds
    assert exit_info.value.code == 2

    assert benchmark.main(common + ["--heldout-kinds", "sampled,tasks", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "hybrid_quality.json").read_text())
    assert result["settings"]["heldout_kinds"] == ["sampled", "tasks"]
    lengths = [str(LENGTH), str(2 * LENGTH)]
    rows = FileRows(DataConfig(source="files", paths=[str(transfer_data)], heldout_fraction=0.3), load_model(natural_llama).tokenizer)
    teacher = load_model(natural_llama).model
    for name, arm in result["arms"].items():
        assert arm["status"] == "done", (name, arm.get("error"))
        assert sorted(arm["heldout_loss_by_kind"]) == ["sampled", "tasks"]
        assert all(sorted(ce, key=int) == lengths and all(math.isfinite(v) for v in ce.values()) for ce in arm["heldout_loss_by_kind"].values())
    for kind in ("sampled", "tasks"):  # the teacher's CE of a kind is the CE on that kind's rows
        stream = rows.stream("heldout", 0, LENGTH, kind=kind)
        expected = heldout_loss(teacher, torch.stack([stream[i] for i in range(min(2, len(stream)))]))
        assert result["arms"]["teacher"]["heldout_loss_by_kind"][kind][str(LENGTH)] == pytest.approx(expected, rel=1e-5)
    by_kind = result["arms"]["teacher"]["heldout_loss_by_kind"]
    assert by_kind["sampled"][str(LENGTH)] != pytest.approx(by_kind["tasks"][str(LENGTH)])
    assert result["summary"]["families"]["layerwise_7to1"]["metrics"][f"heldout:tasks@{LENGTH}"]["n_runs"] == 1
    merged = tmp_path / "merged"  # --merge carries the setting and the columns
    assert benchmark.main(common + ["--merge", str(tmp_path / "out"), "--out", str(merged), "--work", str(tmp_path / "wm")]) == 0
    for folder in (tmp_path / "out", merged):
        table = (folder / "hybrid_quality.md").read_text()
        arm_tables, seed_tables = table.split("## Seeds")
        assert f"| held-out CE sampled {LENGTH} | held-out CE sampled {2 * LENGTH} | held-out CE tasks {LENGTH} |" in arm_tables
        assert "| held-out CE 1x | held-out CE sampled 1x | held-out CE tasks 1x |" in seed_tables
        teacher_row = next(line for line in arm_tables.splitlines() if line.startswith("| teacher |"))
        assert f"| {by_kind['sampled'][str(LENGTH)]:.3f} | {by_kind['sampled'][str(2 * LENGTH)]:.3f} | {by_kind['tasks'][str(LENGTH)]:.3f} |" in teacher_row
    assert json.loads((merged / "hybrid_quality.json").read_text())["settings"] == result["settings"]


def test_eval_data_scores_evaluation_only_text_beside_the_heldout_ce(natural_llama, transfer_data, tmp_path):
    from headscope.quality import heldout_loss
    from headscope.transfer.data import text_rows

    benchmark = load("hybrid_quality")
    docs = load("python_docs_text").documents()
    assert len(docs) > 20 and all(d["kind"] == "python_docs" and d["text"] for d in docs) and "Python 3" in docs[0]["source"]
    real = tmp_path / "python_docs.jsonl"
    assert load("python_docs_text").main(["--out", str(real)]) == 0
    with pytest.raises(HeadscopeError, match="exists"):  # kept unless --force
        load("python_docs_text").main(["--out", str(real)])
    prose = tmp_path / "prose.txt"
    prose.write_text(" ".join(" ".join(NATURAL.sentence(tuple(s))) for s in haystack.haystack_sentences("essay")[:80]))
    common = ["--smoke", "--model", str(natural_llama), "--data", str(transfer_data), "--heldout-fraction", "0.3", "--teacher-length",
              str(LENGTH), "--length-multiples", "1,2", "--arms", "teacher,layerwise_7to1", "--steps", "1,1,1",
              "--retrieval-probes", "needle_single", "--reasoning-probes", "ioi", "--work", str(tmp_path / "work")]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "python_docs.jsonl").write_text(real.read_text())  # the same stem twice: one column name
    for bad in ([str(tmp_path / "absent.jsonl")], [str(transfer_data.with_suffix(".mix.json"))], [f"{real},{tmp_path / 'x' / 'python_docs.jsonl'}"]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.parse_args(common + ["--eval-data", *bad])
        assert exit_info.value.code == 2
    assert benchmark.main(common + ["--eval-data", f"{real},{prose}", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "hybrid_quality.json").read_text())
    assert [e["name"] for e in result["settings"]["eval_data"]] == ["python_docs", "prose"] and "heldout_kinds" not in result["settings"]
    tokenizer, teacher = load_model(natural_llama).tokenizer, load_model(natural_llama).model
    for name, arm in result["arms"].items():
        assert arm["status"] == "done" and sorted(arm["heldout_loss_by_kind"]) == ["eval:prose", "eval:python_docs"], name
    for path in (real, prose):  # the teacher's CE on a file is the CE on its first rows, packed in order
        expected = heldout_loss(teacher, text_rows(path, tokenizer, [LENGTH], 2)[LENGTH])
        assert result["arms"]["teacher"]["heldout_loss_by_kind"][f"eval:{path.stem}"][str(LENGTH)] == pytest.approx(expected, rel=1e-5)
    assert len(text_rows(real, tokenizer, [LENGTH], 1000)[LENGTH]) > 2  # the rows are a prefix of the file's packing
    table = (tmp_path / "out" / "hybrid_quality.md").read_text()
    assert f"| held-out CE eval:python_docs {LENGTH} | held-out CE eval:python_docs {2 * LENGTH} | held-out CE eval:prose {LENGTH} |" in table
    assert "| held-out CE 1x | held-out CE eval:python_docs 1x | held-out CE eval:prose 1x |" in table
    assert "evaluation-only text <name>, never trained on (python_docs: sha256" in table
    with pytest.raises(HeadscopeError, match="not one row"):
        text_rows(prose, tokenizer, [LENGTH, 100_000], 1)
