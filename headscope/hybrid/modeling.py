"""Hugging Face modeling of the head-wise hybrid: ``HybridForCausalLM`` and its decoder layers.

Importing this module registers ``HybridForCausalLM`` with ``AutoModelForCausalLM`` (model_type
``"headscope_hybrid"``); creating a ``HybridConfig`` (``headscope.hybrid.configuration``) imports it, and
``import headscope`` registers the config with ``AutoConfig`` (``headscope.registration``).

``HybridForCausalLM`` reuses the base family's embedding, RMSNorm, MLP and rotary classes (Llama,
Mistral, Qwen2, Qwen3), with parameter names identical to the pretrained checkpoint except inside
``self_attn``. Its forward takes a 2D ``attention_mask`` (1 = real token; left padding is exact for
the GDN heads, see ``HeadwiseHybridAttention._gated_delta``).
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import activations
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

import headscope.kernels.rms_norm.ops as norm_ops
import headscope.kernels.swiglu.ops as swiglu_ops
from headscope.heads import HeadscopeError
from headscope.hybrid.configuration import HybridConfig, family_of
from headscope.hybrid.functional import model_query_scale
from headscope.hybrid.inference_weights import InferenceWeights, untouched
from headscope.hybrid.layer import HeadwiseHybridAttention
from headscope.hybrid.static_cache import HybridStaticCache

# transformers 5.24 renamed ``past_key_values`` to ``cache`` (the forward keyword ``generate()`` passes and
# the output field); the forwards take both names and the outputs use the installed version's field.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def one_cache(cache: DynamicCache | None, past_key_values: DynamicCache | None) -> DynamicCache | None:
    """The cache passed under either name; a ValueError when both are given."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as cache or as past_key_values, not both")
    return cache if cache is not None else past_key_values


def family_class(model_type: str, part: str) -> type:
    """``<Prefix><part>`` (``MLP``, ``RMSNorm``, ``RotaryEmbedding``) of the family's modeling module."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, family_of(model_type).prefix + part)


SILU = (nn.SiLU, *((activations.SiLUActivation,) if hasattr(activations, "SiLUActivation") else ()))


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(residual + x), residual + x)`` (``x`` itself without a residual) for a family ``RMSNorm`` module.

    At inference on CUDA, when nothing watches or wraps ``norm`` (``untouched``), one launch of ``kernels/rms_norm``
    (the families' norms are all ``w * rmsnorm(h)`` in float32, the kernel's math; eager torch takes nine launches,
    which a captured decode step pays 57 times at 28 layers); elsewhere the ``+`` and the module call.
    """
    if norm_ops.use_triton(x, residual, norm.weight) and untouched(norm):
        return norm_ops.add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    h = x if residual is None else residual + x
    return norm(h), h


def silu_mlp(mlp: nn.Module) -> bool:
    """A family MLP ``gated_mlp`` may compute itself: a SiLU activation, nothing hooking or wrapping it or the MLP."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, SILU) and untouched(mlp, act)


def gate_up(mlp: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The MLP's gate_proj and up_proj, what ``fused_linears("mlp", ...)`` fuses (read from ``_modules``: this runs at
    every no-grad forward of a block)."""
    return mlp._modules["gate_proj"], mlp._modules["up_proj"]


def gated_mlp(mlp: nn.Module, x: torch.Tensor, weights: InferenceWeights | None = None) -> torch.Tensor:
    """``mlp(x)`` for a family MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: at CUDA inference, for a
    ``silu_mlp``, the activation and product in one launch of ``kernels/swiglu``; on the CPU or with autograd the
    same calls in torch; the module call itself otherwise. Without autograd, once the block's ``weights`` fused
    gate_proj and up_proj (``HybridDecoderLayer.fuse_inference_weights``), they are one GEMM and the activation
    reads its two halves in place."""
    if silu_mlp(mlp):
        linears = gate_up(mlp)
        fused = None if weights is None or torch.is_grad_enabled() else weights.fused_linears("mlp", linears)
        if fused is not None:
            gate, up = F.linear(x, *fused).split_with_sizes([linear.out_features for linear in linears], dim=-1)
        else:
            gate, up = (linear(x) for linear in linears)
        if swiglu_ops.use_triton(gate, up):
            return mlp.down_proj(swiglu_ops.swiglu(gate, up))
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return mlp(x)


class HybridDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block: the base family's norms and MLP around ``HeadwiseHybridAttention`` (at CUDA
    inference the residual add and each norm in one launch, ``add_norm``, and the MLP's activation, ``gated_mlp``)."""

    def __init__(self, config: HybridConfig, base: PreTrainedConfig, layer_idx: int) -> None:
        super().__init__()
        norm = family_class(base.model_type, "RMSNorm")
        self.self_attn = HeadwiseHybridAttention(config.layer_spec(layer_idx), layer_idx)
        self.mlp = family_class(base.model_type, "MLP")(base)
        self.input_layernorm = norm(base.hidden_size, eps=base.rms_norm_eps)
        self.post_attention_layernorm = norm(base.hidden_size, eps=base.rms_norm_eps)
        self.inference_weights = InferenceWeights()  # the MLP's fused gate/up weight (no-grad path), not a parameter

    def forward(self, hidden_states, position_embeddings, position_ids, past_key_values=None, padding_mask=None, query_scale=None, **kwargs):
        normed, _ = add_norm(self.input_layernorm, hidden_states, None)
        attn = self.self_attn(normed, position_embeddings, position_ids, past_key_values, padding_mask, query_scale)
        normed, hidden_states = add_norm(self.post_attention_layernorm, attn, hidden_states)  # hidden_states + attn
        return hidden_states + gated_mlp(self.mlp, normed, self.inference_weights)

    def fuse_inference_weights(self) -> bool:
        """Make the MLP's gate_proj and up_proj one GEMM at inference from now on (``fuse_for_inference`` calls it);
        whether they are (True for an MLP ``gated_mlp`` hands to the module: nothing to fuse)."""
        if not silu_mlp(self.mlp):
            return True
        return self.inference_weights.fused_linears("mlp", gate_up(self.mlp), create=True) is not None

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply``, then the MLP's fused buffer dropped if the move gave its weights new tensors."""
        module = super()._apply(fn, recurse)
        if "gate_proj" in self.mlp._modules and "up_proj" in self.mlp._modules:
            self.inference_weights.release_stale("mlp", gate_up(self.mlp))
        return module


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

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """A no-op, as ``HybridConfig.register_for_auto_class``: a saved hybrid finds its code through its loader file."""


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
        last_position = None  # the largest position, when known on the host (positions made here)
        if position_ids is None:
            position_ids, last_position = self._positions(attention_mask, past_key_values, seq, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        query_scale = self._query_scale(position_ids, last_position, hidden.dtype)
        static = isinstance(past_key_values, HybridStaticCache)
        if static:
            past_key_values.check_room(seq, hidden.shape[0])
            past_key_values.begin_prefill(attention_mask, seq)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, position_ids, past_key_values, padding_mask, query_scale)
            if all_hidden is not None:
                all_hidden.append(hidden)
        if static:
            past_key_values.end_prefill(seq)
        hidden, _ = add_norm(self.norm, hidden, None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )

    def _query_scale(self, position_ids: torch.Tensor, last_position: int | None, dtype: torch.dtype) -> torch.Tensor | float | None:
        """The FA query scale every log-scaled layer uses (the same switches for all), once per forward
        (``model_query_scale``: 1.0 while the positions made here stay below ``floor_scale - 1``, which
        spares every layer its multiply; ``log_position_scale`` is 1 up to position 8190 by default)."""
        if not any(layer.self_attn.spec.log_scaling and layer.self_attn.spec.n_fa_heads for layer in self.layers):
            return None
        return model_query_scale(position_ids, last_position, float(self.config.attn_scale), float(self.config.floor_scale), dtype)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: HybridStaticCache) -> torch.Tensor:
        """Final hidden states ``(B, 1, C)`` of one token per row against a static cache: device work only, no
        host synchronisation (what ``HybridStaticCache`` captures in a CUDA graph).

        Args:
            input_ids: ``(B, 1)``; position_ids: ``(B, 1)``; the token's padding mask is ``cache.step_mask``.
        """
        hidden = self.embed_tokens(input_ids)  # (B, 1, C)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        cache.begin_decode()
        try:
            for layer in self.layers:
                hidden = layer(hidden, position_embeddings, position_ids, cache, None)
        finally:
            cache.decoding = False  # (end_decode too: also when a layer raised)
        cache.end_decode()
        return add_norm(self.norm, hidden, None)[0]

    def _positions(self, attention_mask, cache, seq: int, device) -> tuple[torch.Tensor, int]:
        """``(B, T)`` positions: from the mask's running count (left padding) or after the cached tokens; and
        an upper bound on them known on the host (the mask's length - 1, or the last position)."""
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:], attention_mask.shape[1] - 1
        past = 0
        # a DynamicCache counts tokens only in its attention slots: ask the first layer that has one (layer 0 may be
        # pure GDN, whose linear-attention slot's get_seq_length is no token count)
        kv_layer = next((i for i, t in enumerate(self.config.layer_types) if t != "linear_attention"), None)
        if isinstance(cache, HybridStaticCache) or (cache is not None and kv_layer is not None):
            past = cache.get_seq_length(kv_layer or 0)
        elif cache is not None and cache.has_previous_state():
            raise HeadscopeError("a hybrid without FA heads cannot infer positions from its cache; pass attention_mask or position_ids")
        return torch.arange(past, past + seq, device=device)[None], past + seq - 1


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """The head-wise hybrid causal LM (``generate()`` uses a ``DynamicCache`` built from the config)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # generate()'s default decode path (see ``generate``); a run-time switch, not part of the saved config
    decode_mode: str = "auto"

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
        cache comes back as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier). One token per
        row against a ``HybridStaticCache`` is a decode step (``HybridStaticCache.decode``: eager, or a
        CUDA-graph replay)."""
        cache = one_cache(cache, past_key_values)
        if (
            isinstance(cache, HybridStaticCache) and input_ids is not None and input_ids.shape[1] == 1
            and labels is None and not output_hidden_states and not torch.is_grad_enabled()
        ):
            if position_ids is None and attention_mask is not None:  # the last entry of the mask's running count
                position_ids = (attention_mask.sum(-1, keepdim=True) - 1).clamp_min(0)
            elif position_ids is None:
                position_ids = self.model._positions(None, cache, 1, input_ids.device)[0]
            logits = cache.decode(self, input_ids, attention_mask, position_ids)
            return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    def decode_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: HybridStaticCache) -> torch.Tensor:
        """``(B, 1, vocab)`` logits of ``HybridModel.decode_step`` (device work only: capturable)."""
        return self.lm_head(self.model.decode_step(input_ids, position_ids, cache))

    def generate(self, inputs=None, *args, decode_mode: str | None = None, **kwargs):
        """``GenerationMixin.generate`` with a static hybrid cache and CUDA-graph decode steps where they apply.

        ``decode_mode`` (default ``self.decode_mode``, "auto"): "graph" (``HybridStaticCache`` + one captured
        CUDA graph per step), "static" (the same cache, eager steps), "dynamic" (transformers'
        ``DynamicCache``, eager: the reference) or "auto" ("graph" on CUDA, "dynamic" on CPU). Beam search,
        several sequences per prompt, assisted decoding or a cache passed in take the dynamic path
        (``headscope.hybrid.generation``, which picks the cache once transformers has settled the call's settings).
        """
        from headscope.hybrid.generation import check_mode

        mode = decode_mode or self.decode_mode
        check_mode(self, mode)  # a bad mode before any work
        outer, self._generate_decode_mode = getattr(self, "_generate_decode_mode", None), mode
        try:
            return super().generate(inputs, *args, **kwargs)
        finally:
            self._generate_decode_mode = outer

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int):
        """transformers' hook for the cache of a ``generate()`` call, its settings settled: the static hybrid cache
        where ``headscope.hybrid.generation`` says it serves, else transformers' own choice."""
        from headscope.hybrid.generation import static_cache_for_generate

        mode = getattr(self, "_generate_decode_mode", None) or self.decode_mode
        cache = static_cache_for_generate(self, generation_config, model_kwargs, generation_mode, batch_size, mode)
        if cache is None:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        model_kwargs[CACHE_FIELD] = cache


AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
