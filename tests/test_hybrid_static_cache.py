"""HybridStaticCache: the static-cache decode path (eager on CPU, the body a CUDA graph captures) against
transformers' DynamicCache path: logits within 1e-5 in float32, identical greedy generations, generate()'s
choice of path, cache reuse and bounds."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

from conftest import tiny_qwen3
from headscope.heads import HeadMask, HeadscopeError
from headscope.hybrid import HybridConfig, HybridForCausalLM, build_hybrid
from headscope.hybrid.generation import kept_static_cache, static_cache_for_generate
from headscope.hybrid.modeling import CACHE_FIELD
from headscope.hybrid.static_cache import HybridStaticCache
from headscope.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def built(full_heads: list[tuple[int, int]], seed: int = 7) -> HybridForCausalLM:
    lm = load_model(tiny_qwen3(seed=seed).float())
    full = torch.zeros(lm.fingerprint.shape, dtype=torch.bool)
    for layer, head in full_heads:
        full[layer, head] = True
    return build_hybrid(lm, HeadMask(full, lm.fingerprint), HybridConfig(floor_scale=4))


@pytest.fixture(scope="module")
def hybrid() -> HybridForCausalLM:
    """Layers: 0 hybrid (1 FA head, log scaling from position 3), 1 plain full attention, 2 pure GDN."""
    return built([(0, 2), (1, 0), (1, 1), (1, 2), (1, 3)])


def cache_for(model, batch=2, max_length=9, mode="static", generation_mode=GenerationMode.GREEDY_SEARCH, **settings):
    """The cache ``generate()`` takes for a call that transformers settled to these settings."""
    return static_cache_for_generate(model, GenerationConfig(max_length=max_length, **settings), {}, generation_mode, batch, mode)


def prompt(batch=3, length=7, seed=0):
    ids = torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, : batch - 1] = 0  # left padding (rows padded by different amounts)
    mask[-1, :3] = 0
    return ids, mask


@torch.no_grad()
def run(model, cache, ids, mask, steps: int, chunk: int = 3) -> list[torch.Tensor]:
    """Prefill, ``steps`` decode steps (greedy), a ``chunk``-token prefill continuing the cache, one more step."""
    out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
    logits = [out.logits]
    for step in range(steps + 1):
        if step == steps:  # a multi-token chunk after decoding (prefill into a cache that holds tokens)
            new = torch.randint(2, 128, (ids.shape[0], chunk), generator=torch.Generator().manual_seed(9)).to(ids.device)
        else:
            new = out.logits[:, -1:].argmax(-1)
        ids, mask = torch.cat((ids, new), 1), torch.cat((mask, torch.ones_like(new)), 1)
        out = model(new, attention_mask=mask, cache=getattr(out, CACHE_FIELD), use_cache=True)
        logits.append(out.logits)
    out = model(out.logits[:, -1:].argmax(-1), attention_mask=torch.cat((mask, torch.ones_like(mask[:, :1])), 1),
                cache=getattr(out, CACHE_FIELD), use_cache=True)
    return logits + [out.logits]


def test_static_cache_logits_match_the_dynamic_cache(hybrid):
    ids, mask = prompt()
    dynamic = run(hybrid, DynamicCache(config=hybrid.config), ids, mask, steps=6)
    static_cache = HybridStaticCache(hybrid, batch_size=3, max_length=20)
    static = run(hybrid, static_cache, ids, mask, steps=6)
    assert static_cache.seen_tokens == 7 + 6 + 3 + 1 and int(static_cache.seen) == static_cache.seen_tokens
    for a, b in zip(dynamic, static):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels")
def test_on_cuda_the_static_decode_with_the_epilogue_in_its_kernels_matches_the_dynamic_cache(hybrid):
    """float32 on CUDA: the static path's decode steps run kernels/fa_decode and kernels/gdn_decode with the
    epilogue inside (layer 0: gamma and the gate; layer 2: gamma), the dynamic path the layer's own epilogue."""
    import copy

    model = copy.deepcopy(hybrid).cuda()
    ids, mask = (t.cuda() for t in prompt())
    with torch.inference_mode():
        dynamic = run(model, DynamicCache(config=model.config), ids, mask, steps=6)
        static = run(model, HybridStaticCache(model, batch_size=3, max_length=20), ids, mask, steps=6)
    for a, b in zip(dynamic, static):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-3


