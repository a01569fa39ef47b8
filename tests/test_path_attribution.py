"""Path patching equals its slow full-forward twin; attribution patching is the derivative of exact
patching and ranks heads like it; screen's verified heads carry exact scores; receiver parsing."""

from __future__ import annotations

import pytest
import torch

from conftest import random_probe, tiny_gpt2_sharp, tiny_qwen3
from headscope import Head, HeadScores, HeadscopeError, load_model
from headscope.patching import activation_scores, parse_receivers, rank_correlation, score
from headscope.patching.attribution import attribution_deltas
from headscope.patching.common import prepare
from headscope.patching.engine import head_view
from headscope.patching.path import Receiver, path_scores
from headscope.patching.reference import path_reference

MODELS = {"qwen3": tiny_qwen3, "gpt2": tiny_gpt2_sharp}
# Receiver sets covering each input alone, all three, two receivers sharing a KV group with different
# inputs (Qwen3 heads 0 and 1 share a group), and receivers in two layers.
RECEIVER_SETS = ["2.1:q", "2.1:k,1.2:v", "1.0:k,1.1:q,2.3", "1.3:v,2.0:qk"]


@pytest.fixture(scope="module")
def lms():
    return {name: load_model(make()) for name, make in MODELS.items()}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("receivers", RECEIVER_SETS)
def test_path_equals_full_forward_reference(lms, family, receivers):
    lm = lms[family]
    probe = random_probe(n_pairs=3, length=10, seed=1)
    parsed = parse_receivers(receivers)
    fast = path_scores(lm, probe, receivers=parsed, batch_size=5, progress=False)  # senders split across batches
    slow = path_reference(lm, probe, parsed)
    last = max(r.head.layer for r in parsed)
    assert fast.values[:last].abs().max() > 0.02, "senders should reach the receivers"
    assert (fast.values[last:] == 0).all()
    assert fast.meta["receivers"] == [str(r) for r in parsed] and fast.meta["sender_layers"] == last
    torch.testing.assert_close(fast.values, slow, atol=1e-5, rtol=0)


def test_path_noising_equals_reference(lms):
    lm = lms["qwen3"]
    probe = random_probe(n_pairs=2, length=8, seed=2)
    parsed = parse_receivers("2.2:k,1.1")
    fast = path_scores(lm, probe, receivers=parsed, noising=True, progress=False).values
    torch.testing.assert_close(fast, path_reference(lm, probe, parsed, noising=True), atol=1e-5, rtol=0)


def test_path_inputs_are_separate_paths(lms):
    """A receiver's q-, k- and v-only scores each differ from its all-inputs scores (the inputs route
    different paths; a bug that ignored the input choice would make them equal)."""
    lm = lms["qwen3"]
    probe = random_probe(n_pairs=3, length=10, seed=3)
    by_input = {i: path_scores(lm, probe, receivers=[Receiver(Head(2, 1), frozenset(i))], progress=False).values[:2] for i in ("q", "k", "v", "qkv")}
    for single in ("q", "k", "v"):
        assert (by_input[single] - by_input["qkv"]).abs().max() > 1e-3


def test_default_receivers_are_top_direct_heads_outside_layer_0(lms):
    lm = lms["qwen3"]
    probe = random_probe(n_pairs=2, length=8, seed=4)
    scores = path_scores(lm, probe, n_receivers=3, progress=False)
    direct = score(lm, probe, "direct", progress=False).values
    direct[0] = 0
    expected = sorted(torch.argsort(direct.abs().flatten(), descending=True)[:3].tolist())
    got = sorted(parse_receivers(",".join(scores.meta["receivers"])), key=lambda r: r.head)
    assert [r.head.layer * 4 + r.head.head for r in got] == expected
    assert all(r.inputs == frozenset("qkv") for r in got)


def test_parse_receivers():
    assert parse_receivers("1.3:k, 2.5") == [Receiver(Head(1, 3), frozenset("k")), Receiver(Head(2, 5))]
    assert parse_receivers("L1H3:q,1.3:v") == [Receiver(Head(1, 3), frozenset("qv"))]  # merged
    assert str(Receiver(Head(1, 3), frozenset("vk"))) == "1.3:kv" and str(Receiver(Head(2, 0))) == "2.0"
    for bad, message in [("1.3:x", "letters from q, k, v"), ("1.3,,2.1", "empty item"), ("13", "LAYER.HEAD"), ("", "empty item")]:
        with pytest.raises(HeadscopeError, match=message):
            parse_receivers(bad)


def test_path_errors_name_the_receiver(lms):
    lm, probe = lms["qwen3"], random_probe(n_pairs=2, length=8)
    with pytest.raises(HeadscopeError, match="receiver 0.1 is in layer 0"):
        path_scores(lm, probe, receivers=parse_receivers("0.1"), progress=False)
    with pytest.raises(HeadscopeError, match="receiver 5.1 is outside the model"):
        path_scores(lm, probe, receivers=parse_receivers("5.1"), progress=False)


