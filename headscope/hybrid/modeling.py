"""Hugging Face citizenship of the head-wise hybrid: ``HybridConfig`` and ``HybridForCausalLM``.

All ``PreTrainedConfig`` / Auto-class registration lives here. After ``import headscope.hybrid``,
``AutoConfig`` knows ``model_type = "headscope_hybrid"`` and ``AutoModelForCausalLM.from_pretrained(dir)``
loads a saved hybrid.

``HybridConfig`` carries the pretrained model's config as a dict (``base_config``), the head mask
(``full_attention_heads`` as ``[layer, head]`` pairs in pretrained head indices), the per-layer
permutation (``head_order``) and the layer switches. Everything else is derived from those:
``layer_types`` (the ``transformers`` cache layer types, so ``DynamicCache(config=...)`` — what
``generate()`` builds — holds a KV cache only for the FA heads and conv + recurrent states only for the
GDN heads) and the mirrored sizes (``vocab_size``, ``hidden_size`` ...).

``HybridForCausalLM`` reuses the base family's embedding, RMSNorm, MLP and rotary classes (Llama,
Mistral, Qwen2, Qwen3), with parameter names identical to the pretrained checkpoint except inside
``self_attn``. Its forward takes a 2D ``attention_mask`` (1 = real token; left padding is exact for
the GDN heads, see ``HeadwiseHybridAttention._gated_delta``).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from headscope.heads import HeadscopeError
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.hybrid.plan import LayerPlan, plan_layer

# transformers 5.24 renamed ``past_key_values`` to ``cache`` (the forward keyword ``generate()`` passes and
# the output field); the forwards take both names and the outputs use the installed version's field.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def one_cache(cache: DynamicCache | None, past_key_values: DynamicCache | None) -> DynamicCache | None:
    """The cache passed under either name; a ValueError when both are given."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as cache or as past_key_values, not both")
    return cache if cache is not None else past_key_values


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families."""

    prefix: str  # class-name prefix in transformers.models.<type>.modeling_<type>
    qkv_bias: str | bool  # config attribute naming the q/k/v bias, or a constant
    o_bias: str | bool
    qk_norm: bool  # per-head q_norm/k_norm (Qwen3)


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "attention_bias", "attention_bias", False),
    "mistral": Family("Mistral", False, False, False),
    "qwen2": Family("Qwen2", True, False, False),
    "qwen3": Family("Qwen3", "attention_bias", "attention_bias", True),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise HeadscopeError(f"cannot build a hybrid of a {model_type!r} model; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def _flag(config: PreTrainedConfig, value: str | bool) -> bool:
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


def family_class(model_type: str, part: str) -> type:
    """``<Prefix><part>`` (``MLP``, ``RMSNorm``, ``RotaryEmbedding``) of the family's modeling module."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, family_of(model_type).prefix + part)


