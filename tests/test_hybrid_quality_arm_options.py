"""benchmarks/hybrid_quality.py --arm-option: per-family build_hybrid switches, on the CPU.

The situation of the real-model runs: results made without the new arms (run A), then, resumed from a copy
of them, an ``--arm`` with ``fa_rope=true`` over two transfer seeds and a second transfer seed of an arm
first run unseeded (run B). The switches must reach ``build_student`` for that arm alone, be recorded
and shown, survive ``--merge``, and stop a resume whose options differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_benchmark
from headscope.heads import HeadscopeError

pytestmark = pytest.mark.usefixtures("one_thread")
SWITCHED = {"fa_rope": True, "conv_size": 2}


def read(out: Path) -> dict:
    return json.loads((out / "hybrid_quality.json").read_text())


def mixed_layer_rope(student) -> set[bool]:
    """``fa_rope`` of the layers that hold FA and GDN heads (all-FA layers keep RoPE whatever the switch)."""
    specs = [layer.self_attn.spec for layer in student.model.layers]
    return {spec.fa_rope for spec in specs if spec.n_fa_heads and spec.n_gdn_heads}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import headscope.transfer
    from headscope.mask import random_mask, save_mask
    from headscope.models import load_model

    root = tmp_path_factory.mktemp("arm_options")
    benchmark = load_benchmark("hybrid_quality")
    model = benchmark.build_tiny_model(root / "tiny", benchmark.SMOKE_LENGTH)
    mask_file = root / "mask.json"
    save_mask(random_mask(load_model(model).fingerprint, ratio="7:1", seed=7), mask_file)
    common = ["--smoke", "--model", str(model), "--mask", str(mask_file), "--steps", "1,1,1", "--random-seeds", "0",
              "--length-multiples", "1,2", "--arm", f"plain={mask_file}"]
    run_a = common + ["--arms", "headwise_random_7to1_s0,plain", "--out", str(root / "a"), "--work", str(root / "wa")]
    run_b = common + ["--arm", f"rope={mask_file}", "--arm-option", "rope:fa_rope=true", "--arm-option", "rope:conv_size=2",
                      "--seeded-arms", "rope,plain", "--transfer-seeds", "0,1", "--arms", "rope,plain_t1",
                      "--out", str(root / "b"), "--work", str(root / "wb")]
    built, build = [], headscope.transfer.build_student

    def spy(teacher, mask, options):
        student = build(teacher, mask, options)
        built.append((dict(options), mixed_layer_rope(student)))
        return student

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(headscope.transfer, "build_student", spy)
        assert benchmark.main(run_a) == 0
        built_a, built[:] = list(built), []
        shutil.copytree(root / "a", root / "b")  # resume into a copy of the earlier results, as on the GPU
        assert benchmark.main(run_b) == 0
    return benchmark, root, run_b, built_a, built


def test_arm_option_parsing():
    parse = load_benchmark("hybrid_quality").parse_args
    args = parse(["--arm", "x=m.json", "--arm-option", "x:fa_rope=true", "--arm-option", "layerwise_3to1:conv_size=2",
                  "--arm-option", "x:attn_scale=0.2", "--hybrid-option", "fa_rope=false"])
    assert args.arm_options == {"x": {"fa_rope": True, "attn_scale": 0.2}, "layerwise_3to1": {"conv_size": 2}}
    assert args.hybrid_options == {"fa_rope": False}
    for bad in ("x=fa_rope=true", "x:not_a_switch=1", "x:fa_rope=yes", "x:fa_rope=1", "x:conv_size=2.5", "x:attn_scale=true",
                "teacher:fa_rope=true", "y:fa_rope=true",
                "headwise_random_7to1_s0:fa_rope=true"):  # one seed of a family: options hold for whole families
        with pytest.raises(SystemExit) as exit_info:
            parse(["--arm", "x=m.json", "--arm-option", bad])
        assert exit_info.value.code == 2, bad


def test_the_switches_reach_the_arm_family_and_no_other(runs):
    _, _, _, built_a, built_b = runs
    assert built_a == [({}, {False})] * 2  # run A: plain and the random arm, defaults: NoPE FA heads
    assert built_b == [(SWITCHED, {True}), ({}, {False}), (SWITCHED, {True})]  # rope_t0, plain_t1, rope_t1


def test_records_table_and_state_bytes_carry_the_options(runs):
    from headscope.maskfile import mask_from_dict
    from headscope.quality import recurrent_state_bytes

    _, root, _, _, _ = runs
    data = read(root / "b")
    assert list(data["arms"]) == ["plain", "headwise_random_7to1_s0", "rope_t0", "plain_t1", "rope_t1"]
    assert all(arm["status"] == "done" for arm in data["arms"].values())
    assert "hybrid_options" not in data["settings"] and "arm_options" not in data["settings"]
    for name, arm in data["arms"].items():
        assert arm.get("hybrid_options") == (SWITCHED if name.startswith("rope") else None), name
        mask = mask_from_dict(arm["mask"], name)
        assert arm["gdn_state_bytes_per_sequence"] == recurrent_state_bytes(mask.fingerprint, mask, 2 if name.startswith("rope") else 4)
    assert [arm["transfer_seed"] for arm in data["arms"].values()] == [0, 0, 0, 1, 1]
    families = data["summary"]["families"]
    assert families["plain"]["masks"] == {"plain": [0, 1]} and families["rope"]["masks"] == {"rope": [0, 1]}  # the unseeded run is seed 0
    table = (root / "b" / "hybrid_quality.md").read_text()
    assert "| arm | status | options | FA heads |" in table
    assert "| rope_t1 | done | conv_size=2, fa_rope=true |" in table and "| plain_t1 | done | defaults |" in table
    assert "| plain | 1 | 0,1 (runs: 2) |" in table


def test_merge_of_results_with_and_without_the_arm(runs):
    benchmark, root, run_b, _, _ = runs
    merged = root / "merged"
    assert benchmark.main(run_b + ["--merge", f"{root / 'a'},{root / 'b'}", "--out", str(merged), "--work", str(root / "wm")]) == 0
    data = read(merged)
    assert list(data["arms"]) == list(read(root / "b")["arms"])
    assert data["arms"]["rope_t0"]["hybrid_options"] == SWITCHED
    other = read(root / "b")
    other["arms"]["plain"]["hybrid_options"] = {"fa_rope": True}  # the same arm done with other options in two sources
    (root / "c").mkdir()
    (root / "c" / "hybrid_quality.json").write_text(json.dumps(other))
    with pytest.raises(HeadscopeError, match="plain is done with different --arm-option"):
        benchmark.main(run_b + ["--merge", f"{root / 'a'},{root / 'c'}", "--out", str(root / "m2"), "--work", str(root / "wm2")])


def test_a_resume_with_other_options_stops_with_exit_2(runs, capsys):
    from headscope.cli import script_main

    benchmark, root, run_b, _, _ = runs
    before = (root / "b" / "hybrid_quality.json").read_bytes()
    changed = [arg.replace("rope:fa_rope=true", "rope:fa_rope=false") for arg in run_b]
    with pytest.raises(HeadscopeError, match=r"rope_t0 \(conv_size=2, fa_rope=true; this command: conv_size=2, fa_rope=false\)"):
        benchmark.main(changed)
    cut = run_b.index("rope:conv_size=2")
    with pytest.raises(SystemExit) as exit_info:
        script_main(lambda: benchmark.main(run_b[: cut - 1] + run_b[cut + 1 :]))  # fa_rope alone, conv_size dropped
    assert exit_info.value.code == 2
    assert "headscope: error:" in capsys.readouterr().err.splitlines()[-1]
    assert (root / "b" / "hybrid_quality.json").read_bytes() == before  # nothing rewritten
    repeat = run_b[: run_b.index("--arms")] + ["--arms", "plain_t0", "--out", str(root / "b"), "--work", str(root / "wb")]
    with pytest.raises(HeadscopeError, match="plain is done with transfer seed 0, the run plain_t0 would repeat"):
        benchmark.main(repeat)


def test_dry_run_says_what_is_kept_and_what_runs(runs, capsys):
    benchmark, root, run_b, _, _ = runs
    dry = run_b[: run_b.index("--arms")] + ["--arms", "rope,plain_t1,headwise_random_7to1_s0", "--random-seeds", "0,1",
                                             "--out", str(root / "b"), "--work", str(root / "wb"), "--dry-run"]
    before = (root / "b" / "hybrid_quality.json").read_bytes()
    assert benchmark.main(dry) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("dry run: 4 arms planned, 0 to run; 1 other arms in the results stay as they are (plain)")
    assert any(line.split() == ["rope_t1", "file", "kept", "(done)", "conv_size=2,", "fa_rope=true"] for line in lines)
    assert benchmark.main(dry[:-1] + ["--arms", "headwise_random_7to1_s1", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-2].split() == ["headwise_random_7to1_s1", "random", "runs", "defaults"]
    assert (root / "b" / "hybrid_quality.json").read_bytes() == before


def test_a_new_seed_of_a_family_cannot_take_other_options_than_its_done_runs(runs):
    """The seed summary pools a family's runs: plain_t2 with fa_rope=true beside plain and plain_t1 (done, defaults) would
    mix switches in one family silently, though neither done run is resumed by the command."""
    benchmark, root, run_b, _, _ = runs
    seeded = run_b.index("0,1")
    more = run_b[:seeded] + ["0,1,2"] + run_b[seeded + 1 : run_b.index("--arms")]
    dry = ["--arm-option", "plain:fa_rope=true", "--arms", "plain_t2", "--out", str(root / "b"), "--work", str(root / "wb"), "--dry-run"]
    with pytest.raises(HeadscopeError, match=r"plain_t1 \(no options; this command: fa_rope=true\)"):
        benchmark.main(more + dry)
    assert benchmark.main(more + dry[2:]) == 0  # the family's own options: fine


def test_merge_refuses_one_family_run_with_different_options(runs):
    benchmark, root, run_b, _, _ = runs
    other = read(root / "b")
    other["arms"]["rope_t1"]["hybrid_options"] = {"fa_rope": True}  # rope_t0 keeps conv_size=2 too: two shards' commands differed
    (root / "d").mkdir()
    (root / "d" / "hybrid_quality.json").write_text(json.dumps(other))
    with pytest.raises(HeadscopeError, match="family rope"):
        benchmark.main(run_b + ["--merge", f"{root / 'd'}", "--out", str(root / "m3"), "--work", str(root / "wm3")])


def test_an_option_that_changes_nothing_in_its_family_is_refused(runs, capsys):
    """fa_rope on a layer-wise family: its FA layers stay the pretrained attention with RoPE whatever the switch, so the
    option (and the table's options column) would claim a difference that was never trained: one line, exit 2."""
    from headscope.cli import script_main

    benchmark, root, run_b, _, _ = runs
    base = run_b[: run_b.index("--arms")] + ["--out", str(root / "b"), "--work", str(root / "wb"), "--dry-run"]
    for option in ("layerwise_3to1:fa_rope=true", "layerwise_7to1:gate_bias_init=2.0"):
        with pytest.raises(SystemExit) as exit_info:
            script_main(lambda: benchmark.main(base + ["--arm-option", option, "--arms", "layerwise_3to1"]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.splitlines()[-1].startswith(f"headscope: error: --arm-option {option} changes nothing"), err
    assert benchmark.main(base + ["--arm-option", "layerwise_3to1:conv_size=2", "--arms", "layerwise_3to1"]) == 0  # GDN layers feel it
    mask_file = run_b[run_b.index("--mask") + 1]  # a head-wise mask under a name that starts like a layer-wise family
    assert benchmark.main(base + ["--arm", f"layerwise_file={mask_file}", "--arm-option", "layerwise_file:fa_rope=true",
                                  "--arms", "layerwise_file"]) == 0


def test_dry_run_writes_nothing_also_with_the_smoke_stand_in_model(tmp_path):
    benchmark = load_benchmark("hybrid_quality")
    assert benchmark.main(["--smoke", "--tiny-model", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert list(tmp_path.iterdir()) == []  # the tiny model was built in a temporary directory, not in --work
