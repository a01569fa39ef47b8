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

import torch
from tqdm.auto import tqdm

from headscope.heads import HeadScores, HeadscopeError
from headscope.models import LoadedModel
from headscope.probes.base import Probe

ROPE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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


def _check(lm: LoadedModel, probe: Probe) -> None:
    if lm.fingerprint.architecture not in ROPE_ARCHITECTURES:
        raise HeadscopeError(f"rope dependence needs a RoPE model ({', '.join(ROPE_ARCHITECTURES)}); "
                             f"{lm.fingerprint.architecture} has no rotary position embedding")
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < probe.length:
        raise HeadscopeError(f"rope dependence recomputes full causal attention, but the model uses a sliding "
                             f"window of {window} tokens, shorter than the probe ({probe.length})")


@torch.no_grad()
def _mean_logit_diff(lm: LoadedModel, ids: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for start in range(0, ids.shape[0], batch_size):
        last = lm.model(input_ids=ids[start : start + batch_size]).logits[:, -1].float()  # (b, V)
        rows = torch.arange(last.shape[0], device=last.device)
        total += float((last[rows, answer[start : start + batch_size]] - last[rows, wrong[start : start + batch_size]]).sum())
    return total / ids.shape[0]


@torch.no_grad()
def rope_dependence_scores(lm: LoadedModel, probe: Probe, *, noising: bool = False, batch_size: int | None = None,
                           progress: bool = True) -> HeadScores:
    """Score every head by the share of the clean/corrupt gap lost without its RoPE (module docstring).

    Args:
        lm: a RoPE-family model.
        probe: prompt pairs (the clean prompts are run; the corrupt ones set the scale).
        noising: must be False (the measurement is always on the clean run).
        batch_size: prompts per forward (default: all).
        progress: show a progress bar over heads.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)``, method ``"rope"``.
    """
    if noising:
        raise HeadscopeError("rope dependence is measured on the clean prompts only; --noising does not apply")
    _check(lm, probe)
    probe.check_fits(lm.max_context, getattr(lm.model.config, "vocab_size", None))
    tensors = probe.tensors(lm.device)
    clean, answer, wrong = tensors["clean"], tensors["answer"], tensors["wrong"]  # (N, T), (N,), (N,)
    size = batch_size or clean.shape[0]
    ld_clean = _mean_logit_diff(lm, clean, answer, wrong, size)
    ld_corrupt = _mean_logit_diff(lm, tensors["corrupt"], answer, wrong, size)
    gap = ld_clean - ld_corrupt
    if abs(gap) < 1e-6:
        raise HeadscopeError(f"probe {probe.name}: the model's logit difference is the same on clean and corrupt "
                             f"prompts (gap {gap:.2e}), so there is no scale for the scores")
    fp = lm.fingerprint
    values = torch.zeros(fp.n_layers, fp.n_heads)
    bar = tqdm(total=fp.n_layers * fp.n_heads, desc=f"rope {probe.name}", unit="head", disable=not progress, leave=False)
    for layer in range(fp.n_layers):
        for head in range(fp.n_heads):
            values[layer, head] = (ld_clean - _nope_logit_diff(lm, layer, head, clean, answer, wrong, size)) / gap
            bar.update(1)
    bar.close()
    return HeadScores(
        values=values, probe=probe.name, method="rope", fingerprint=fp, capability=probe.capability,
        meta={"n_pairs": clean.shape[0], "length": probe.length, "direction": "clean", "ld_clean": ld_clean,
              "ld_corrupt": ld_corrupt, "dtype": str(lm.dtype)},
    )


def _nope_logit_diff(lm: LoadedModel, layer: int, head: int, ids: torch.Tensor, answer: torch.Tensor,
                     wrong: torch.Tensor, batch_size: int) -> float:
    """Mean logit difference with ``head`` of ``layer`` attending without RoPE (hooks removed on exit)."""
    captured: dict[str, torch.Tensor] = {}
    columns = lm.head_slice(head)

    def keep_input(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def replace_head(module, args):
        (z,) = args  # (B, T, n_heads * head_dim)
        z = z.clone()
        z[..., columns] = head_output(lm, layer, head, captured["hidden"], rope=False)
        return (z,)

    handles = [lm.attention(layer).register_forward_pre_hook(keep_input, with_kwargs=True),
               lm.out_proj(layer).register_forward_pre_hook(replace_head)]
    try:
        return _mean_logit_diff(lm, ids, answer, wrong, batch_size)
    finally:
        for handle in handles:
            handle.remove()
