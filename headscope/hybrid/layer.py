"""``HeadwiseHybridAttention``: full-attention (FA) heads and Gated DeltaNet (GDN) heads in one layer.

Head layout (fixed once by the builder, never gathered at run time): the layer's query heads are ordered
FA heads first, then GDN heads. ``q_proj`` rows, ``k_proj``/``v_proj`` rows and ``o_proj`` columns follow
that order; ``head_order[p]`` (in the config) names the pretrained head at position ``p``.

* ``q_proj``: ``H·D`` rows, FA heads then GDN heads.
* ``k_proj``/``v_proj``: ``(n_fa_kv + n_gdn)·D`` rows: the FA KV heads (pretrained KV groups that hold
  FA heads; ``fa_kv_sizes[j]`` FA query heads use KV head ``j``), then one key/value head per GDN head
  (MHA-like; initialised by repeating the pretrained KV group's rows).
* ``o_proj``: ``H·D`` input columns in the same head order.

FA branch: optional q_norm/k_norm (Qwen3; ``project`` applies both, to all heads, with
``headscope.kernels.qk_norm.ops.qk_rms_norm``: one Triton launch at inference on CUDA); RoPE only if
``fa_rope`` (the HydraHead FA heads are NoPE); queries times ``log_position_scale`` if ``log_scaling``;
causal SDPA with grouped KV (at CUDA inference up to 8K queries one launch of ``kernels/fa_prefill`` for all FA
heads, ``causal_attention(direct=True)``); the KV cache holds only the FA KV heads. Output gate (``output_gate``):
``sigmoid(gate_proj(x))`` per head and channel, ``gate_proj`` initialised with zero weight and bias
``gate_bias_init`` (4.0: sigmoid = 0.982, close to the identity while the gate's gradient, ∝ s(1 − s),
stays 18x larger than at bias 8).

GDN branch (fla's GatedDeltaNet recipe): q/k/v (after q_norm/k_norm, as in the pretrained pipeline) ->
causal depthwise conv over the ``C = 3·n_gdn·D`` channels of ``cat(q, k, v)`` (kernel ``conv_size``,
initialised to the identity: last tap 1) + SiLU -> RoPE on q, k -> L2 norm of q, k. The four steps are
one call, ``headscope.kernels.gdn_prep.ops.short_conv_rope_l2norm``: at inference on CUDA one Triton pass
that reads the strided q/k/v slices of the projections once and writes q, k, v once (no ``cat``); with
autograd or on CPU the composition (cat, fla's ``causal_conv1d`` / torch conv, the fused RoPE + L2 norm).
Padded positions get a zero conv input (the call's ``input_mask``). ``beta = sigmoid(b_proj(x))``;
``g = -exp(A_log)·softplus(a_proj(x) + dt_bias)`` (A ~ U(0, 16), dt log-uniform in [1e-3, 0.1]), then the
delta rule with scale 1/sqrt(D): ``headscope.kernels.gdn.ops.gated_delta_rule_from_logits`` takes the two
logits (short CUDA prefill computes the gates inside its first kernel); with grad mode off both come out of
one product over the stacked ``[a_proj; b_proj]`` rows, which on CUDA the prep kernel computes in its own launch
(``short_conv_rope_l2norm_and_logits``), and the conv taps go in the prep kernel's layout
(:mod:`headscope.hybrid.inference_weights`). The
cache holds the conv window ``(B, C, K)`` (the last K inputs) and the recurrent state ``(B, n_gdn, D, D)`` fp32.

Fusion (``fusion_norm``): every head's output is RMS-normalised, scaled by a learned ``gamma_h``
(init 1) and, for FA heads, gated: ``headscope.kernels.epilogue.ops.head_epilogue``, given the FA and GDN
outputs as a pair (read in place on CUDA: never concatenated). Without ``fusion_norm`` the gate (if any)
multiplies the raw FA output and nothing else changes.

With ``fa_rope`` on, every other switch off and every head FA, the layer is the pretrained attention (parity test).

``forward = o_proj(core(x, *project(x)))``: ``project`` holds the big input projections, ``core`` the
rest (both branches and the fusion; what ``benchmarks/hybrid_speed.py`` times as the attention core). On
CUDA without autograd the two branches can run on two streams (``branches.run_branches``; ``overlap_branches =
"auto"``: while a CUDA graph is captured, and from ``OVERLAP_MIN_TOKENS`` tokens, where prefill at 64K-128K gained
7-9%; shorter eager calls lose host time, ``benchmarks/results/hybrid_speed.md``).

Inside a ``HybridStaticCache``'s decode step (``cache.decoding``) a call is one token per row (cache write, log
scaling, conv window, delta rule, states in place, no host synchronisation; what ``headscope.hybrid.static_cache``
captures in a CUDA graph) into one output: ``kernels/fa_decode`` for FA heads only, ``kernels/gdn_decode`` for GDN heads only,
``kernels/hybrid_decode`` for both (two launches, as many as the FA heads alone take); the arguments and the call
live in :mod:`headscope.hybrid.decode_step`.

``HybridModel`` computes the FA query scale once per forward and passes it to every layer (``query_scale``),
and exactly 1.0 (no multiply) when every position it made is below ``floor_scale - 1``, where the scale is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from headscope.hybrid.branches import run_branches, should_overlap
from headscope.hybrid.decode_step import static_decode_step
from headscope.hybrid.functional import apply_rope, causal_attention, fa_segments, gdn_decay_init, log_position_scale
from headscope.hybrid.inference_weights import InferenceWeights, split_gdn_logits
from headscope.hybrid.static_cache import HybridStaticCache
from headscope.kernels.epilogue.ops import head_epilogue
from headscope.kernels.gdn.ops import gated_delta_rule_from_logits
from headscope.kernels.gdn_prep.ops import short_conv_rope_l2norm, short_conv_rope_l2norm_and_logits
from headscope.kernels.qk_norm.naive import head_rms_norm_reference
from headscope.kernels.qk_norm.ops import qk_rms_norm


@dataclass(frozen=True)
class HybridLayerSpec:
    """Shape and switches of one hybrid attention layer (see the module docstring)."""

    hidden_size: int
    head_dim: int
    n_fa_heads: int
    n_gdn_heads: int
    fa_kv_sizes: tuple[int, ...]  # FA query heads per FA KV head, in head order
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    fa_rope: bool = False
    log_scaling: bool = True
    attn_scale: float = 0.1
    floor_scale: float = 8192.0
    output_gate: bool = True
    gate_bias_init: float = 4.0
    fusion_norm: bool = True
    conv_size: int = 4
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if sum(self.fa_kv_sizes) != self.n_fa_heads or any(s < 1 for s in self.fa_kv_sizes):
            raise ValueError(f"fa_kv_sizes {self.fa_kv_sizes} must be positive and sum to n_fa_heads={self.n_fa_heads}")
        if self.n_fa_heads + self.n_gdn_heads < 1:
            raise ValueError("a layer needs at least one head")

    @property
    def n_heads(self) -> int:
        return self.n_fa_heads + self.n_gdn_heads

    @property
    def n_fa_kv_heads(self) -> int:
        return len(self.fa_kv_sizes)

    @property
    def gated(self) -> bool:
        return self.output_gate and self.n_fa_heads > 0


def previous_states(cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The conv window ``(B, C, K)`` and recurrent state ``(B, H, Dk, Dv)`` a cache holds for a GDN layer,
    or ``(None, None)`` before its first step (the cache-layer API of transformers 5.17 and later)."""
    if isinstance(cache, HybridStaticCache):
        return cache.gdn_states(layer_idx)
    if cache is None or not cache.has_previous_state(layer_idx):
        return None, None
    slot = cache.layers[layer_idx]
    return slot.conv_states[0], slot.recurrent_states[0]


