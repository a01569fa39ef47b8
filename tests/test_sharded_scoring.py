"""Scoring on two processes (torchrun, gloo, CPU) writes the scores of one process; the split of heads over ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import beside_torchrun, random_probe
from headscope import HeadScores, load_model
from headscope.heads import Head, ModelFingerprint
from headscope.patching import score
from headscope.patching.sharding import all_heads, map_heads, replay_cost, split_heads
from headscope.probes import load_probe_jsonl, save_probe_jsonl

WORKER = Path(__file__).with_name("score_dist_worker.py")
OPTIONS = {"activation": {}, "direct": {"noising": True}, "path": {}, "rope": {}, "screen": {"top_k": 5}}  # as the worker's RUNS


@pytest.mark.parametrize("n_shards", [1, 2, 3, 8])
def test_split_heads_balances_replay_cost(n_shards):
    heads = [Head(layer, head) for layer in range(28) for head in range(16)]
    cost = replay_cost(28)
    shares = split_heads(heads, cost, n_shards)
    assert sorted(i for share in shares for i in share) == list(range(len(heads)))  # every head once
    loads = [sum(cost(heads[i]) for i in share) for share in shares]
    # LPT: the most loaded rank got its last head when it was the least loaded one, and within 4/3 of the best split.
    assert max(loads) - min(loads) <= max(cost(h) for h in heads)
    assert max(loads) <= 4 / 3 * max(sum(loads) / n_shards, 28)
    contiguous = [sum(cost(h) for h in heads[k * len(heads) // n_shards:(k + 1) * len(heads) // n_shards]) for k in range(n_shards)]
    assert max(loads) <= max(contiguous)  # never worse than cutting the layers into equal blocks
    assert all(share == sorted(share) for share in shares) and split_heads(heads, cost, n_shards) == shares  # deterministic


def test_map_heads_outside_torchrun_is_one_call():
    heads = all_heads(ModelFingerprint("qwen3", n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8))
    calls = []

    def effects(subset):
        calls.append(list(subset))
        return torch.tensor([10.0 * h.layer + h.head for h in subset])

    values = map_heads(heads, effects, replay_cost(2))
    assert calls == [heads] and values.tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]


def test_two_processes_score_as_one(qwen3_dir, tmp_path):
    probe_file = tmp_path / "probe.jsonl"
    save_probe_jsonl(random_probe(n_pairs=3, length=10, seed=11), probe_file)
    probe = load_probe_jsonl(probe_file)  # as the command reads it (name and meta from the file)

    def single_process() -> dict[str, HeadScores]:
        lm = load_model(qwen3_dir)
        return {method: score(lm, probe, method, progress=False, **options) for method, options in OPTIONS.items()}

    expected, output = beside_torchrun(WORKER, [qwen3_dir, str(probe_file), str(tmp_path / "dist")], single_process)
    assert output.count("on 2 processes") == len(OPTIONS), output[-3000:]  # rank 0 alone reports
    assert output.count("skipped (--resume)") == 1, output[-3000:]
    for method, single in expected.items():
        sharded = HeadScores.load(tmp_path / "dist" / f"{method}.json")
        assert sharded.method == method and sharded.fingerprint == single.fingerprint
        torch.testing.assert_close(sharded.values, single.values, atol=1e-5, rtol=0, msg=method)
        assert sharded.meta.keys() == single.meta.keys(), method
        for key, value in single.meta.items():  # receivers, exact heads, baselines, ...
            if isinstance(value, float):
                assert math.isclose(sharded.meta[key], value, abs_tol=1e-5), (method, key)
            else:
                assert sharded.meta[key] == value, (method, key)


def test_exit_process_skips_finalisation_only_after_creating_a_group(monkeypatch):
    from headscope import distributed

    class Exited(Exception):  # os._exit never returns
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as done:  # one process: a plain exit
        distributed.exit_process(3)
    assert done.value.code == 3
    monkeypatch.setattr(distributed, "_created_group", True)  # as init_distributed under torchrun
    with pytest.raises(Exited) as done:
        distributed.exit_process(4)
    assert done.value.args == (4,)