@strict
class HybridConfig(PreTrainedConfig):
    """Config of a head-wise hybrid.

    Filled by the builder: ``base_config`` (pretrained config dict), ``full_attention_heads`` (``[layer,
    head]`` pairs, pretrained indices), ``head_order`` (per layer, pretrained head at each position),
    ``mask_fingerprint``/``mask_provenance`` (where the mask came from). Switches (the caller's choice;
    their effect is documented in ``headscope.hybrid.layer``):

    * ``fa_rope`` (False): keep RoPE on FA heads; ``log_scaling`` (True), ``attn_scale`` (0.1),
      ``floor_scale`` (8192): the FA query scale ``1 + attn_scale·log(floor((pos+1)/floor_scale) + 1)``;
    * ``output_gate`` (True), ``gate_bias_init`` (4.0): sigmoid output gate on FA heads;
    * ``fusion_norm`` (True): per-head RMSNorm and learned scale gamma before ``o_proj``;
    * ``conv_size`` (4): GDN short convolution; ``plain_full_layers`` (True): an all-FA layer stays the
      pretrained attention; ``init_seed`` (0): seed of the new parameters.

    Derived: ``layer_types`` (cache layout) and the sizes mirrored from ``base_config``.
    """

    model_type = "headscope_hybrid"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    base_config: dict | None = None
    full_attention_heads: list | None = None
    head_order: list | None = None
    mask_fingerprint: dict | None = None
    mask_provenance: dict | None = None
    fa_rope: bool = False
    log_scaling: bool = True
    attn_scale: int | float = 0.1
    floor_scale: int | float = 8192.0
    output_gate: bool = True
    gate_bias_init: int | float = 4.0
    fusion_norm: bool = True
    conv_size: int = 4
    plain_full_layers: bool = True
    init_seed: int = 0
    # derived from base_config and the mask in __post_init__
    layer_types: list[str] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    initializer_range: int | float = 0.02
    rms_norm_eps: int | float = 1e-6
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.base_config is not None:
            base = self.base
            family_of(base.model_type)
            self.vocab_size, self.hidden_size = base.vocab_size, base.hidden_size
            self.num_hidden_layers = base.num_hidden_layers
            self.num_attention_heads = base.num_attention_heads
            self.num_key_value_heads = base.num_key_value_heads or base.num_attention_heads
            self.head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
            self.max_position_embeddings = base.max_position_embeddings
            self.initializer_range, self.rms_norm_eps = base.initializer_range, base.rms_norm_eps
            self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
            self.pad_token_id, self.bos_token_id, self.eos_token_id = base.pad_token_id, base.bos_token_id, base.eos_token_id
            if self.full_attention_heads is not None:
                plans = [self.layer_plan(l) for l in range(self.num_hidden_layers)]
                self.head_order = [list(p.head_order) for p in plans]
                self.layer_types = [p.cache_type for p in plans]
        super().__post_init__(**kwargs)

    @property
    def base(self) -> PreTrainedConfig:
        """The pretrained model's config object."""
        model_type = self.base_config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise HeadscopeError(f"base_config has unknown model_type {model_type!r}")
        return CONFIG_MAPPING[model_type].from_dict(dict(self.base_config))

    def full_mask(self) -> torch.Tensor:
        """``(n_layers, n_heads)`` bool: True where a head is FA."""
        full = torch.zeros(self.num_hidden_layers, self.num_attention_heads, dtype=torch.bool, device="cpu")
        for layer, head in self.full_attention_heads:
            if not (0 <= layer < full.shape[0] and 0 <= head < full.shape[1]):
                raise HeadscopeError(f"full_attention_heads names [{layer}, {head}] outside {tuple(full.shape)}")
            full[layer, head] = True
        return full

    def layer_plan(self, layer: int) -> LayerPlan:
        row = self.full_mask()[layer].tolist()
        group = self.num_attention_heads // self.num_key_value_heads
        stored = self.head_order[layer] if self.head_order is not None else None
        return plan_layer(row, group, stored, self.plain_full_layers, layer)

    def layer_spec(self, layer: int) -> HybridLayerSpec:
        """The ``HybridLayerSpec`` of ``layer`` (plain layers keep the pretrained attention's math)."""
        base, plan = self.base, self.layer_plan(layer)
        family = family_of(base.model_type)
        plain = plan.kind == "full"
        base_types = getattr(base, "layer_types", None)
        sliding = base_types[layer] == "sliding_attention" if base_types else getattr(base, "sliding_window", None) is not None
        return HybridLayerSpec(
            hidden_size=self.hidden_size,
            head_dim=self.head_dim,
            n_fa_heads=plan.n_fa,
            n_gdn_heads=len(plan.head_order) - plan.n_fa,
            fa_kv_sizes=plan.fa_kv_sizes,
            qkv_bias=_flag(base, family.qkv_bias),
            o_bias=_flag(base, family.o_bias),
            qk_norm=family.qk_norm,
            rms_norm_eps=self.rms_norm_eps,
            fa_rope=self.fa_rope or plain,
            log_scaling=self.log_scaling and not plain,
            attn_scale=float(self.attn_scale),
            floor_scale=float(self.floor_scale),
            output_gate=self.output_gate and not plain,
            gate_bias_init=float(self.gate_bias_init),
            fusion_norm=self.fusion_norm and not plain,
            conv_size=self.conv_size,
            sliding_window=base.sliding_window if sliding else None,
        )


class HybridDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block: the base family's norms and MLP around ``HeadwiseHybridAttention``."""

    def __init__(self, config: HybridConfig, base: PreTrainedConfig, layer_idx: int) -> None:
        super().__init__()
        norm = family_class(base.model_type, "RMSNorm")
        self.self_attn = HeadwiseHybridAttention(config.layer_spec(layer_idx), layer_idx)
        self.mlp = family_class(base.model_type, "MLP")(base)
        self.input_layernorm = norm(base.hidden_size, eps=base.rms_norm_eps)
        self.post_attention_layernorm = norm(base.hidden_size, eps=base.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, position_ids, past_key_values=None, padding_mask=None, **kwargs):
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, position_ids, past_key_values, padding_mask)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HeadwiseHybridAttention):
            module.init_new_parameters(initializer_range=self.config.initializer_range)


class HybridModel(HybridPreTrainedModel):
    """Embedding, hybrid decoder layers, final norm and the base family's rotary embedding."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        base = config.base
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, base.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, base, i) for i in range(base.num_hidden_layers))
        self.norm = family_class(base.model_type, "RMSNorm")(base.hidden_size, eps=base.rms_norm_eps)
        self.rotary_emb = family_class(base.model_type, "RotaryEmbedding")(config=base)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args as in HF causal LMs (``past_key_values``: the pre-5.24 name of ``cache``); ``attention_mask``
        must be 2D ``(B, past + T)`` or None."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        past_key_values = one_cache(cache, past_key_values)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        seq = hidden.shape[1]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise HeadscopeError(f"HybridForCausalLM takes a 2D attention_mask, got shape {tuple(attention_mask.shape)}")
        padding_mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            position_ids = self._positions(attention_mask, past_key_values, seq, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, position_ids, past_key_values, padding_mask)
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )

    def _positions(self, attention_mask, cache, seq: int, device) -> torch.Tensor:
        """``(B, T)`` positions: from the mask's running count (left padding) or after the cached tokens."""
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:]
        past = 0
        if cache is not None and any(t != "linear_attention" for t in self.config.layer_types):
            past = cache.get_seq_length()
        elif cache is not None and cache.has_previous_state():
            raise HeadscopeError("a hybrid without FA heads cannot infer positions from its cache; pass attention_mask or position_ids")
        return torch.arange(past, past + seq, device=device)[None]


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """The head-wise hybrid causal LM (``generate()`` uses a ``DynamicCache`` built from the config)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """Keep ``generate()``'s 2D mask as it is: the hybrid builds its own masks."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(B, T, vocab)`` (last ``logits_to_keep`` positions if > 0) and the loss if ``labels``; the
        cache comes back as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})


AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