@torch.no_grad()
def _interpolated_patch_ld(run, layer: int, head: int, eps: float) -> float:
    """Exact mean LD with head ``(layer, head)`` moved ``eps`` of the way from base to source output."""
    n_heads = run.lm.fingerprint.n_heads
    pairs = torch.arange(run.n_pairs)
    base, source = head_view(run.base.z[layer], n_heads), head_view(run.source.z[layer], n_heads)

    def patch(z):
        out = head_view(z.clone(), n_heads)
        out[:, :, head] = base[:, :, head] + eps * (source[:, :, head] - base[:, :, head])
        return out.view(z.shape)

    return float(run.engine.run_from(layer, run.base.resid_pre[layer], pairs, {layer: patch}).mean())


@pytest.mark.parametrize("noising", [False, True])
def test_attribution_is_the_derivative_of_exact_patching(noising):
    """AtP's delta is d/d(eps) of the exact LD when a head moves eps of the way to its source output
    (central difference; float64 model, but the engine's metric is float32, hence eps = 1e-2 and an
    absolute tolerance ~1e-4 of the largest delta): the total derivative, through later heads too."""
    lm = load_model(tiny_qwen3().double())
    run = prepare(lm, random_probe(n_pairs=3, length=10, seed=5), noising)
    deltas = attribution_deltas(run, batch_size=2, progress=False)
    eps = 1e-2
    numeric = torch.tensor([[(_interpolated_patch_ld(run, l, h, eps) - _interpolated_patch_ld(run, l, h, -eps)) / (2 * eps)
                             for h in range(4)] for l in range(3)], dtype=torch.float64)
    assert deltas.abs().max() > 1e-2
    torch.testing.assert_close(deltas.double(), numeric, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_attribution_ranks_like_exact_activation(lms, family):
    lm = lms[family]
    correlations = []
    for seed in range(3):
        probe = random_probe(n_pairs=4, length=12, seed=seed, n_changed=1)  # one changed token: small perturbation
        exact = activation_scores(lm, probe, progress=False).values
        estimate = score(lm, probe, "attribution", progress=False)
        assert estimate.method == "attribution" and estimate.values.shape == exact.shape
        correlations.append(rank_correlation(estimate.values, exact))
    print(f"\n{family}: Spearman(attribution, activation) per probe seed = {[round(c, 3) for c in correlations]}")
    assert min(correlations) > 0.5


def test_screen_verifies_top_k_exactly(lms):
    lm = lms["qwen3"]
    probe = random_probe(n_pairs=3, length=10, seed=6)
    screen = score(lm, probe, "screen", top_k=5, batch_size=4, progress=False)
    exact = activation_scores(lm, probe, progress=False).values
    estimate = score(lm, probe, "attribution", progress=False).values
    heads = [tuple(h) for h in screen.meta["exact_heads"]]
    assert len(heads) == 5 == screen.meta["top_k"]
    expected = torch.argsort(estimate.abs().flatten(), descending=True, stable=True)[:5].tolist()
    assert [l * 4 + h for l, h in heads] == expected
    rows, cols = torch.tensor(heads).T
    torch.testing.assert_close(screen.values[rows, cols], exact[rows, cols], atol=1e-5, rtol=0)
    others = torch.ones(3, 4, dtype=torch.bool)
    others[rows, cols] = False
    torch.testing.assert_close(screen.values[others], estimate[others], atol=1e-6, rtol=0)
    with pytest.raises(HeadscopeError, match="top_k must be between 1 and the number of heads"):
        score(lm, probe, "screen", top_k=13, progress=False)


def test_rank_correlation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a * 10 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)


def test_cli_path_and_screen(qwen3_dir, tmp_path, capsys):
    from headscope.cli import main
    from headscope.probes import save_probe_jsonl

    probe = random_probe(n_pairs=2, length=8, seed=9)
    probe_file = tmp_path / "probe.jsonl"
    save_probe_jsonl(probe, probe_file)
    common = ["score", "--model", qwen3_dir, "--probe", str(probe_file), "--pairs", "2", "--device", "cpu"]
    lm = load_model(qwen3_dir)

    out = tmp_path / "path.json"
    assert main(common + ["--method", "path", "--receivers", "2.1:k,1.3", "--out", str(out)]) == 0
    saved = HeadScores.load(out)
    assert saved.method == "path" and saved.meta["receivers"] == ["1.3", "2.1:k"]
    expected = path_scores(lm, probe, receivers=parse_receivers("2.1:k,1.3"), progress=False).values
    torch.testing.assert_close(saved.values, expected, atol=1e-6, rtol=0)
    assert "into receivers 1.3,2.1:k" in capsys.readouterr().out
    # --resume does not reuse scores of other receivers
    assert main(common + ["--method", "path", "--receivers", "2.2", "--out", str(out), "--resume"]) == 0
    assert "skipped" not in capsys.readouterr().out and HeadScores.load(out).meta["receivers"] == ["2.2"]

    out = tmp_path / "screen.json"
    assert main(common + ["--method", "screen", "--top-k", "3", "--out", str(out)]) == 0
    assert len(HeadScores.load(out).meta["exact_heads"]) == 3

    for extra, message in [(["--method", "activation", "--receivers", "1.2"], "--receivers applies to --method path"),
                           (["--method", "path", "--receivers", "1.2:z"], "letters from q, k, v"),
                           (["--method", "attribution", "--top-k", "3"], "--top-k applies to --method screen")]:
        assert main(common + extra + ["--out", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err
