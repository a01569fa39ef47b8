"""RoPE dependence: how much of a head's job needs its rotary position embedding.

HydraHead's full-attention (FA) heads lose RoPE (NoPE, log-scaled queries). A head whose job is
positional (attend to the previous token, or two tokens back to read a key) cannot do it without
positions, so a mask that puts such a head on the FA branch breaks it, however high its patching score.
This scorer measures that one change on the unchanged model: for every head, its output is recomputed
from the same hidden states with q and k *not* rotated (its q/k norms, scaling, KV group and causal
mask kept, every other head and layer as they were), and

    score = (LD_clean - LD_nope) / (LD_clean - LD_corrupt)

with ``LD`` the mean logit difference ``logit(answer) - logit(wrong)`` at the last position of the clean
prompts: the fraction of the clean/corrupt gap lost when this head alone attends without positions
(0: the head's job is position-free; 1: as bad as the corrupt prompt), on the scale of the noising
patching scores. The corrupt prompts only set that scale.

Exact twin: ``head_output(..., rope=True)`` reproduces the model's own head output (a test holds it to
1e-5), so the rotation is the only thing the score changes. RoPE families only (Llama, Mistral, Qwen2,
Qwen3) with full causal attention over the probe (a sliding window shorter than the probe is refused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from headscope.heads import Head, HeadScores, HeadscopeError
from headscope.models import LoadedModel
from headscope.patching.batching import AdaptiveBatcher, default_batch_size
from headscope.patching.common import ProbeRun, prepare
from headscope.patching.engine import hooked, write_heads
from headscope.patching.sharding import all_heads, map_heads, replay_cost
from headscope.probes.base import Probe

ROPE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_THRESHOLD = 0.25  # share of a probe's gap lost without RoPE that marks a head as RoPE-dependent
MIN_GAP = 2.0  # clean - corrupt logit difference below which a probe's normalised scores are mostly noise


def rope_dependent_heads(scores: Sequence[HeadScores], threshold: float = ROPE_THRESHOLD, min_gap: float = MIN_GAP) -> list[Head]:
    """Heads whose ``rope`` score reaches ``threshold`` on any probe with a clean/corrupt gap >= ``min_gap``.

    These are the heads a head-wise hybrid should not put on its NoPE full-attention branch (``select_mask(...,
    exclude=...)``); a probe the model does not solve has a tiny gap, which would turn noise into scores.
    Returned in (layer, head) order.
    """
    heads = set()
    for item in scores:
        if item.method != "rope":
            raise HeadscopeError(f"{item.meta.get('source', item.probe)}: method {item.method!r}, expected rope scores")
        if item.meta.get("ld_clean", 0.0) - item.meta.get("ld_corrupt", 0.0) >= min_gap:
            heads.update(Head(int(layer), int(head)) for layer, head in (item.values >= threshold).nonzero().tolist())
    return sorted(heads, key=lambda h: (h.layer, h.head))


def rope_unsupported(lm: LoadedModel, length: int) -> str | None:
    """Why ``rope_dependence_scores`` cannot run on ``lm`` at ``length`` tokens, or None."""
    if lm.fingerprint.architecture not in ROPE_ARCHITECTURES:
        return (f"rope dependence needs a RoPE model ({', '.join(ROPE_ARCHITECTURES)}); "
                f"{lm.fingerprint.architecture} has no rotary position embedding")
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < length:
        return (f"rope dependence recomputes full causal attention, but the model uses a sliding "
                f"window of {window} tokens, shorter than the probe ({length})")
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``apply_rotary_pos_emb`` for one head: ``x (B, T, D)``, ``cos``/``sin`` ``(B, T, D)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def head_output(lm: LoadedModel, layer: int, head: int, hidden: torch.Tensor, rope: bool) -> torch.Tensor:
    """One head's attention output (the input of the output projection) recomputed from the layer's
    attention input.

    Args:
        lm: a RoPE-family model.
        layer, head: the query head.
        hidden: ``(B, T, d_model)`` the attention module's input (after the layer's input norm).
        rope: rotate q and k as the model does (True), or not (NoPE).
    Returns:
        ``(B, T, head_dim)``, in ``hidden``'s dtype.
    """
    fp = lm.fingerprint
    attention = lm.attention(layer)
    batch, length, _ = hidden.shape
    group = head // (fp.n_heads // fp.n_kv_heads)
    q_proj, k_proj, v_proj = lm.qkv_projs(layer)
    q = q_proj(hidden).view(batch, length, fp.n_heads, fp.head_dim)[:, :, head]  # (B, T, D)
    k = k_proj(hidden).view(batch, length, fp.n_kv_heads, fp.head_dim)[:, :, group]  # (B, T, D)
    v = v_proj(hidden).view(batch, length, fp.n_kv_heads, fp.head_dim)[:, :, group]  # (B, T, D)
    if hasattr(attention, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
        q, k = attention.q_norm(q), attention.k_norm(k)
    if rope:
        positions = torch.arange(length, device=hidden.device)[None]
        cos, sin = lm.model.model.rotary_emb(hidden, positions)  # (1, T, D)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scores = (q @ k.transpose(1, 2)).float() * attention.scaling  # (B, T, T)
    future = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (weights.to(v.dtype) @ v)  # (B, T, D)


@torch.no_grad()
def rope_dependence_scores(lm: LoadedModel, probe: Probe, *, noising: bool = False, batch_size: int | None = None,
                           progress: bool = True) -> HeadScores:
    """Score every head by the share of the clean/corrupt gap lost without its RoPE (module docstring).

    The clean run is recorded once (``headscope.patching.common.prepare``); each head's run replays the
    clean prompts from the cached residual at its layer (``PatchEngine.run_from``), with that head's output
    recomputed without rotation, and is normalised like a noising patch.

    Args:
        lm: a RoPE-family model.
        probe: prompt pairs (the clean prompts are run; the corrupt ones set the scale).
        noising: must be False (the measurement is always on the clean run).
        batch_size: prompts per forward (default: the largest that fits).
        progress: show a progress bar over heads.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)``, method ``"rope"``.
    """
    if noising:
        raise HeadscopeError("rope dependence is measured on the clean prompts only; --noising does not apply")
    if problem := rope_unsupported(lm, probe.length):
        raise HeadscopeError(problem)
    # The patched run is the clean run (score = (LD_clean - LD_patched) / gap); the NoPE head changes every
    # position after 0, so no position prefix is shared.
    run = prepare(lm, probe, noising=True, reuse_prefix=False)
    fp = lm.fingerprint
    batcher = AdaptiveBatcher(batch_size or default_batch_size(lm, probe.length))

    def effects(heads: list[Head]) -> torch.Tensor:  # (len(heads),)
        means = torch.zeros(len(heads))
        for i, head in enumerate(tqdm(heads, desc=f"rope {probe.name}", unit="head", disable=not progress)):
            means[i] = batcher.run(run.n_pairs, lambda rows: _nope_metric(run, head.layer, head.head, rows)).mean()
        return means

    means = map_heads(all_heads(fp), effects, replay_cost(fp.n_layers)).view(fp.n_layers, fp.n_heads)
    return run.to_scores(run.normalise(means), "rope", direction="clean")


def _nope_metric(run: ProbeRun, layer: int, head: int, rows: slice) -> torch.Tensor:
    """``(B,)`` logit differences of the clean pairs ``rows`` with ``head`` of ``layer`` attending without RoPE."""
    lm = run.lm
    pairs = torch.arange(run.n_pairs, device=run.base_ids.device)[rows]
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def without_rope(z: torch.Tensor) -> torch.Tensor:  # (B, T, H * D)
        nope = head_output(lm, layer, head, captured["hidden"], rope=False)[:, :, None]  # (B, T, 1, D)
        return write_heads(nope, [head], lm.fingerprint.n_heads)(z)

    with hooked([(lm.attention(layer), "pre_kwargs", keep_input)]):
        return run.engine.run_from(layer, run.clean.resid_pre[layer][pairs], pairs, {layer: without_rope})
