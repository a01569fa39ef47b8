"""A static cache for the head-wise hybrid, and decode steps captured in a CUDA graph.

``HybridStaticCache(model, batch_size, max_length)`` preallocates, per layer, what a ``DynamicCache``
built from the ``HybridConfig`` grows step by step: the FA heads' keys and values ``(B, Hkv, L, D)`` for
``L = max_length`` tokens, and the GDN heads' conv window ``(B, 3·H·D, K)`` and recurrent state ``(B, H,
D, D)`` float32. Nothing is reallocated afterwards: prefill writes slots ``[n, n + T)``, a decode step
writes slot ``n`` and updates the GDN states in place, where ``n`` = tokens seen so far, kept twice: on
the host (``seen_tokens``, for prefill slicing and bounds checks) and on the device (``seen``, read by the
decode kernels). ``valid`` ``(B, L)`` marks real tokens (the 2D attention mask, written as tokens arrive);
``step_mask`` ``(B,)`` holds the decode token's entry.

Decode (one token per row, ``HybridForCausalLM.forward`` routes it here; ``decode`` zeroes the GDN states
before a one-token prompt and takes the token's padding mask) never reads the device on the host and never
allocates a cache tensor, so one step can be captured: with ``graphed`` (on CUDA), the
first step runs eagerly on a side stream (it also compiles the kernels), the next call captures the step
into a ``torch.cuda.CUDAGraph`` and every later step copies the token ids and positions into the graph's
input buffers and replays it (one launch instead of one per op). The same step runs eagerly with
``graphed=False``, and on CPU, where the layer takes the kernels' float32 references: that is how the
tests check it against the ``DynamicCache`` path. A capture that fails (an op that syncs, say) warns once
and leaves the cache eager.

The cache duck-types what ``generate()`` and the layers ask of a transformers ``Cache``
(``get_seq_length``, ``update``, ``has_previous_state``, ``update_conv_state``, ``update_recurrent_state``,
``is_linear``, ``is_compileable``) so the prefill runs the layers' usual code. Any other forward against the
cache, one token long included (hidden states asked for, labels, autograd on, a one-token prefill chunk of
``HybridModel`` itself), is a prefill chunk: the layers take their prefill path, which starts the GDN heads from
zero states on an empty cache and masks padded tokens, and the decode kernels run only inside ``decode``.
"""

from __future__ import annotations

import warnings

import torch

from headscope.heads import HeadscopeError
from headscope.hybrid.inference_weights import fuse_for_inference