@pytest.mark.slow
def test_the_static_decode_through_the_triton_kernels_matches_the_dynamic_cache_under_the_interpreter():
    """The CUDA decode path on the CPU (``static_decode_interpret_check.py``): fa_decode, gdn_decode and (layers with
    both kinds of heads) hybrid_decode run their Triton kernels under the interpreter, the epilogue (gamma, the FA
    gate) inside them, at every decode step; the logits of the prompt, the steps and a later chunk match the
    DynamicCache path's (a dropped FA gate: 0.57-0.69)."""
    from pathlib import Path

    from triton_interpreter import interpreted_cases

    cases = interpreted_cases(Path(__file__).with_name("static_decode_interpret_check.py"), timeout=300)
    assert len(cases) == 2
    for case in cases:
        calls = case["kernel_calls"]  # 5 decode steps: fa_decode per FA-only layer, gdn_decode per GDN-only, hybrid_decode per both
        want = {"hybrid_full_and_pure_gdn_layers": (5, 5, 5), "two_fa_heads_of_one_kv_group_no_gate_weights": (0, 5, 10)}[case["name"]]
        assert case["steps"] == 7 and (calls["fa_decode"], calls["gdn_decode"], calls["hybrid_decode"]) == want, case
        assert case["max_abs_dlogit"] < 1e-4, case


def test_decode_steps_apply_the_epilogue_in_the_branch_kernels(hybrid, monkeypatch):
    """A static-cache decode step hands gamma (and the FA gate) to the two branch steps, which apply the fused
    epilogue to their heads (in their kernels on CUDA): the layer's own epilogue launch runs only for prefills."""
    import headscope.hybrid.layer as layer_mod

    lengths, epilogue = [], layer_mod.head_epilogue
    monkeypatch.setattr(layer_mod, "head_epilogue", lambda o, *args, **kwargs: (lengths.append((o[0] if isinstance(o, tuple) else o).shape[1]),
                                                                             epilogue(o, *args, **kwargs))[1])
    ids, mask = prompt()
    run(hybrid, HybridStaticCache(hybrid, batch_size=3, max_length=20), ids, mask, steps=3)
    assert sorted(set(lengths)) == [3, 7]  # the prompt and the later chunk (2 hybrid layers each), no decode step
    lengths.clear()
    run(hybrid, DynamicCache(config=hybrid.config), ids, mask, steps=1)
    assert 1 in lengths  # the dynamic path keeps the layer's epilogue


def test_greedy_generate_static_equals_dynamic_and_reuses_its_cache(hybrid):
    ids, mask = prompt(seed=1)
    want = hybrid.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, decode_mode="dynamic")
    got = hybrid.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, decode_mode="static")
    assert torch.equal(got, want)
    cache = kept_static_cache(hybrid)
    again = hybrid.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, decode_mode="static")
    assert torch.equal(again, want) and kept_static_cache(hybrid) is cache
    one = ids[:, -1:]  # a one-token prompt decodes from zero GDN states, whatever the cache held before
    assert torch.equal(hybrid.generate(one, max_new_tokens=4, do_sample=False, decode_mode="static"),
                       hybrid.generate(one, max_new_tokens=4, do_sample=False, decode_mode="dynamic"))


def test_the_kept_cache_follows_the_weights():
    """generate() keeps its static cache (and graph) while the weights stay where they are and what they are: written
    in place they do; a parameter replaced (by setattr, or in ``_parameters`` as accelerate does), a layer list
    changed, a dtype reinterpreted or a ``.to()`` give a new cache."""
    from headscope.hybrid.generation import _weights_key

    model = built([(0, 2), (1, 0)], seed=3)
    cache = lambda: cache_for(model)  # noqa: E731
    first, key = cache(), _weights_key(model)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight.mul_(0.5)  # in place: same addresses, same cache
    assert _weights_key(model) == key and cache() is first
    changes = [
        lambda: setattr(attn.o_proj, "weight", torch.nn.Parameter(attn.o_proj.weight.detach().clone())),
        lambda: attn.q_proj._parameters.__setitem__("weight", torch.nn.Parameter(attn.q_proj.weight.detach().clone())),
        lambda: model.model.layers.insert(0, model.model.layers.pop(2)),  # the same layers, reordered
        lambda: model.to(torch.bfloat16),
        lambda: setattr(attn.k_proj.weight, "data", attn.k_proj.weight.data.view(torch.float16)),  # same address, new dtype
    ]
    for change in changes:
        before, kept = _weights_key(model), cache()
        change()
        assert _weights_key(model) != before and cache() is not kept


