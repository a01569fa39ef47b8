"""benchmarks/ablation_table.py on `headscope ablate --out` payloads made by AblationResult itself: one row per
(run, k) with its p-value, families counted against their Bonferroni threshold, other JSON files skipped; an empty
folder or a foreign --out file is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def table():
    return load_benchmark("ablation_table")


def _run(probe: str, source: str, baseline: str, selected_ld: float, random_lds: list[float], k: int = 5, pairs: bool = False,
         selected_from: dict | None = None) -> dict:
    """A run; with ``pairs`` every row has 4 per-pair values whose mean is its logit difference (else none, as in
    files written before they were kept)."""
    from headscope.ablation import AblationResult, AblationRow

    spread = lambda ld: [ld - 1, ld + 1, ld - 0.5, ld + 0.5] if pairs else []  # noqa: E731
    rows = [AblationRow(0, "none", None, [], 1.0, 8.0), AblationRow(k, "selected", None, [], 0.0, selected_ld, 0, spread(selected_ld))]
    rows += [AblationRow(k, "random", i, [], 1.0, ld, 2, spread(ld)) for i, ld in enumerate(random_lds)]
    return AblationResult(probe, 128, 4, source, baseline=baseline, rows=rows, selected_from=selected_from).to_dict()


def test_table_rows_p_values_and_families(table, tmp_path, capsys):
    folder = tmp_path / "runs"
    folder.mkdir()
    beaten = [2.0 + i for i in range(19)]  # all above the selected 1.0: p = 1/20
    (folder / "a.json").write_text(json.dumps(_run("kv_recall", "top heads of kv_recall.direct.json (kv_recall/direct)", "layer-matched", 1.0, beaten, pairs=True)))
    (folder / "b.json").write_text(json.dumps(_run("needle_single", "top heads of needle_single.direct.json (needle_single/direct)", "layer-matched", 1.0, [0.5] + beaten[:18])))
    (folder / "c.json").write_text(json.dumps(_run("needle_single", "full-attention heads of mask.json", "uniform", 1.0, [0.0, 3.0], k=33)))
    (folder / "scores.json").write_text(json.dumps({"kind": "headscope.scores"}))  # not an ablation: skipped
    assert table.main([str(folder)]) == 0
    text = (folder / "summary.md").read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| top k direct") or line.startswith("| full-attention")]
    assert len(rows) == 3
    assert rows[0].startswith("| full-attention heads of mask.json | uniform | needle_single | 128 x 4 | 33 |") and rows[0].endswith("| 2 | 2.0 | 0.667 | - |")
    assert "| kv_recall |" in rows[1] and rows[1].endswith("| 19 | 2.0 | 0.050 | 0.050 (0.050-0.050) |")  # below every set on every pair
    assert "| needle_single |" in rows[2] and rows[2].endswith("| 19 | 2.0 | 0.100 | - |")  # one random set at or below
    assert "- top k direct, layer-matched: 1 of 2 rows at p <= 0.05; 0 at the Bonferroni threshold 0.0250 (no row can reach it: the smallest possible p is 0.050)." in text
    assert "- full-attention heads of mask.json, uniform: 0 of 1 rows at p <= 0.05; 0 at the Bonferroni threshold 0.0500 (no row can reach it: the smallest possible p is 0.333)." in text
    assert table.main([str(folder)]) == 0  # its own table is replaced


def test_bad_input_is_one_line_and_nothing_written(table, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert table.main([str(empty)]) == 2
    assert "no `headscope ablate --out` files" in capsys.readouterr().err and not (empty / "summary.md").exists()
    (empty / "a.json").write_text(json.dumps(_run("ioi", "full-attention heads of mask.json", "uniform", 1.0, [2.0])))
    foreign = tmp_path / "notes.md"
    foreign.write_text("my notes\n")
    assert table.main([str(empty), "--out", str(foreign)]) == 2
    assert "not a table of this script" in capsys.readouterr().err and foreign.read_text() == "my notes\n"
    (empty / "broken.json").write_text("{")
    assert table.main([str(empty)]) == 2 and "not readable JSON" in capsys.readouterr().err
    assert table.main([str(tmp_path / "missing")]) == 2 and "not a folder" in capsys.readouterr().err


def test_structured_selection_names_the_family_and_one_file_version(table, tmp_path, capsys):
    folder = tmp_path / "runs"
    folder.mkdir()
    ranking = {"kind": "mask_ranking", "file": "mask.json", "sha256": "aaaa"}
    old_words = "top full-attention heads of mask.json by its fused ranking"  # a file from before `selected_from`: the same family
    (folder / "a.json").write_text(json.dumps(_run("ioi", "any words", "layer-matched", 1.0, [2.0] * 19, selected_from=ranking)))
    (folder / "b.json").write_text(json.dumps(_run("induction", old_words, "layer-matched", 1.0, [2.0] * 19)))
    scored = {"kind": "scores", "file": "ioi.direct.json", "sha256": "bbbb", "probe": "ioi", "method": "direct"}
    (folder / "c.json").write_text(json.dumps(_run("ioi", "top heads of ioi.direct.json (ioi/direct)", "uniform", 1.0, [2.0], selected_from=scored)))
    (folder / "e.json").write_text(json.dumps(_run("needle_single", "any", "layer-matched", 1.0, [2.0] * 19, selected_from=ranking)))
    assert table.main([str(folder)]) == 0  # (a.json and e.json: one file of one version, accepted)
    text = capsys.readouterr().out
    assert f"- {old_words}, layer-matched: 3 of 3 rows at p <= 0.05" in text and "- top k direct, uniform: 0 of 1 rows" in text
    for partial in ({"kind": "scores", "file": "x.json"}, {"kind": "unknown", "file": "x.json"}, {}):  # incomplete: the words decide
        assert table.selection_label({"source": old_words, "selected_from": partial}) == old_words
    (folder / "d.json").write_text(json.dumps(_run("kv_recall", "any", "layer-matched", 1.0, [2.0], selected_from={**ranking, "sha256": "cccc"})))
    before = (folder / "summary.md").read_text()
    assert table.main([str(folder)]) == 2
    assert "a.json and d.json used two different files named mask.json" in capsys.readouterr().err
    assert (folder / "summary.md").read_text() == before
