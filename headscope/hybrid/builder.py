"""Build a head-wise hybrid from a pretrained causal LM and a ``HeadMask`` (HydraHead parameter migration).

``build_hybrid(model, mask, config)``:

1. checks the family (Llama, Mistral, Qwen2, Qwen3) and that the mask was made for this model
   (``ModelFingerprint.mismatch``; a mismatch is a ``HeadscopeError`` naming the field);
2. plans every layer (``headscope.hybrid.plan``): FA heads first, grouped by KV group, then GDN heads;
   an all-FA layer stays the pretrained attention when ``plain_full_layers`` (the layer-wise baseline),
   a layer without FA heads is pure GDN;
3. copies the pretrained weights with the permutation applied once: ``q_proj`` rows and ``o_proj``
   columns in head order, ``k_proj``/``v_proj`` rows = the FA KV groups followed by one copy of its
   pretrained KV group per GDN head (channel-wise repetition for GQA), q_norm/k_norm as they are.
   Embeddings, norms, MLPs and the unembedding are copied untouched (same parameter names);
4. initialises the new parts (gate, conv, b/a projections, decay, gamma) as documented in
   ``headscope.hybrid.layer`` from a generator seeded with ``config.init_seed`` (and the layer index).

Baselines use the same builder: a random head mask or a layer-wise mask (``headscope.mask``) at a
given ratio; in a layer-wise mask the all-FA layers become plain attention layers and the others pure
GDN layers through the plan above. ``build_full_attention(model)`` is the pretrained model itself in
hybrid clothing: every layer plain full attention, its parameters the very tensors of ``model``, so it
decodes through the hybrid's static cache, ``kernels/fa_decode`` step and CUDA graph (the original timed
on the hybrid's kernels).

``inert_switches(mask, switches)`` names the switches that change nothing in the hybrid of a mask: the FA
switches act only on head-wise FA heads (an all-FA layer stays the pretrained attention), ``conv_size`` and
``init_seed`` only on GDN heads, ``fusion_norm`` only outside plain layers, ``plain_full_layers`` only where a
layer is all FA.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from headscope.heads import HeadMask, HeadscopeError
from headscope.hybrid.configuration import HybridConfig, family_of
from headscope.hybrid.inference_weights import fuse_for_inference
from headscope.hybrid.modeling import HybridForCausalLM
from headscope.hybrid.plan import LayerPlan
from headscope.models import LoadedModel, load_model

# HybridConfig fields a caller chooses; everything else is filled in from the model and the mask.
SWITCHES = (
    "fa_rope", "log_scaling", "attn_scale", "floor_scale", "output_gate", "gate_bias_init",
    "fusion_norm", "conv_size", "plain_full_layers", "init_seed",
)


def _heads(weight: torch.Tensor, index: list[int], head_dim: int) -> torch.Tensor:
    """Rows of the heads in ``index`` (in that order) of a ``(n·D, ...)`` weight or ``(n·D,)`` bias."""
    per_head = weight.reshape(-1, head_dim, *weight.shape[1:])  # (n, D, ...)
    return per_head[index].reshape(len(index) * head_dim, *weight.shape[1:])


def _columns(weight: torch.Tensor, index: list[int], head_dim: int) -> torch.Tensor:
    """Input columns of the heads in ``index`` of an ``(out, n·D)`` weight."""
    per_head = weight.reshape(weight.shape[0], -1, head_dim)  # (out, n, D)
    return per_head[:, index].reshape(weight.shape[0], len(index) * head_dim)


def migrate_attention(attention: nn.Module, plan: LayerPlan, head_dim: int) -> dict[str, torch.Tensor]:
    """Pretrained attention weights rearranged for a hybrid layer (names relative to ``self_attn``).

    Args:
        attention: the pretrained HF attention module (q_proj, k_proj, v_proj, o_proj[, q_norm, k_norm]).
        plan: the layer's plan (head order, FA KV groups, GDN KV groups).
    Returns:
        ``{name: tensor}`` for q/k/v/o weights and biases and the q/k norms.
    """
    order = list(plan.head_order)
    kv_rows = list(plan.fa_kv_groups) + list(plan.gdn_kv_groups)
    weights: dict[str, torch.Tensor] = {}
    for name, index in (("q_proj", order), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        proj = getattr(attention, name)
        weights[f"{name}.weight"] = _heads(proj.weight.detach(), index, head_dim)
        if proj.bias is not None:
            weights[f"{name}.bias"] = _heads(proj.bias.detach(), index, head_dim)
    weights["o_proj.weight"] = _columns(attention.o_proj.weight.detach(), order, head_dim)
    if attention.o_proj.bias is not None:
        weights["o_proj.bias"] = attention.o_proj.bias.detach()
    for norm in ("q_norm", "k_norm"):
        if hasattr(attention, norm):
            weights[f"{norm}.weight"] = getattr(attention, norm).weight.detach()
    return weights


def hybrid_config_for(lm: LoadedModel, mask: HeadMask, config: HybridConfig | None = None) -> HybridConfig:
    """The ``HybridConfig`` of ``lm`` under ``mask``, with the switches of ``config`` (defaults if None).

    Raises:
        HeadscopeError: unsupported family, or a mask made for another model (names the field).
    """
    family_of(lm.model.config.model_type)
    problem = lm.fingerprint.mismatch(mask.fingerprint)
    if problem is not None:
        raise HeadscopeError(f"the mask does not fit this model: {problem}")
    switches = {name: getattr(config or HybridConfig(), name) for name in SWITCHES}
    return HybridConfig(
        base_config=lm.model.config.to_dict(),
        full_attention_heads=[[h.layer, h.head] for h in mask.heads()],
        mask_fingerprint=mask.fingerprint.to_dict(),
        mask_provenance=dict(mask.provenance),
        **switches,
    )


def loaded(model: nn.Module | LoadedModel) -> LoadedModel:
    """``model`` as a ``LoadedModel``, its train/eval mode left as it was (``load_model`` sets eval)."""
    if isinstance(model, LoadedModel):
        return model
    was_training = model.training
    lm = load_model(model)
    model.train(was_training)
    return lm


def inert_switches(mask: HeadMask, switches: Mapping[str, Any]) -> list[str]:
    """The keys of ``switches`` (``SWITCHES``) that change nothing in the hybrid of ``mask`` built with them (module
    docstring); ``switches`` missing from the mapping take their ``HybridConfig`` defaults."""
    value = lambda name: switches.get(name, getattr(HybridConfig, name))  # noqa: E731
    n_fa = mask.full.sum(dim=1)  # (L,) FA heads per layer
    all_fa, has_gdn = bool((n_fa == mask.full.shape[1]).any()), bool((n_fa < mask.full.shape[1]).any())
    plain = (n_fa == mask.full.shape[1]) & bool(value("plain_full_layers"))  # (L,) layers that stay the pretrained attention
    headwise_fa = bool(((n_fa > 0) & ~plain).any())
    acts = {
        "fa_rope": headwise_fa, "log_scaling": headwise_fa, "output_gate": headwise_fa,
        "attn_scale": headwise_fa and value("log_scaling"), "floor_scale": headwise_fa and value("log_scaling"),
        "gate_bias_init": headwise_fa and value("output_gate"), "fusion_norm": bool((~plain).any()),
        "conv_size": has_gdn, "init_seed": has_gdn, "plain_full_layers": all_fa,
    }
    return [name for name in switches if not acts[name]]


@torch.no_grad()
def build_hybrid(model: nn.Module | LoadedModel, mask: HeadMask, config: HybridConfig | None = None) -> HybridForCausalLM:
    """Turn a pretrained Llama/Mistral/Qwen2/Qwen3 causal LM into a head-wise hybrid.

    Args:
        model: a ``PreTrainedModel`` (or a ``LoadedModel``); it is not modified.
        mask: which heads keep full attention (``HeadMask`` for this model).
        config: a ``HybridConfig`` whose switches (``SWITCHES``) to use; its other fields are ignored.
    Returns:
        ``HybridForCausalLM`` in eval mode, on the model's device and dtype.
    Raises:
        HeadscopeError: unsupported family or a mask for another model.
    """
    lm = loaded(model)
    hconfig = hybrid_config_for(lm, mask, config)
    with torch.device("meta"):  # no random init of tensors that are all loaded below (minutes at 1.7B parameters)
        hybrid = HybridForCausalLM._from_config(hconfig, dtype=lm.dtype)
    hybrid.to_empty(device=lm.device)  # uninitialised storage, every parameter and buffer filled below
    hybrid.tie_weights()  # to_empty gave the tied unembedding a tensor of its own
    head_dim = hconfig.head_dim
    state = {name: t for name, t in lm.model.state_dict().items() if ".self_attn." not in name}
    for l, layer in enumerate(hybrid.model.layers):
        prefix = f"model.layers.{l}.self_attn."
        attention = layer.self_attn
        migrated = migrate_attention(lm.attention(l), hconfig.layer_plan(l), head_dim)
        generator = torch.Generator().manual_seed(hconfig.init_seed * 1_000_003 + l)
        new = attention.new_parameter_values(generator, hconfig.initializer_range)
        state.update({prefix + name: t for name, t in {**migrated, **new}.items()})
    missing, unexpected = hybrid.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (hconfig.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise HeadscopeError(
            f"weight migration mismatch for {lm.fingerprint.architecture}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    persistent = set(hybrid.state_dict())
    unfilled = [name for name, _ in hybrid.named_buffers() if name not in persistent and name not in copy_buffers(lm.model, hybrid)]
    if unfilled:
        raise HeadscopeError(f"build_hybrid: no pretrained value for the buffers {unfilled[:5]} of the {lm.fingerprint.architecture} hybrid")
    if getattr(lm.model, "generation_config", None) is not None:  # its stop tokens and sampling defaults, not config.json's
        hybrid.generation_config = copy.deepcopy(lm.model.generation_config)
    return hybrid.eval()


def copy_buffers(source: nn.Module, target: nn.Module, share: bool = False) -> set[str]:
    """``target``'s buffers that ``source`` has under the same name and shape, as ``source`` holds them: its rotary
    ``inv_freq``, which no state dict carries (non-persistent) and which ``model.to(torch.bfloat16)`` rounds to bf16
    (``from_pretrained(dtype=...)`` keeps it in float32). A fresh float32 table would rotate differently from the
    model at long positions: whole radians apart at 8K-32K tokens (a random Qwen3-1.7B's logits ~3-4 apart).
    ``share``: the very tensors (``build_full_attention``); else copies. Returns the names of ``target``'s buffers set."""
    buffers, copied = dict(source.named_buffers()), set()
    for name, buffer in target.named_buffers():
        if name in buffers and buffers[name].shape == buffer.shape:
            buffer.data = buffers[name].data if share else buffers[name].data.clone()
            copied.add(name)
    return copied


@torch.no_grad()
def build_full_attention(model: nn.Module | LoadedModel) -> HybridForCausalLM:
    """The pretrained model as a ``HybridForCausalLM`` with every head at full attention, sharing its weights.

    Every layer is a plain layer (the pretrained attention's math, heads in pretrained order: the builder's
    parity test), and every parameter is re-pointed at ``model``'s own tensor of the same name, so nothing
    is copied or new: the twin computes what ``model`` computes, through the hybrid's code paths
    (``HybridStaticCache``, the ``kernels/fa_decode`` decode step, CUDA-graph capture).

    Buffers of the same name and shape are shared too (the rotary table, see ``copy_buffers``).

    The twin's projections are fused here (``inference_weights.fuse_for_inference``: q/k/v and the MLP's gate/up
    each one buffer, as its ``generate()`` would make them) and ``model``'s parameters of those names are pointed at
    the same blocks (same values; only where they live changes), so the two still share every tensor.

    The sharing lasts while both keep their tensors: nothing here writes to a parameter, but training the twin
    trains ``model``, and a dtype or device move of either (``.to``, ``.float()``) gives that one new tensors
    and ends the sharing (the other keeps the old ones).

    Args:
        model: a ``PreTrainedModel`` of a supported family (or its ``LoadedModel``); not modified (its
            train/eval mode included).
    Returns:
        ``HybridForCausalLM`` in eval mode, on the model's device and dtype, whose parameters share
        storage with ``model``'s.
    Raises:
        HeadscopeError: unsupported family, or a parameter without a same-shaped twin in ``model``.
    """
    lm = loaded(model)
    fp = lm.fingerprint
    twin = build_hybrid(lm, HeadMask(torch.ones(fp.shape, dtype=torch.bool), fp, {"ratio": "all FA"}), HybridConfig(plain_full_layers=True))
    source = dict(lm.model.named_parameters())
    for name, param in twin.named_parameters():  # tied weights appear once, under their first name, in both
        if name not in source or source[name].shape != param.shape:
            raise HeadscopeError(f"build_full_attention: {name} {tuple(param.shape)} has no twin of that shape in the model")
        param.data = source[name].data
    fuse_for_inference(twin)  # what its generate() would do (copying the fused weights out of the shared storage) ...
    for name, param in twin.named_parameters():
        source[name].data = param.data  # ... so the model's parameters follow into the fused buffers: still shared
    copy_buffers(lm.model, twin, share=True)  # the rotary table too (``copy_buffers``)
    return twin


@torch.no_grad()
def calibrate_gamma(hybrid: HybridForCausalLM, teacher: nn.Module | LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Set each fused head's scale ``gamma`` to the RMS its pretrained head's output has on ``input_ids``.

    With the fusion norm every head leaves the layer at unit RMS times ``gamma``; the pretrained heads'
    outputs (the ``o_proj`` input) have head-specific scales. Setting ``gamma_h`` to head ``h``'s RMS over
    ``input_ids`` (divided by the initial gate value ``sigmoid(gate_bias_init)`` for gated FA heads) starts
    every head at its pretrained magnitude, so ``o_proj`` and the residual stream see familiar scales.
    Optional: stage-1 alignment also learns ``gamma``.

    Args:
        hybrid: a built hybrid of ``teacher``.
        teacher: the pretrained model (or its ``LoadedModel``), unchanged.
        input_ids: ``(B, T)`` calibration tokens.
    Returns:
        ``(n_layers, n_heads)`` float32 RMS per pretrained head (pretrained head order).
    """
    module = teacher.model if isinstance(teacher, LoadedModel) else teacher
    was_training = module.training
    lm = teacher if isinstance(teacher, LoadedModel) else LoadedModel(teacher)  # eval mode while measuring
    fp = lm.fingerprint
    sums = torch.zeros(fp.n_layers, fp.n_heads, dtype=torch.float64)
    counts = torch.zeros(fp.n_layers)

    def recorder(layer: int):
        def hook(module, args):
            heads = args[0].reshape(-1, fp.n_heads, fp.head_dim).double()  # (B·T, H, D)
            sums[layer] += heads.pow(2).mean(-1).sum(0).cpu()
            counts[layer] += heads.shape[0]
        return hook

    handles = [lm.out_proj(l).register_forward_pre_hook(recorder(l)) for l in range(fp.n_layers)]
    try:
        lm.model(input_ids.to(lm.device))
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    rms = (sums / counts[:, None]).sqrt().float()  # (L, H)
    for l, layer in enumerate(hybrid.model.layers):
        attention = layer.self_attn
        if not attention.spec.fusion_norm:
            continue
        order = list(hybrid.config.layer_plan(l).head_order)
        gamma = rms[l, order].clone()
        if attention.spec.gated:
            gamma[: attention.spec.n_fa_heads] /= torch.sigmoid(torch.tensor(attention.spec.gate_bias_init))
        attention.gamma.copy_(gamma.to(attention.gamma))
    return rms