@pytest.mark.parametrize("length, chunk", [(11, 4), (7, 3)])  # chunks 4+4+3; 3+3+1 (a one-token chunk is a decode step)
def test_chunked_prefill_on_the_static_cache_matches_one_pass_on_the_dynamic_cache(hybrid, length, chunk):
    """generate() with prefill_chunk_size (what benchmarks/generate_speed.py times at 32K) over left padding and
    log-scaled positions: the same greedy tokens and logits as the dynamic path's one-pass prefill."""
    ids, mask = prompt(length=length, seed=4)

    def generate(mode, prefill_chunk):
        config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=prefill_chunk,
                                  output_logits=True, return_dict_in_generate=True)
        return hybrid.generate(ids, attention_mask=mask, generation_config=config, decode_mode=mode)

    want, got = generate("dynamic", None), generate("static", chunk)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-5


def test_one_token_forwards_outside_a_decode_step_are_prefill_chunks(hybrid):
    """Only ``HybridStaticCache.decode`` sets up a decode step (GDN states zeroed before a one-token prompt, the token's
    padding mask). A one-token call that transformers routes through the model's forward instead (hidden states asked
    for, a one-token prefill chunk, autograd on) is a prefill chunk: it used to take the decode kernels without that
    set-up, starting from the previous prompt's GDN states and letting left padding into them."""
    ids, mask = prompt(seed=5)
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)

    def both(*args, **kwargs):
        want, got = (hybrid.generate(*args, decode_mode=mode, **settings, **kwargs) for mode in ("dynamic", "static"))
        assert torch.equal(got.sequences, want.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-5

    hybrid.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, decode_mode="static")  # the kept cache holds a prompt
    both(ids[:, -1:], output_hidden_states=True)  # a one-token prompt on the reused cache, through the forward
    both(ids, attention_mask=mask, output_hidden_states=True, prefill_chunk_size=1)  # one-token chunks over left padding
    cache = kept_static_cache(hybrid)
    for grad in (False, True):  # a manual one-token prompt on a reset cache, with autograd on and off
        cache.reset()
        with torch.set_grad_enabled(grad):
            got = hybrid(ids[:, :1], cache=cache, use_cache=True).logits
            want = hybrid(ids[:, :1], cache=DynamicCache(config=hybrid.config), use_cache=True).logits
        assert (got - want).abs().max().item() < 1e-5


def test_the_static_cache_follows_transformers_settled_generation_settings(hybrid):
    """The cache is chosen once transformers has merged the call's settings with the model's ``generation_config`` and
    applied its length rules: no length given (20 new tokens), ``max_new_tokens`` in a config beside a ``max_length``
    keyword (``max_new_tokens`` wins), beam search or ``use_cache=False`` set only on the model."""
    ids, mask = prompt(batch=2, length=5, seed=6)

    def same(**kwargs):
        want, got = (hybrid.generate(ids, attention_mask=mask, do_sample=False, decode_mode=mode, **kwargs) for mode in ("dynamic", "static"))
        assert torch.equal(got, want)
        return got.shape[1] - ids.shape[1]

    assert same() == 20
    assert same(generation_config=GenerationConfig(max_new_tokens=30, do_sample=False), max_length=12) == 30
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    for name, value, reason in (("num_beams", 2, "beam_search"), ("use_cache", False, "use_cache=False")):
        saved = getattr(hybrid.generation_config, name)
        setattr(hybrid.generation_config, name, value)
        try:
            with pytest.raises(HeadscopeError, match=reason):
                hybrid.generate(ids, attention_mask=mask, generation_config=config, decode_mode="static")
            hybrid.generate(ids, attention_mask=mask, generation_config=config, decode_mode="auto")  # CPU: dynamic, served
        finally:
            setattr(hybrid.generation_config, name, saved)