class HybridStaticCache:
    """Preallocated hybrid cache (module docstring).

    Args:
        model: a ``HybridForCausalLM`` (or its ``HybridModel``); shapes, device and dtype come from its layers.
        batch_size: rows.
        max_length: tokens per row the cache can hold (prompt + new tokens).
        graphed: capture decode steps in a CUDA graph (CUDA only).
    """

    is_compileable = False  # generate() must not torch.compile around it: decode graphs are captured here
    is_croppable = False

    def __init__(self, model, batch_size: int, max_length: int, graphed: bool = False) -> None:
        if isinstance(model, torch.nn.Module):  # fused projections before any step is captured (``inference_weights``)
            fuse_for_inference(model)
        backbone = getattr(model, "model", model)
        param = next(backbone.parameters())
        self.device, self.dtype = param.device, param.dtype
        if graphed and self.device.type != "cuda":
            raise HeadscopeError(f"a graphed static cache needs a CUDA model; this one is on {self.device}")
        self.batch_size, self.max_length, self.graphed = batch_size, max_length, graphed
        self.layer_types = list(backbone.config.layer_types)
        self.is_linear = [t == "linear_attention" for t in self.layer_types]
        self.keys, self.values, self.conv_states, self.recurrent_states, self.q_offsets = [], [], [], [], []
        with torch.device(self.device):
            for layer in backbone.layers:
                spec = layer.self_attn.spec
                d = spec.head_dim
                kv = torch.zeros(batch_size, spec.n_fa_kv_heads, max_length, d, dtype=self.dtype) if spec.n_fa_heads else None
                self.keys.append(kv)
                self.values.append(torch.zeros_like(kv) if kv is not None else None)
                offsets = torch.tensor([0, *spec.fa_kv_sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                self.q_offsets.append(offsets if spec.n_fa_heads else None)
                gdn = spec.n_gdn_heads
                self.conv_states.append(torch.zeros(batch_size, 3 * gdn * d, spec.conv_size, dtype=self.dtype) if gdn else None)
                self.recurrent_states.append(torch.zeros(batch_size, gdn, d, d, dtype=torch.float32) if gdn else None)
            self.valid = torch.zeros(batch_size, max_length, dtype=torch.int8)
            self.step_mask = torch.ones(batch_size, dtype=torch.long)
            self.seen = torch.zeros(1, dtype=torch.long)
        self.seen_tokens = 0
        self.decoding = False  # inside ``HybridModel.decode_step``: the layers take the decode kernels
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_io: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ids, positions, logits
        self._warmed_up = False

    # --- what generate() and the layers' prefill code ask of a cache -----------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def has_previous_state(self, layer_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prefill chunk's keys/values ``(B, Hkv, T, D)`` at slots ``[n, n + T)``; return slots ``[0, n + T)``."""
        end = self.seen_tokens + key.shape[2]
        self.keys[layer_idx][:, :, self.seen_tokens : end].copy_(key)
        self.values[layer_idx][:, :, self.seen_tokens : end].copy_(value)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def gdn_states(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The conv window and recurrent state of a GDN layer, or ``(None, None)`` before the first token."""
        if not self.seen_tokens:
            return None, None
        return self.conv_states[layer_idx], self.recurrent_states[layer_idx]

    def update_conv_state(self, conv_state: torch.Tensor, layer_idx: int, **kwargs) -> None:
        if conv_state is not self.conv_states[layer_idx]:  # the layer's prefill writes into the window itself
            self.conv_states[layer_idx].copy_(conv_state)

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, **kwargs) -> None:
        if state is not self.recurrent_states[layer_idx]:  # (likewise the state)
            self.recurrent_states[layer_idx].copy_(state)

    # --- bookkeeping around one forward ------------------------------------------------------------
    def reset(self) -> None:
        """Empty the cache (a new prompt); buffers, and a captured graph, are kept."""
        self.seen.zero_()
        self.seen_tokens = 0

    def check_room(self, n_new: int, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise HeadscopeError(f"the static cache was built for batch {self.batch_size}, not {batch_size}")
        if self.seen_tokens + n_new > self.max_length:
            raise HeadscopeError(
                f"the static cache holds {self.max_length} tokens per row; {self.seen_tokens} + {n_new} do not fit"
            )

    def begin_prefill(self, attention_mask: torch.Tensor | None, length: int) -> None:
        """Record a prefill chunk's padding mask (the last ``length`` columns of ``attention_mask``)."""
        chunk = self.valid[:, self.seen_tokens : self.seen_tokens + length]
        if attention_mask is None:
            chunk.fill_(1)
        else:
            chunk.copy_(attention_mask[:, -length:])

    def end_prefill(self, length: int) -> None:
        self.seen_tokens += length
        self.seen.fill_(self.seen_tokens)

    def begin_decode(self) -> None:
        """Device-only (captured): the decode token's padding mask into ``valid[:, n]``; the layers' one-token calls
        are decode steps (``decoding``) until :meth:`end_decode`."""
        self.valid.index_copy_(1, self.seen, self.step_mask[:, None].to(self.valid.dtype))
        self.decoding = True

    def end_decode(self) -> None:
        """Device-only (captured): one more token seen."""
        self.decoding = False
        self.seen.add_(1)

    # --- decode ------------------------------------------------------------------------------------
    def decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, vocab)`` of one decode step of ``model`` (a ``HybridForCausalLM``), eager or replayed.

        Args:
            input_ids: ``(B, 1)``; attention_mask: ``(B, n + 1)`` or None; position_ids: ``(B or 1, 1)``.
        """
        batch = input_ids.shape[0]
        self.check_room(1, batch)
        if not self.seen_tokens:  # a one-token prompt: the GDN states start from zero, not from a previous prompt
            for t in self.conv_states + self.recurrent_states:
                if t is not None:
                    t.zero_()
        if attention_mask is None:
            self.step_mask.fill_(1)
        else:
            self.step_mask.copy_(attention_mask[:, -1])
        positions = position_ids.expand(batch, 1)
        if self.graphed and self._warmed_up:
            logits = self._replay(model, input_ids, positions)
        elif self.graphed:  # first step: eager on a side stream (kernels compile, cuBLAS settles), then capture next time
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = model.decode_logits(input_ids, positions, self)
            torch.cuda.current_stream(self.device).wait_stream(side)
            logits.record_stream(torch.cuda.current_stream(self.device))  # made on the side stream, used on this one
            self._warmed_up = True
        else:
            logits = model.decode_logits(input_ids, positions, self)
        self.seen_tokens += 1
        return logits

    def _replay(self, model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._graph is None:
            ids, pos = input_ids.clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    logits = model.decode_logits(ids, pos, self)
            except Exception as err:  # noqa: BLE001 -- keep generating, eagerly
                warnings.warn(f"headscope: capturing the hybrid's decode step failed ({type(err).__name__}: {err}); decoding eagerly", stacklevel=3)
                self.graphed = False
                return model.decode_logits(input_ids, positions, self)
            self._graph, self._graph_io = graph, (ids, pos, logits)
        ids, pos, logits = self._graph_io
        ids.copy_(input_ids)
        pos.copy_(positions)
        self._graph.replay()
        return logits
