"""RoPE dependence scorer: its head recomputation is the model's own head output when RoPE is kept (the
exact twin), the NoPE score is the normalised logit-difference loss of exactly one changed head, and
models without RoPE are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import random_probe, save_model, tiny_llama, tiny_qwen3

from headscope.heads import HeadscopeError
from headscope.models import load_model
from headscope.patching import score
from headscope.patching.rope import head_output


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def lm(request, tmp_path_factory):
    model = tiny_qwen3(seed=3) if request.param == "qwen3" else tiny_llama(seed=3)
    return load_model(save_model(model, tmp_path_factory.mktemp(request.param)), dtype=torch.float32)


def test_head_output_with_rope_is_the_models_own(lm):
    """The exact twin: recomputing a head from the attention input reproduces the o_proj input slice."""
    ids = random_probe(n_pairs=2, length=20).tensors("cpu")["clean"]
    layer = lm.fingerprint.n_layers - 1
    seen = {}
    handles = [lm.attention(layer).register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("hidden", kw["hidden_states"]), with_kwargs=True),
               lm.out_proj(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].clone()))]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    for head in range(lm.fingerprint.n_heads):
        with torch.no_grad():
            mine = head_output(lm, layer, head, seen["hidden"], rope=True)
            nope = head_output(lm, layer, head, seen["hidden"], rope=False)
        own = seen["z"][..., lm.head_slice(head)]
        assert torch.allclose(mine, own, atol=1e-5), (head, (mine - own).abs().max())
        assert not torch.allclose(nope, own, atol=1e-3)  # the rotation matters past position 0
        assert torch.allclose(nope[:, 0], own[:, 0], atol=1e-5)  # position 0 is not rotated


def test_rope_scores_are_one_head_without_rotation(lm, monkeypatch):
    """The score of a head is (LD_clean - LD_nope) / (LD_clean - LD_corrupt); replacing the NoPE
    recomputation by the RoPE one (the unchanged model) must give exactly zero for every head."""
    probe = random_probe(n_pairs=3, length=16)
    scores = score(lm, probe, "rope", progress=False)
    fp = lm.fingerprint
    assert scores.values.shape == (fp.n_layers, fp.n_heads) and scores.method == "rope"
    assert torch.isfinite(scores.values).all() and scores.values.abs().max() > 1e-3

    import headscope.patching.rope as rope

    original = rope.head_output
    monkeypatch.setattr(rope, "head_output", lambda lm, layer, head, hidden, rope: original(lm, layer, head, hidden, True))
    unchanged = score(lm, probe, "rope", progress=False)
    assert unchanged.values.abs().max() < 1e-4


def test_rope_dependence_refuses_models_without_rope_and_noising(gpt2_dir, lm):
    with pytest.raises(HeadscopeError, match="no rotary position embedding"):
        score(load_model(gpt2_dir), random_probe(), "rope", progress=False)
    with pytest.raises(HeadscopeError, match="clean prompts only"):
        score(lm, random_probe(), "rope", noising=True, progress=False)
