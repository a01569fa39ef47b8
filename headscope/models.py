"""Model access: one table of where each supported architecture keeps its per-head attention output.

headscope patches heads at the input of the attention output projection (``o_proj`` / ``c_proj``):
that input is the concatenation of every query head's attention output, ``(B, T, n_heads * head_dim)``,
so head ``h`` owns the slice ``[h * head_dim, (h + 1) * head_dim)``. This is the same place as
TransformerLens' ``hook_z``. The table below says, per Hugging Face ``model_type``, where the decoder
layers, that projection, the q/k/v projections, the final norm and the unembedding live, and how to read
n_heads / n_kv_heads / head_dim from the config (Qwen3's head_dim is not hidden_size / n_heads).

A model is used with whatever attention implementation it was loaded with (sdpa by default); nothing
here requires eager attention.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headscope.heads import HeadscopeError, ModelFingerprint, read_json

HYBRID_MODEL_TYPE = "headscope_hybrid"  # HybridConfig.model_type (headscope.hybrid.configuration)


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its parts (dotted attribute paths)."""

    layers: str  # from the *ForCausalLM root to the ModuleList of decoder layers
    attention: str  # from a decoder layer to its attention module
    out_proj: str  # from the attention module to the output projection (input = per-head outputs)
    qkv: tuple[str, ...]  # from the attention module: (q, k, v) projections, or one fused projection
    final_norm: str  # from the root to the final norm before the unembedding
    unembed: str  # from the root to the unembedding Linear
    n_heads: str  # config attribute names
    n_kv_heads: str | None  # None: multi-head attention (n_kv_heads = n_heads)
    max_positions: str


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attention="self_attn",
    out_proj="o_proj",
    qkv=("q_proj", "k_proj", "v_proj"),
    final_norm="model.norm",
    unembed="lm_head",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    max_positions="max_position_embeddings",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": ArchSpec(
        layers="transformer.h",
        attention="attn",
        out_proj="c_proj",
        qkv=("c_attn",),
        final_norm="transformer.ln_f",
        unembed="lm_head",
        n_heads="n_head",
        n_kv_heads=None,
        max_positions="n_positions",
    ),
}


def _get(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def arch_spec(model_type: str) -> ArchSpec:
    """The table entry for ``model_type``, or a ``HeadscopeError`` naming the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise HeadscopeError(
            f"unknown architecture {model_type!r}; headscope supports {', '.join(sorted(ARCHITECTURES))}"
        ) from None


class LoadedModel:
    """A causal LM, its tokenizer and the architecture facts headscope needs.

    Attributes:
        model: the ``PreTrainedModel`` (eval mode).
        tokenizer: a Hugging Face tokenizer, or None for id-only use.
        spec: the ``ArchSpec`` of its family.
        fingerprint: ``ModelFingerprint`` (architecture, layers, heads, kv heads, head_dim, name).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str = "") -> None:
        config = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = arch_spec(getattr(config, "model_type", type(config).__name__))
        n_heads = int(getattr(config, self.spec.n_heads))
        n_kv = int(getattr(config, self.spec.n_kv_heads)) if self.spec.n_kv_heads else n_heads
        n_kv = n_kv or n_heads
        hidden = int(getattr(config, "hidden_size", getattr(config, "n_embd", 0)))
        head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
        self.fingerprint = ModelFingerprint(
            architecture=config.model_type,
            n_layers=len(self.layers),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            name=name or str(getattr(config, "_name_or_path", "")),
        )

    # --- parts -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.spec.layers)

    def attention(self, layer: int) -> nn.Module:
        return _get(self.layers[layer], self.spec.attention)

    def out_proj(self, layer: int) -> nn.Module:
        """The projection whose *input* is the per-head attention output of ``layer``."""
        return _get(self.attention(layer), self.spec.out_proj)

    def qkv_projs(self, layer: int) -> tuple[nn.Module, ...]:
        return tuple(_get(self.attention(layer), p) for p in self.spec.qkv)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return _get(self.model, self.spec.unembed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int | None:
        value = getattr(self.model.config, self.spec.max_positions, None)
        return int(value) if value else None

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", "eager"))

    def set_attn_implementation(self, name: str) -> None:
        """Switch the attention kernel ("sdpa" or "eager") in place."""
        self.model.set_attn_implementation(name)

    def logit_direction(self, answer: torch.Tensor, wrong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unembedding difference for a logit-difference metric.

        Args:
            answer, wrong: ``(N,)`` token ids.
        Returns:
            ``(N, d_model)`` rows ``W_U[answer] - W_U[wrong]`` and ``(N,)`` bias difference (zeros
            when the unembedding has no bias).
        """
        weight = self.unembed.weight  # (vocab, d_model)
        direction = weight[answer] - weight[wrong]
        bias = getattr(self.unembed, "bias", None)
        offset = bias[answer] - bias[wrong] if bias is not None else torch.zeros_like(direction[:, 0])
        return direction, offset

    def head_slice(self, head: int) -> slice:
        d = self.fingerprint.head_dim
        return slice(head * d, (head + 1) * d)


def read_config(path: str | os.PathLike) -> Any:
    """The ``AutoConfig`` of a local model directory, without reading its weights.

    Raises:
        HeadscopeError: no config.json, a config.json that is not valid JSON or that transformers cannot
            read, an architecture headscope does not support, or a headscope hybrid (``headscope build``
            output: use the pretrained model it was built from).
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HeadscopeError(f"{path} is not a Hugging Face model directory (no config.json)")
    raw = read_json(path / "config.json", "model config")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == HYBRID_MODEL_TYPE:
        source = (raw.get("mask_fingerprint") or {}).get("name") or "its pretrained model"
        raise HeadscopeError(f"{path} is a head-wise hybrid built by headscope; its heads are already split into full "
                             f"attention and Gated DeltaNet: use the pretrained model it was built from ({source})")
    arch_spec(str(model_type))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HeadscopeError(f"cannot read {path / 'config.json'}: {str(err).strip().splitlines()[0]}") from None


def load_model(
    source: str | os.PathLike | nn.Module,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a local Hugging Face causal-LM directory or ``.gguf`` file, or wrap an in-memory model.

    Args:
        source: a directory with config.json, weights and (optionally) a tokenizer; a ``.gguf`` file
            (dequantised, see ``headscope.checkpoints``; ``headscope models convert`` makes a directory
            of it that loads much faster); or a ``PreTrainedModel`` already in memory (then
            ``tokenizer`` may be passed alongside).
        tokenizer: tokenizer for an in-memory model; loaded from the directory otherwise.
        dtype, device: where and how to hold the weights (directories only).
        attn_implementation: "sdpa" (default) or "eager".
    Returns:
        A ``LoadedModel``.
    Raises:
        HeadscopeError: missing directory, unsupported architecture, unreadable config.
    """
    if isinstance(source, nn.Module):
        return LoadedModel(source, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf":
        from headscope.checkpoints import load_gguf

        model, gguf_tokenizer = load_gguf(path, dtype=dtype)
        arch_spec(model.config.model_type)
        model.set_attn_implementation(attn_implementation)
        return LoadedModel(model.to(device), tokenizer or gguf_tokenizer, name=path.stem)
    read_config(path)  # a bad config.json or an unknown architecture fails before any weights are read
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    ).to(device)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return LoadedModel(model, tokenizer, name=path.name)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (then only the kept positions go through the output head)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def weights_digest(model: nn.Module, n_bytes: int = 1 << 16) -> str:
    """A short digest of the first bytes of every parameter: tells two checkpoints apart cheaply."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().flatten()[: n_bytes // 4].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