class HeadRMSNorm(nn.Module):
    """RMSNorm over ``head_dim`` with a weight, computed in float32 (Qwen3's q_norm/k_norm, same ops)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_rms_norm_reference(x, self.weight, self.variance_epsilon)


class HeadwiseHybridAttention(nn.Module):
    """FA heads and GDN heads side by side, fused before ``o_proj``.

    Args:
        spec: the layer's ``HybridLayerSpec``.
        layer_idx: index of the layer in the model (its cache slot).
    """

    # On CUDA without autograd, run the GDN branch on a side stream while the FA branch runs on the
    # current one (``run_branches``): True, False or "auto" (``should_overlap``); a run-time switch, not
    # part of the saved config.
    overlap_branches: bool | str = "auto"
    # Without overlap, enqueue the GDN branch first (its long sequential scan starts earlier; same kernels and
    # results): a run-time switch, ``benchmarks/gdn_prefill_speed.py``'s path ``hybrid_gdn_first``.
    gdn_first: bool = False

    def __init__(self, spec: HybridLayerSpec, layer_idx: int) -> None:
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        d, hidden = spec.head_dim, spec.hidden_size
        n_kv_rows = (spec.n_fa_kv_heads + spec.n_gdn_heads) * d
        self.q_proj = nn.Linear(hidden, spec.n_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_rows, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_rows, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.n_heads * d, hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = HeadRMSNorm(d, spec.rms_norm_eps)
            self.k_norm = HeadRMSNorm(d, spec.rms_norm_eps)
        if spec.gated:
            self.gate_proj = nn.Linear(hidden, spec.n_fa_heads * d, bias=True)
        if spec.n_gdn_heads:
            channels = 3 * spec.n_gdn_heads * d
            self.conv1d = nn.Conv1d(channels, channels, spec.conv_size, groups=channels, bias=False)
            self.b_proj = nn.Linear(hidden, spec.n_gdn_heads, bias=False)
            self.a_proj = nn.Linear(hidden, spec.n_gdn_heads, bias=False)
            self.A_log = nn.Parameter(torch.zeros(spec.n_gdn_heads))
            self.dt_bias = nn.Parameter(torch.zeros(spec.n_gdn_heads))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        if spec.fusion_norm:
            self.gamma = nn.Parameter(torch.ones(spec.n_heads))
        self.segments = fa_segments(spec.fa_kv_sizes)
        self.inference_weights = InferenceWeights()  # weight layouts of the no-grad path, not parameters
        self.init_new_parameters()

    def new_parameter_values(self, generator: torch.Generator | None = None, initializer_range: float = 0.02) -> dict[str, torch.Tensor]:
        """Initial values of the parts the pretrained model does not have, by parameter name.

        gate: zero weight, bias ``gate_bias_init``; conv: identity (last tap 1); b_proj/a_proj: normal
        (std ``initializer_range``); A_log/dt_bias: fla's init; gamma: ones. CPU float32 tensors.
        """
        spec, values = self.spec, {}
        if spec.gated:
            values["gate_proj.weight"] = torch.zeros(self.gate_proj.weight.shape)
            values["gate_proj.bias"] = torch.full(self.gate_proj.bias.shape, spec.gate_bias_init)
        if spec.n_gdn_heads:
            identity = torch.zeros(self.conv1d.weight.shape)  # (C, 1, K)
            identity[..., -1] = 1.0
            values["conv1d.weight"] = identity
            for name in ("b_proj", "a_proj"):
                shape = getattr(self, name).weight.shape
                values[f"{name}.weight"] = torch.randn(shape, generator=generator) * initializer_range
            values["A_log"], values["dt_bias"] = gdn_decay_init(spec.n_gdn_heads, generator)
        if spec.fusion_norm:
            values["gamma"] = torch.ones(spec.n_heads)
        return values

    @torch.no_grad()
    def init_new_parameters(self, generator: torch.Generator | None = None, initializer_range: float = 0.02) -> None:
        """Set the new parts to ``new_parameter_values`` (through ``transformers.initialization``, which
        leaves tensors already loaded from a checkpoint alone)."""
        params = dict(self.named_parameters())
        for name, value in self.new_parameter_values(generator, initializer_range).items():
            init.copy_(params[name], value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        past_key_values=None,
        padding_mask: torch.Tensor | None = None,
        query_scale: torch.Tensor | float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """One attention layer: ``o_proj(core(x, *project(x)))``.

        Args:
            hidden_states: ``(B, T, hidden)`` normalised layer input.
            position_embeddings: ``(cos, sin)``, each ``(B, T, D)``, from the base model's rotary module.
            position_ids: ``(B, T)`` absolute positions.
            past_key_values: a ``transformers.DynamicCache`` built from the ``HybridConfig`` (its layer
                types give this layer a KV slot if it has FA heads, conv + recurrent states if GDN), or None.
            padding_mask: ``(B, past + T)`` 1 for real tokens, or None when nothing is padded.
            query_scale: ``(B, T)`` ``log_position_scale`` of ``position_ids``, or one float for every position
                (``HybridModel`` passes 1.0 when it knows every position is below ``floor_scale - 1``), or
                None (computed here).
        Returns:
            ``(B, T, hidden)``.
        """
        batch, seq, _ = hidden_states.shape
        o = self.core(hidden_states, *self.project(hidden_states), position_embeddings, position_ids, past_key_values, padding_mask, query_scale)
        return self.o_proj(o.reshape(batch, seq, -1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The big input projections: q ``(B, T, H, D)``, k and v ``(B, T, n_fa_kv + n_gdn, D)`` (after
        q_norm/k_norm when the family has them) and the FA gate logits ``(B, T, n_fa, D)`` or None."""
        spec, d = self.spec, self.spec.head_dim
        batch, seq, _ = x.shape
        linears = self.projection_linears()
        fused = None if torch.is_grad_enabled() else self.inference_weights.fused_linears("projections", linears)
        if fused is not None:  # one GEMM (``fuse_inference_weights``); q, k, v (and the gate) are strided views of its output
            outputs = F.linear(x, *fused).split_with_sizes([linear.out_features for linear in linears], dim=-1)
        else:
            outputs = [linear(x) for linear in linears]
        q = outputs[0].view(batch, seq, spec.n_heads, d)
        k = outputs[1].view(batch, seq, -1, d)
        v = outputs[2].view(batch, seq, -1, d)
        if spec.qk_norm:  # both norms in one Triton launch at inference on CUDA
            q, k = qk_rms_norm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon)
        gate = outputs[3].view(batch, seq, spec.n_fa_heads, d) if spec.gated else None
        return q, k, v, gate

    def projection_linears(self) -> tuple[nn.Linear, ...]:
        """q_proj, k_proj, v_proj and, when the FA heads are gated, gate_proj: what ``project`` multiplies x by."""
        modules = self._modules  # (not four ``nn.Module.__getattr__`` calls: this runs at every projection)
        if self.spec.gated:
            return modules["q_proj"], modules["k_proj"], modules["v_proj"], modules["gate_proj"]
        return modules["q_proj"], modules["k_proj"], modules["v_proj"]

    def fuse_inference_weights(self) -> bool:
        """Make the four (three) projections one GEMM at inference from now on (``inference_weights.fused_linears``:
        their weights become blocks of one buffer, no copy kept); whether they are. ``fuse_for_inference`` calls it."""
        return self.inference_weights.fused_linears("projections", self.projection_linears(), create=True) is not None

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to()``, ``.half()``...), then the fused buffer dropped if the move gave the
        projections new tensors (else it would keep the old copy alive)."""
        module = super()._apply(fn, recurse)
        self.inference_weights.release_stale("projections", self.projection_linears())
        return module

    def core(self, x, q, k, v, gate, position_embeddings, position_ids, cache=None, padding_mask=None, query_scale=None) -> torch.Tensor:
        """Everything between the projections and ``o_proj``: both branches and the fusion.

        Args:
            x: ``(B, T, hidden)`` layer input (for the GDN's small beta/decay projections).
            q, k, v, gate: from ``project``.
        Returns:
            ``(B, T, H, D)`` fused per-head outputs in head order (the ``o_proj`` input).
        """
        spec = self.spec
        seq = x.shape[1]
        if isinstance(cache, HybridStaticCache) and cache.decoding:  # a decode step: both branches write into one output
            o = static_decode_step(self, x, q, k, v, gate, position_embeddings, position_ids, cache)  # (B, 1, H, D)
            if spec.fusion_norm:  # each branch's kernel applied the epilogue to its heads
                return o
            parts = (o,)
        else:
            q_fa, q_gdn = q.split_with_sizes((spec.n_fa_heads, spec.n_gdn_heads), dim=2)  # split_with_sizes: no Python wrapper
            k_fa, k_gdn = k.split_with_sizes((spec.n_fa_kv_heads, spec.n_gdn_heads), dim=2)
            v_fa, v_gdn = v.split_with_sizes((spec.n_fa_kv_heads, spec.n_gdn_heads), dim=2)
            step_mask = padding_mask[:, -seq:] if padding_mask is not None else None
            branches = []
            if spec.n_fa_heads:
                branches.append(lambda: self._full_attention(q_fa, k_fa, v_fa, position_embeddings, position_ids, cache, padding_mask, query_scale))
            if spec.n_gdn_heads:
                branches.append(lambda: self._gated_delta(x, q_gdn, k_gdn, v_gdn, position_embeddings, cache, step_mask))
            parts = tuple(run_branches(branches, should_overlap(self.overlap_branches, x), self.gdn_first))  # (B, T, n_fa, D), (B, T, n_gdn, D)
        if spec.fusion_norm:  # both parts read in place: no concatenation on the Triton path
            return head_epilogue(parts if len(parts) == 2 else parts[0], self.gamma, gate, check=False)
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, T, H, D)
        if gate is not None:
            return torch.cat((o[:, :, : spec.n_fa_heads] * torch.sigmoid(gate), o[:, :, spec.n_fa_heads :]), dim=2)
        return o

    def _full_attention(self, q, k, v, position_embeddings, position_ids, cache, padding_mask, query_scale=None) -> torch.Tensor:
        """FA heads: ``(B, T, n_fa, D)`` from q ``(B, T, n_fa, D)`` and k, v ``(B, T, n_fa_kv, D)``."""
        spec = self.spec
        if spec.fa_rope:
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if spec.log_scaling:
            if query_scale is None:
                query_scale = log_position_scale(position_ids, spec.attn_scale, spec.floor_scale)
            if isinstance(query_scale, torch.Tensor):
                q = q * query_scale[:, :, None, None].to(q.dtype)
            elif query_scale != 1.0:
                q = q * query_scale
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, past + T, D)
        return causal_attention(  # direct flash in a hybrid layer (a few FA heads beside GDN heads: host-bound)
            q, k, v, self.segments, scale=spec.head_dim**-0.5, padding_mask=padding_mask, sliding_window=spec.sliding_window,
            direct=spec.n_gdn_heads > 0,
        )

    def _gated_delta(self, x, q, k, v, position_embeddings, cache, step_mask) -> torch.Tensor:
        """GDN heads: ``(B, T, n_gdn, D)`` from the layer input ``x`` and q, k, v ``(B, T, n_gdn, D)``.

        Padded positions (``step_mask`` 0) are made no-ops: zero conv input, ``beta = 0`` (no write) and
        ``g = 0`` (no decay), so a left-padded row carries exactly the state of its unpadded twin.
        """
        spec = self.spec
        conv_state, state = previous_states(cache, self.layer_idx)
        cos, sin = position_embeddings
        inference = not torch.is_grad_enabled()  # the cached weight layouts (``inference_weights``)
        taps = self.inference_weights.conv_taps(self.conv1d.weight) if inference else self.conv1d.weight.squeeze(1)
        # a static cache's window and state are written in place by the kernels (no copies into the cache)
        conv_out, state_out = ((cache.conv_states[self.layer_idx], cache.recurrent_states[self.layer_idx])
                               if isinstance(cache, HybridStaticCache) else (None, None))
        prep = dict(conv_state=conv_state, input_mask=step_mask, output_conv_state=cache is not None, conv_state_out=conv_out)
        if inference:  # the gate logits of the stacked [a; b] rows in the prep kernel's launch on CUDA
            logit_weight = self.inference_weights.gdn_logit_weight(self.a_proj, self.b_proj)
            q, k, v, conv_state, logits = short_conv_rope_l2norm_and_logits(q, k, v, taps, cos, sin, x, logit_weight, **prep)
            a, b = split_gdn_logits(logits, spec.n_gdn_heads)  # (B, T, n_gdn) each
        else:
            q, k, v, conv_state = short_conv_rope_l2norm(q, k, v, taps, cos, sin, **prep)  # each (B, T, n_gdn, D); conv_state (B, C, K)
            a, b = self.a_proj(x), self.b_proj(x)
        o, state = gated_delta_rule_from_logits(  # beta = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias)
            q, k, v, a, b, self.A_log, self.dt_bias, input_mask=step_mask, scale=spec.head_dim**-0.5,
            initial_state=state, output_final_state=cache is not None, final_state=state_out,
            check=False,  # q, k, v, mask checked by the prep call
        )
        if cache is not None:
            cache.update_conv_state(conv_state, self.layer_idx, conv_kernel_size=spec.conv_size)
            cache.update_recurrent_state(state, self.layer_idx)
        return o
