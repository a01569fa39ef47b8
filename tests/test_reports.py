"""Report figures (shapes, traces, hover data), the self-contained HTML page, and the fuse/report/mask CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from headscope import cli
from headscope.fusion import fuse
from headscope.heads import Head, HeadMask, HeadscopeError, HeadScores, ModelFingerprint
from headscope.mask import layer_matched_random_mask, load_mask, random_mask, save_mask, select_mask
from headscope.reports import (
    build_report_html,
    fused_heatmap,
    heatmap,
    heatmap_grid,
    layer_distributions,
    magnitude_ranks,
    sender_receiver,
)

FP = ModelFingerprint("qwen3", 4, 8, 2, 16, "tiny")  # group size 4


def make_scores(seed: int, probe: str, capability: str, method: str = "activation", fp: ModelFingerprint = FP) -> HeadScores:
    values = torch.randn(fp.shape, generator=torch.Generator().manual_seed(seed))
    return HeadScores(values, probe, method, fp, capability)


@pytest.fixture(scope="module")
def inputs() -> list[HeadScores]:
    return [make_scores(0, "needle", "retrieval"), make_scores(1, "multikey", "retrieval"), make_scores(2, "mqar", "reasoning")]


def test_heatmap_shape_colours_and_hover(inputs):
    fig = heatmap(inputs[0])
    (trace,) = fig.data
    assert isinstance(trace, go.Heatmap) and np.asarray(trace.z).shape == (4, 8)
    assert trace.zmid == 0 and trace.colorscale[0][1] != trace.colorscale[-1][1]
    ranks = magnitude_ranks(inputs[0].values)
    assert list(trace.customdata[2][5]) == ["L2H5", 1, pytest.approx(float(inputs[0].values[2, 5])), int(ranks[2, 5])]
    assert ranks.flatten().sort().values.tolist() == list(range(1, 33))
    assert "KV group" in trace.hovertemplate and "rank" in trace.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"
    assert len(fig.layout.shapes) == 1  # one line between the two KV groups


def test_grid_has_one_scaled_heatmap_per_input(inputs):
    fig = heatmap_grid(inputs, cols=2)
    assert len(fig.data) == 3 and all(isinstance(t, go.Heatmap) and t.coloraxis == "coloraxis" for t in fig.data)
    assert max(np.abs(np.asarray(t.z)).max() for t in fig.data) == pytest.approx(1.0)
    assert fig.data[1].customdata[0][0][2] == pytest.approx(float(inputs[1].values[0, 0]))  # raw score in hover
    assert [a.text for a in fig.layout.annotations] == ["needle · activation (retrieval)", "multikey · activation (retrieval)", "mqar · activation (reasoning)"]


def test_fused_heatmap_outlines_mask(inputs):
    ranking = fuse(inputs)
    mask = select_mask(ranking, n_full=8, kv_aware=True)
    fig = fused_heatmap(ranking, mask)
    heat, marks = fig.data
    assert np.asarray(heat.z).shape == (4, 8) and heat.customdata[0][0][3] == int(ranking.ranks()[0, 0])
    assert sorted(zip(marks.y, marks.x)) == [(h.layer, h.head) for h in mask.heads()]
    kv_boxes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(kv_boxes) == int(mask.kv_groups_full().sum()) == 2
    assert "8 full heads (25.0%), KV cache 25.0%" in fig.layout.title.text
    mask_only = fused_heatmap(None, random_mask(FP, n_full=3, seed=0))
    assert np.asarray(mask_only.data[0].z).sum() == 3
    with pytest.raises(HeadscopeError, match="needs a ranking or a mask"):
        fused_heatmap(None, None)


def test_sender_receiver_from_dict_and_matrix():
    receivers = [Head(3, 0), Head(2, 5)]
    senders = {r: make_scores(10 + i, "needle", "retrieval", "path") for i, r in enumerate(receivers)}
    fig = sender_receiver(senders, top_n=5)
    (trace,) = fig.data
    z = np.asarray(trace.z)
    assert z.shape == (5, 2) and list(trace.x) == ["L3H0", "L2H5"]
    stacked = torch.stack([senders[r].values for r in receivers], -1)  # (L, H, R)
    best = stacked.abs().amax(-1).flatten().topk(5).indices
    assert list(trace.y) == [f"L{int(i) // 8}H{int(i) % 8}" for i in best]
    assert np.allclose(z, stacked.reshape(32, 2)[best].numpy(), atol=1e-6)
    same = sender_receiver(stacked, receivers, top_n=5)
    assert np.allclose(np.asarray(same.data[0].z), z) and list(same.data[0].y) == list(trace.y)
    with pytest.raises(HeadscopeError, match="one receiver Head per column"):
        sender_receiver(stacked, receivers[:1])


def test_sender_receiver_columns_per_receiver_input():
    from headscope.patching import Receiver, parse_receivers

    by_input = [Receiver(Head(2, 5)), *parse_receivers("2.5:q"), *parse_receivers("2.5:kv")]
    senders = {r: make_scores(20 + i, "ioi", "reasoning", "path") for i, r in enumerate(by_input)}
    fig = sender_receiver(senders, top_n=4)
    assert list(fig.data[0].x) == ["L2H5", "L2H5:q", "L2H5:kv"] and np.asarray(fig.data[0].z).shape == (4, 3)
    stacked = torch.stack([s.values for s in senders.values()], -1)
    with pytest.raises(HeadscopeError, match="L2H5 appear more than once"):  # Head(2, 5) and its all-inputs Receiver
        sender_receiver(stacked, [Head(2, 5), Receiver(Head(2, 5)), by_input[1]])


def test_layer_distributions(inputs):
    fig = layer_distributions(inputs)
    assert len(fig.data) == 3 and all(isinstance(t, go.Box) for t in fig.data)
    assert list(fig.data[0].x) == [l for l in range(4) for _ in range(8)] and len(fig.data[0].y) == 32
    violins = layer_distributions(inputs[0], kind="violin")
    assert len(violins.data) == 1 and isinstance(violins.data[0], go.Violin)


def test_report_html_is_self_contained(inputs):
    mask = select_mask(fuse(inputs), ratio="3:1")
    page = build_report_html(inputs, mask, paths={Head(3, 1): make_scores(9, "needle", "retrieval", "path")})
    assert page.startswith("<!DOCTYPE html>") and page.count("<title>headscope report</title>") == 1
    assert page.count("plotly.js v") >= 1 and len(page) > 3_000_000  # the library itself is inlined
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']https?:", page, re.IGNORECASE)
    assert all(f'id="figure-{i}"' in page for i in range(4))  # fused, grid, distributions, sender view
    assert "8 of 32 (25.0%)" in page and "KV cache kept" in page
    assert "retrieval" in page and "reasoning" in page and "needle/activation, multikey/activation" in page
    top_needle = inputs[0].top(1)[0]
    assert f"{top_needle}=" in page


def test_report_leaves_rope_scores_out_of_the_ranking(inputs):
    """``headscope report scores/*.json`` also globs the ``*.rope.json`` files: they are drawn and listed, but RoPE
    dependence is not importance, so the ranking and the per-capability tops are those of the other inputs."""
    rope = HeadScores(torch.zeros(FP.shape), "needle", "rope", FP, "retrieval")
    rope.values[0, 0] = 50.0  # would top any fused ranking it entered
    page = build_report_html(inputs + [rope])
    assert page == build_report_html(inputs + [rope], ranking=fuse(inputs))
    assert "needle/activation, multikey/activation</td>" in page and "<td>needle</td><td>rope</td>" in page  # listed in Inputs only
    with pytest.raises(HeadscopeError, match="nothing to rank"):
        build_report_html([rope])


def test_report_checks_models_and_needs_input(inputs):
    other = make_scores(0, "x", "retrieval", fp=ModelFingerprint("qwen3", 4, 8, 8, 16))
    with pytest.raises(HeadscopeError, match="x/activation belongs to another model.*n_kv_heads"):
        build_report_html([inputs[0], other])
    with pytest.raises(HeadscopeError, match="nothing to report"):
        build_report_html([])
    assert 'id="figure-0"' in build_report_html([], random_mask(FP, seed=1))


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``headscope ARGV`` with only this file's subcommands registered."""
    monkeypatch.setattr(cli, "COMMANDS", ("fuse", "mask", "report"))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fuse_report_export(tmp_path, monkeypatch, capsys, inputs):
    files = [str(s.save(tmp_path / f"{s.probe}.json")) for s in inputs]
    mask_path = tmp_path / "mask.json"
    code, out, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--ratio", "7:1", "--kv-aware", "--rule", "max", "--out", str(mask_path))
    assert code == 0 and "4 of 32 heads" in out
    mask = load_mask(mask_path, expect=FP)
    assert mask.n_full == 4 and mask.kv_fraction == 0.125 and mask.provenance["fusion"]["rule"] == "max"
    assert [i["source"] for i in mask.provenance["fusion"]["inputs"]] == files
    assert "different checkpoints" not in out
    for index, item in enumerate(inputs):  # the same shape, two checkpoints (a base model and its fine-tune): said
        item.meta["weights_digest"] = "base" if index else "finetuned"
        item.save(files[index])
    code, out, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--ratio", "7:1", "--out", str(tmp_path / "mixed.json"))
    assert code == 0 and f"note: the score files come from 2 different checkpoints of this shape ({files[0]}; " in out
    code, _, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--n-full", "6", "--weight", "retrieval=3", "--weight", "reasoning=1", "--out", str(tmp_path / "w.json"))
    assert code == 0 and load_mask(tmp_path / "w.json").n_full == 6
    code, _, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--n-full", "6", "--exclude", "L0H0,1.1", "--out", str(tmp_path / "e.json"))
    excluded = load_mask(tmp_path / "e.json")
    assert code == 0 and excluded.n_full == 6 and not excluded.full[0, 0] and not excluded.full[1, 1]
    assert excluded.provenance["selection"]["excluded"] == ["L0H0", "L1H1"]
    rope_values = torch.zeros(FP.shape)
    rope_values[1, 2] = 0.3  # RoPE-dependent on a solved probe: kept off, with the --exclude heads
    rope = HeadScores(values=rope_values, probe="p", method="rope", fingerprint=FP, capability="retrieval", meta={"ld_clean": 4.0, "ld_corrupt": 0.0})
    rope_file = str(rope.save(tmp_path / "p.rope.json"))
    code, out, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--n-full", "6", "--exclude", "L0H0", "--rope-scores", rope_file, "--out", str(tmp_path / "ro.json"))
    assert code == 0 and "RoPE-dependent heads kept off full attention: L1H2" in out
    assert load_mask(tmp_path / "ro.json").provenance["selection"]["excluded"] == ["L0H0", "L1H2"]
    code, out, _ = run_cli(monkeypatch, capsys, "fuse", *files, "--ratio", "1:1", "--whole-layers", "--group-score", "sum", "--out", str(tmp_path / "wl.json"))
    layers = load_mask(tmp_path / "wl.json").full
    assert code == 0 and "16 of 32 heads" in out and layers.all(1).sum() == 2 and layers.sum() == 16  # two whole layers of 8
    code, _, err = run_cli(monkeypatch, capsys, "fuse", *files, rope_file, "--n-full", "6", "--out", str(tmp_path / "bad.json"))
    assert code == 2 and "pass it with --rope-scores" in err and not (tmp_path / "bad.json").exists()

    code, out, _ = run_cli(monkeypatch, capsys, "report", *files, "--mask", str(mask_path), "--out", str(tmp_path / "r.html"))
    assert code == 0 and (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")

    code, _, _ = run_cli(monkeypatch, capsys, "mask", "export", str(mask_path), "--format", "tsv", "--out", str(tmp_path / "d.tsv"))
    assert code == 0 and np.loadtxt(tmp_path / "d.tsv", delimiter="\t").sum() == 1  # one of 8 KV groups
    code, _, _ = run_cli(monkeypatch, capsys, "mask", "export", str(mask_path), "--format", "retrieval-json", "--out", str(tmp_path / "r.json"))
    assert code == 0 and len(json.loads((tmp_path / "r.json").read_text())) == 32


def test_cli_baselines(tmp_path, monkeypatch, capsys, qwen3_dir, inputs):
    code, _, _ = run_cli(monkeypatch, capsys, "mask", "layerwise", "--model", qwen3_dir, "--ratio", "2:1", "--out", str(tmp_path / "l.json"))
    layerwise = load_mask(tmp_path / "l.json", expect=ModelFingerprint("qwen3", 3, 4, 2, 24))
    assert code == 0 and layerwise.full.all(1).tolist() == [False, False, True]
    code, _, _ = run_cli(monkeypatch, capsys, "mask", "export", str(tmp_path / "l.json"), "--format", "layer-types", "--out", str(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text())["layer_types"] == ["linear_attention", "linear_attention", "full_attention"]
    like = str(inputs[0].save(tmp_path / "s.json"))
    code, _, _ = run_cli(monkeypatch, capsys, "mask", "random", "--like", like, "--n-full", "5", "--seed", "2", "--out", str(tmp_path / "x.json"))
    assert code == 0 and torch.equal(load_mask(tmp_path / "x.json").full, random_mask(FP, n_full=5, seed=2).full)
    concentrated = save_mask(random_mask(FP, n_full=8, seed=0, kv_aware=True), tmp_path / "c.json")
    code, out, _ = run_cli(monkeypatch, capsys, "mask", "random", "--kv-matched", str(concentrated), "--seed", "3", "--out", str(tmp_path / "k.json"))
    matched = load_mask(tmp_path / "k.json", expect=FP)
    assert code == 0 and matched.n_full == 8 and int(matched.kv_groups_full().sum()) == 2 and "(2 of 8 KV groups)" in out
    layer_fa = HeadMask(torch.zeros(FP.shape, dtype=torch.bool).index_fill_(0, torch.tensor([1]), True), FP)  # layer 1 all FA
    layer_fa.full[3, [0, 5]] = True
    source = save_mask(layer_fa, tmp_path / "lf.json")
    code, out, _ = run_cli(monkeypatch, capsys, "mask", "random", "--layer-matched", str(source), "--seed", "3", "--out", str(tmp_path / "m.json"))
    matched = load_mask(tmp_path / "m.json", expect=FP)
    assert code == 0 and torch.equal(matched.full, layer_matched_random_mask(layer_fa, seed=3).full) and "(4 of 8 KV groups)" in out
    assert f"note: 8 heads are in every layer-matched mask of {source} (its all-full-attention layers: 1)" in out
    with pytest.raises(SystemExit) as exit_info:  # one source of the budget only
        run_cli(monkeypatch, capsys, "mask", "random", "--layer-matched", str(source), "--kv-matched", str(source), "--out", str(tmp_path / "b.json"))
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, inputs):
    good = str(inputs[0].save(tmp_path / "a.json"))
    other = str(make_scores(0, "b", "retrieval", fp=ModelFingerprint("qwen3", 4, 8, 4, 16)).save(tmp_path / "b.json"))
    save_mask(random_mask(FP, seed=0), tmp_path / "random.json")
    rope_other = str(make_scores(0, "b", "retrieval", "rope", fp=ModelFingerprint("qwen3", 4, 8, 4, 16)).save(tmp_path / "ro.json"))
    rope = str(make_scores(0, "b", "retrieval", "rope").save(tmp_path / "rope.json"))
    zeros = str(HeadScores(torch.zeros(FP.shape), "z", "activation", FP, "retrieval").save(tmp_path / "zeros.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    ragged = json.loads(open(good).read())
    ragged["values"][1] = ragged["values"][1][:3]
    (tmp_path / "ragged.json").write_text(json.dumps(ragged))
    ragged["values"] = ragged["values"][2:] + [ragged["values"][0]]
    (tmp_path / "short.json").write_text(json.dumps(ragged))
    broken = json.loads((tmp_path / "random.json").read_text())
    broken["model"]["n_layers"], broken["provenance"]["selection"] = "abc", []
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    broken["model"]["n_layers"] = FP.n_layers
    (tmp_path / "selection.json").write_text(json.dumps(broken))
    cases = [
        (("fuse", str(tmp_path / "list.json"), "--out", str(tmp_path / "m.json")), "is not a headscope scores file (kind='a JSON list')"),
        (("fuse", good, good, "--out", str(tmp_path / "m.json")), "is given twice"),
        (("fuse", str(tmp_path / "short.json"), "--out", str(tmp_path / "m.json")), "short.json: 'values' is 3 x 8 but its model has 4 layers"),
        (("fuse", str(tmp_path / "ragged.json"), "--out", str(tmp_path / "m.json")), "'values' must be n_layers lists of n_heads numbers"),
        (("mask", "export", str(tmp_path / "broken.json"), "--format", "tsv", "--out", str(tmp_path / "t.tsv")), "model fingerprint is malformed"),
        (("report", "--mask", str(tmp_path / "selection.json"), "--out", str(tmp_path / "r.html")), "'provenance.selection' must be an object"),
        (("fuse", good, "--rope-scores", rope_other, "--out", str(tmp_path / "m.json")), "ro.json (b/rope) was scored on another model"),
        (("fuse", good, "--rope-scores", rope, "--rope-threshold", "nan", "--out", str(tmp_path / "m.json")), "--rope-threshold must be"),
        (("fuse", zeros, "--out", str(tmp_path / "m.json")), "every head has the same importance"),
        (("fuse", good, "--rule", "rrf", "--rrf-k", "inf", "--out", str(tmp_path / "m.json")), "rrf_k must be a finite number"),
        (("fuse", good, other, "--out", str(tmp_path / "m.json")), "b.json (b/activation) was scored on another model"),
        (("fuse", good, "--rule", "rrf", "--normalise", "zscore", "--out", str(tmp_path / "m.json")), "rrf"),
        (("fuse", good, "--weight", "retrieval", "--out", str(tmp_path / "m.json")), "expected CAPABILITY=NUMBER"),
        (("fuse", str(tmp_path / "none.json"), "--out", str(tmp_path / "m.json")), "scores file not found"),
        (("fuse", good, "--out", good), "is one of the command's inputs"),
        (("report", good, "--out", good), "is one of the command's inputs"),
        (("mask", "export", str(tmp_path / "random.json"), "--format", "tsv", "--out", str(tmp_path / "random.json")), "is one of the command's inputs"),
        (("mask", "layerwise", "--model", str(tmp_path), "--out", str(tmp_path / "l.json")), "no config.json"),
        (("mask", "random", "--kv-matched", str(tmp_path / "random.json"), "--n-full", "3", "--out", str(tmp_path / "k.json")), "drop --ratio"),
        (("mask", "random", "--layer-matched", str(tmp_path / "random.json"), "--kv-aware", "--out", str(tmp_path / "k.json")),
         "--layer-matched takes the budget from the mask; drop --ratio"),
        (("report", other, "--mask", str(tmp_path / "random.json"), "--out", str(tmp_path / "r.html")), "made for another model"),
        (("fuse", good, "--whole-layers", "--kv-aware", "--out", str(tmp_path / "m.json")), "whole layers cannot be combined with kv_aware"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
