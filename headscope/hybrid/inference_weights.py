"""The hybrid layer's weights in the layouts its inference kernels read: built once, kept until a parameter changes.

Why: at batch 1 and a few thousand tokens the layer's attention core is bound by the host, not the GPU (H200,
``benchmarks/results/gdn_prefill_speed.md``: 0.57 ms to enqueue the core at 4K against 0.42 ms of GPU work),
and two of its launches only rearranged weights or split one product in two:

* ``gdn_logit_weight``: ``cat(a_proj.weight, b_proj.weight)`` ``(2·n_gdn, hidden)``, so the decay and beta logits
  come out of one product instead of two skinny GEMMs (``(B·T, hidden) x (hidden, n_gdn)``, each of which cuBLAS
  runs as a split-K GEMM plus a reduction). The stacked rows are padded with zero rows to a multiple of
  ``LOGIT_ROWS_MULTIPLE`` (28 -> 32 for 14 GDN heads): with 28 output columns (56-byte rows in bf16) cuBLAS took a
  2-byte-aligned kernel plus a split-K reduction on the H200 (2 launches, ~80 us of host time). The layer hands it
  to the GDN prep kernel, which computes the logits in the same launch
  (``kernels.gdn_prep.ops.short_conv_rope_l2norm_and_logits``; ``F.linear`` off that path); a and b are strided
  views of the padded output (:func:`split_gdn_logits`; the GDN kernels take strides);
* ``conv_taps``: the depthwise conv weight ``(C, 1, K)`` as a ``(C, K)`` view of a channel-contiguous ``(K, C)``
  tensor, the layout the GDN prep kernel reads (``kernels/gdn_prep``), which otherwise copies the taps at
  every call (one launch and one allocation);
* ``fused_linears``: one ``(sum of out_features, in)`` weight whose row blocks *are* several projections' weights
  (q, k, v and the FA gate of a hybrid layer; gate and up of its MLP), so their products are one GEMM: at 4K-token
  prefill on the H200 box each ``F.linear`` call cost ~38 us of host time under cProfile, and a captured decode
  step launches one kernel per projection per layer. It costs no memory: :func:`fuse_for_inference` (which
  ``generate()``, ``HybridStaticCache`` and ``build_full_attention`` call) copies the weights into one buffer, and
  the biases into another (a zero block where a projection has none), and points each ``Linear.weight`` and
  ``bias`` at its block (``weight.data = block``: the same ``Parameter`` objects, so optimizers,
  ``load_state_dict`` (in place) and ``save_pretrained`` (which clones such disjoint views) keep working, and an
  in-place update of a weight or bias is an update of the buffer, which a captured decode step reads). A forward
  uses the buffers while every weight and bias still sits at its block's address (``_still_blocks``) and falls
  back to the module calls once one was replaced (``.data = ...``, ``load_state_dict(assign=True)``) until the
  next ``fuse_for_inference``; a dtype or device move drops the buffers (the layers' ``_apply``), a deep copy
  starts without them. Forwards never fuse by themselves: a training loop's no-grad
  evaluation must not move parameters under a wrapper that manages their storage (FSDP2 re-allocates and frees its
  unsharded parameters' storage around every forward; re-pointed, they trained differently, caught by
  ``tests/test_transfer_distributed.py``). Only for plain ``nn.Linear`` modules nothing hooks or wraps
  (``untouched``: a hook or a LoRA wrapper sees the module call), weights of one dtype and device, each owning its
  storage (or in the previous buffer: never a view of someone else's, nor a DTensor), not inference tensors, not
  under ``torch.compile`` tracing, not while a CUDA graph is being captured, and never in a model holding FSDP
  modules.

A derived entry (the first two) is rebuilt when one of its parameters changes: it keeps the storage of the parameters it was made from
(so no other tensor can take their addresses) and their version counters, so a parameter replaced (``.to()``,
loading into new tensors, ``p.data = ...``) or written in place (an optimizer step, ``copy_`` under ``no_grad``,
``load_state_dict``) is seen at the next call. Writes through ``p.data`` bypass the version counter and are not:
call :meth:`InferenceWeights.clear` after them. The layer uses these only with grad mode off (the results carry
no gradient); under ``torch.compile`` tracing (which cannot follow data pointers) and for parameters that are
inference tensors (made under ``torch.inference_mode``: no version counter) they are derived at every call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


LOGIT_ROWS_MULTIPLE = 16  # rows of the stacked GDN logit weight: 32-byte output rows in bf16 (module docstring)


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of ``LOGIT_ROWS_MULTIPLE``."""
    return -(-n // LOGIT_ROWS_MULTIPLE) * LOGIT_ROWS_MULTIPLE


def stacked_logit_weight(a_weight: torch.Tensor, b_weight: torch.Tensor) -> torch.Tensor:
    """``[a_weight; b_weight]`` ``(n_a + n_b, hidden)`` with zero rows after them up to ``padded_rows``."""
    rows = a_weight.shape[0] + b_weight.shape[0]
    return torch.cat((a_weight, b_weight, a_weight.new_zeros(padded_rows(rows) - rows, a_weight.shape[1])))


def untouched(*modules: nn.Module) -> bool:
    """Nothing watches or wraps these modules: no forward hooks, no ``forward`` set on the instance (as
    accelerate's offloading and tracing tools do), so a fused kernel may stand in for their calls."""
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules)