def test_generate_picks_the_dynamic_path_where_the_static_one_cannot_serve(hybrid):
    ids, _ = prompt(batch=1)
    assert cache_for(hybrid, batch=1, mode="auto") is None  # CPU: dynamic
    assert cache_for(hybrid, batch=1, mode="auto", generation_mode=GenerationMode.BEAM_SEARCH, num_beams=2) is None
    with pytest.raises(HeadscopeError, match="num_beams"):
        hybrid.generate(ids, max_new_tokens=2, num_beams=2, decode_mode="static")
    with pytest.raises(HeadscopeError, match="needs a CUDA model"):
        hybrid.generate(ids, max_new_tokens=2, decode_mode="graph")
    with pytest.raises(HeadscopeError, match="decode_mode must be one of"):
        hybrid.generate(ids, max_new_tokens=2, decode_mode="fast")
    cache = cache_for(hybrid, batch=1, max_length=300)
    assert cache.max_length == 512 and cache.batch_size == 1  # rounded up to 256-token steps


def test_a_full_static_cache_is_one_clear_error(hybrid):
    ids, mask = prompt(batch=2, length=6)
    cache = HybridStaticCache(hybrid, batch_size=2, max_length=7)
    with torch.no_grad():
        out = hybrid(ids, attention_mask=mask, cache=cache, use_cache=True)
        hybrid(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        with pytest.raises(HeadscopeError, match="holds 7 tokens per row; 7 \\+ 1 do not fit"):
            hybrid(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        with pytest.raises(HeadscopeError, match="built for batch 2, not 1"):
            hybrid(ids[:1, :1], cache=HybridStaticCache(hybrid, batch_size=2, max_length=7), use_cache=True)


def test_a_pure_gdn_hybrid_decodes_without_a_mask_on_the_static_cache():
    """A DynamicCache cannot tell a hybrid without FA heads its position; the static cache counts tokens."""
    model = built([])
    ids, _ = prompt(batch=2, length=9, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        cache = HybridStaticCache(model, batch_size=2, max_length=9)
        pieces = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 9)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


def test_generate_walks_the_model_to_fuse_only_when_something_moved(monkeypatch):
    """``generate()`` fuses the projections before taking its cache key, but a model whose weights have not moved since
    a complete fuse is not walked again; one where a fuse was refused (a hooked projection) is, until it fuses."""
    import headscope.hybrid.generation as generation

    model = built([(0, 2), (1, 0)], seed=3)
    walks, fuse = [], generation.fuse_for_inference
    monkeypatch.setattr(generation, "fuse_for_inference", lambda m: walks.append(1) or fuse(m))
    cache = lambda: cache_for(model)  # noqa: E731
    for _ in range(3):
        cache()
    assert len(walks) == 1
    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda *args: None)
    q_proj.weight.data = q_proj.weight.detach().clone()  # moved, and hooked: the walk cannot fuse it
    cache(), cache()
    assert len(walks) == 3 and not model.model.layers[0].self_attn.inference_weights.fused_linears("projections", model.model.layers[0].self_attn.projection_linears())
    handle.remove()
    cache(), cache()
    assert len(walks) == 4  # fused at the first call after the hook went, not walked at the second


def test_without_fa_heads_in_layer_0_the_dynamic_cache_takes_positions_from_a_layer_with_them():
    """Layer 0 pure GDN (as the real SmolLM2-135M's KV-aware mask makes it): a DynamicCache's ``get_seq_length()`` asks
    layer 0, whose linear-attention slot holds no token count, so the decode positions (RoPE) must come from a layer
    with a KV cache; prompt then token by token, no mask, against one pass without a cache."""
    model = built([(1, 0), (1, 1), (2, 2)])  # layer 0: 4 GDN heads; 1: 2 FA + 2 GDN; 2: 1 FA + 3 GDN
    ids, _ = prompt(batch=2, length=9, seed=4)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], cache=DynamicCache(config=model.config), use_cache=True)
        pieces = [out.logits]
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], cache=getattr(out, CACHE_FIELD), use_cache=True)
            pieces.append(out.logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5
