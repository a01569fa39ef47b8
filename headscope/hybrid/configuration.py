"""``HybridConfig``: the configuration of a head-wise hybrid, and how a saved hybrid finds its code.

Kept apart from ``headscope.hybrid.modeling`` so that reading a hybrid's config costs no model code: this
module needs only transformers' config classes. Importing it registers ``HybridConfig`` with
``AutoConfig``; ``headscope.registration`` imports it as soon as transformers loads its Auto tables.

``HybridConfig`` carries the pretrained model's config as a dict (``base_config``), the head mask
(``full_attention_heads`` as ``[layer, head]`` pairs in pretrained head indices), the per-layer
permutation (``head_order``) and the layer switches. Everything else is derived from those:
``layer_types`` (the ``transformers`` cache layer types, so ``DynamicCache(config=...)`` — what
``generate()`` builds — holds a KV cache only for the FA heads and conv + recurrent states only for the
GDN heads) and the mirrored sizes (``vocab_size``, ``hidden_size`` ...).

A saved hybrid loads three ways: after ``import headscope`` (the Auto classes know ``headscope_hybrid``),
after ``import headscope.hybrid``, or with ``trust_remote_code=True`` and no import at all:
``save_pretrained`` writes ``auto_map`` into config.json and a two-line ``headscope_hybrid.py`` beside it
that imports these classes from the installed headscope (no model code is copied).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from headscope.heads import HeadscopeError, write_text_atomic
from headscope.hybrid.plan import LayerPlan, plan_layer
from headscope.models import HYBRID_MODEL_TYPE

if TYPE_CHECKING:
    from headscope.hybrid.layer import HybridLayerSpec

# The loader file save_pretrained writes beside config.json, and the auto_map pointing into it.
LOADER_MODULE = "headscope_hybrid"
LOADER_SOURCE = '''"""Loads this head-wise hybrid with trust_remote_code=True; the code is the installed headscope package."""
from headscope.hybrid.configuration import HybridConfig
from headscope.hybrid.modeling import HybridForCausalLM
'''
AUTO_MAP = {"AutoConfig": f"{LOADER_MODULE}.HybridConfig", "AutoModelForCausalLM": f"{LOADER_MODULE}.HybridForCausalLM"}
# base-model fields a hybrid's config may change after the build (resize_token_embeddings, stop tokens, ...)
EDITABLE = ("vocab_size", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
            "pad_token_id", "bos_token_id", "eos_token_id")


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

    model_type = HYBRID_MODEL_TYPE
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
    # derived from base_config and the mask in __post_init__ (those in EDITABLE: from base_config when not given)
    layer_types: list[str] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    initializer_range: int | float | None = None
    rms_norm_eps: int | float | None = None
    tie_word_embeddings: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.base_config is not None:
            # a value set here (a saved config, one edited since the build, a vocabulary resized) wins over the
            # pretrained model's: the layers are built from ``base``, so it goes there first
            given = {name: getattr(self, name) for name in EDITABLE if getattr(self, name) is not None}
            self.base_config = {**self.base_config, **given}
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
        # A config about to become a model: make sure AutoModelForCausalLM knows the hybrid (headscope.registration).
        importlib.import_module("headscope.hybrid.modeling")

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
        from headscope.hybrid.layer import HybridLayerSpec  # the layer module loads the kernels

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

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """``PreTrainedConfig.save_pretrained`` plus ``auto_map`` and the loader file (module docstring)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(save_directory) / f"{LOADER_MODULE}.py", LOADER_SOURCE)
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """A no-op: transformers would copy this module into every saved directory; the loader file replaces that."""


AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