def split_gdn_logits(logits: torch.Tensor, n_gdn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` ``(B, T, n_gdn)``: views of the logits ``(B, T, R)`` of the stacked rows (the padding dropped)."""
    rows = logits.shape[-1]
    sizes = (n_gdn, n_gdn, rows - 2 * n_gdn) if rows > 2 * n_gdn else (n_gdn, n_gdn)
    return logits.split_with_sizes(sizes, dim=-1)[:2]


class InferenceWeights:
    """Tensors derived from a layer's parameters, cached by the parameters' storage and version."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._fused: dict[str, tuple] = {}  # name -> (weight buffer, bias buffer or None, which linears have a bias)

    def __deepcopy__(self, memo) -> "InferenceWeights":
        """An empty cache: a deep copy's parameters are clones (``Parameter.__deepcopy__``), not views of copied
        buffers, so nothing here would describe them (and a copy of the buffers would only take memory)."""
        return InferenceWeights()

    def clear(self) -> None:
        """Forget every entry (after writing a parameter through ``.data``, which leaves no trace)."""
        self._entries.clear()
        self._fused.clear()

    def derived(self, name: str, make: Callable[..., torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """``make(*sources)``, computed again only when one of ``sources`` was replaced or written since."""
        if torch.compiler.is_compiling() or any(s.is_inference() for s in sources):
            return make(*sources)
        key = tuple((s.data_ptr(), s._version) for s in sources)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = self._entries[name] = (key, tuple(s.detach() for s in sources), make(*sources))
        return entry[2]

    def gdn_logit_weight(self, a_proj: nn.Linear, b_proj: nn.Linear) -> torch.Tensor:
        """The cached rows ``[a_proj; b_proj; zeros]`` ``(padded_rows(n_a + n_b), hidden)`` (bias-free projections)."""
        return self.derived("gdn_logits", stacked_logit_weight, a_proj.weight, b_proj.weight)

    def conv_taps(self, conv_weight: torch.Tensor) -> torch.Tensor:
        """``(C, K)`` taps of a ``(C, 1, K)`` depthwise conv weight, stored channel-contiguous (strides ``(1, C)``)."""
        return self.derived("conv_taps", lambda w: w.squeeze(1).t().contiguous().t(), conv_weight)

    def fused_linears(self, name: str, linears: Sequence[nn.Linear], create: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, bias)`` of the linears' outputs concatenated: buffers whose row blocks are their weights and
        biases (module docstring; zeros where a linear has no bias, None when none has one); None where the module
        calls must run. ``create``: fuse them now if they are not (``fuse_for_inference``; a forward passes False)."""
        if torch.compiler.is_compiling() or not untouched(*linears) or any(type(linear) is not nn.Linear for linear in linears):
            return None  # (checked at every call: a hook or wrapper added later sees its module call)
        entry = self._fused.get(name)
        if entry is None or not _still_blocks(entry, linears):
            entry = self._fuse(name, linears, entry) if create else None
        return None if entry is None else (entry[0], entry[1])

    def release_stale(self, name: str, linears: Sequence[nn.Linear]) -> None:
        """Drop the entry (and free its buffers, unless a tensor still views them) once its blocks are no longer
        the linears' tensors: after a dtype or device move, which gives every parameter a new tensor."""
        entry = self._fused.get(name)
        if entry is not None and not _still_blocks(entry, linears):
            del self._fused[name]

    def _fuse(self, name: str, linears: Sequence[nn.Linear], old: tuple | None) -> tuple | None:
        """Copy the weights (and biases) into one new buffer each and point each at its block; None where they
        cannot share one (module docstring). ``old``: the entry they were fused into before (its buffers are ours
        to copy out of: one weight replaced leaves the others views of them)."""
        weights, biases = [linear.weight for linear in linears], [linear.bias for linear in linears]
        first = weights[0]
        if first.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        ours = {t.untyped_storage().data_ptr() for t in (old or ())[:2] if t is not None}
        for t in weights + [b for b in biases if b is not None]:
            if type(t.data) is not torch.Tensor or t.dtype != first.dtype or t.device != first.device or t.is_meta or t.is_inference():
                return None  # (a DTensor, FSDP's or tensor parallelism's, is not a plain tensor)
            storage = t.untyped_storage()
            owns = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
            if not t.is_contiguous() or not (owns or storage.data_ptr() in ours):
                return None  # a view of a storage that is not its own nor ours (FSDP's flat parameters): not ours to move
        if any(w.dim() != 2 or w.shape[1] != first.shape[1] for w in weights):
            return None
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])  # (sum of rows, in)
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach() if b is not None else first.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])  # (rows,)
            row = 0
            for w, b in zip(weights, biases):
                w.data = weight[row : row + w.shape[0]]
                if b is not None:
                    b.data = bias[row : row + w.shape[0]]
                row += w.shape[0]
        entry = self._fused[name] = (weight, bias, tuple(b is not None for b in biases))
        return entry


def _still_blocks(entry: tuple, linears: Sequence[nn.Linear]) -> bool:
    """Whether each linear's weight (and bias) is still its block of the entry's buffers: at the block's address,
    in the buffer's dtype, with a bias exactly where it had one. The buffers are alive while the entry is, so no
    other tensor can sit at those addresses (tensors assigned from elsewhere fail). Read through ``_parameters`` (``linear.weight`` goes through
    ``nn.Module.__getattr__``): this runs at every no-grad projection."""
    weight, bias, had_bias = entry
    if len(linears) != len(had_bias):
        return False
    w_at, b_at, size = weight.data_ptr(), bias.data_ptr() if bias is not None else 0, weight.element_size()
    for linear, had in zip(linears, had_bias):
        params = linear._parameters
        w, b = params["weight"], params.get("bias")
        if w is None or w.data_ptr() != w_at or w.dtype != weight.dtype or (b is not None) != had:
            return False
        if b is not None and (b.data_ptr() != b_at or b.dtype != bias.dtype):
            return False
        w_at += w.numel() * size
        b_at += w.shape[0] * size
    return w_at == weight.data_ptr() + weight.numel() * size


def fuse_for_inference(model: nn.Module) -> bool:
    """Fuse the projections of every module of ``model`` that offers it (``fuse_inference_weights``: the hybrid's
    attention and decoder layers), so that weight addresses are final before anything records them
    (``generate()``'s cache key, a captured decode step); nothing in a model holding FSDP modules. Returns whether
    every such module is fused now (False where one was refused: a hook, a wrapper, a capture...)."""
    modules, stack = [], [model]
    while stack:  # the module tree through ``_modules`` (``model.modules()`` and a missing-attribute lookup on every
        module = stack.pop()  # module cost ~1.5 ms a generate() call for SmolLM2's 30 layers on 2 CPU cores)
        if module is not None:
            modules.append(module)
            stack.extend(module._modules.values())
    if any(type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")) for m in modules):
        return False
    complete = True
    with torch.no_grad():
        for module in modules:
            if getattr(type(module), "fuse_inference_weights", None) is not None:  # a class attribute: no __getattr__ miss
                complete &= module.fuse_inference_weights()
    return complete
