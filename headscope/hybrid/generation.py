"""Which cache ``HybridForCausalLM.generate`` decodes with: the static hybrid cache where it applies.

``static_cache_for_generate(model, inputs, args, kwargs, mode)`` returns a ``HybridStaticCache`` for
``generate()`` to use, or None for transformers' own ``DynamicCache`` (the eager reference path). Modes:

* ``"graph"``: static cache, decode steps captured in a CUDA graph (CUDA models only);
* ``"static"``: static cache, eager decode steps (any device: how the CPU tests check the static path);
* ``"dynamic"``: None;
* ``"auto"`` (the default): ``"graph"`` on CUDA, ``"dynamic"`` elsewhere.

The static path needs one sequence per prompt row from ``input_ids``: beam search, sampling several
sequences per prompt, assisted decoding, ``use_cache=False``, a cache passed in or ``inputs_embeds``
without ids take the dynamic path (an explicit "graph"/"static" there is a ``HeadscopeError``). The cache
holds prompt + ``max_new_tokens`` (or ``max_length``) tokens, rounded up to ``LENGTH_STEP``. It is kept
on the model and reused (reset, its captured graph kept) by the next call with the same batch size, as
long as it is long enough and the model's weights have not moved; otherwise it is replaced. Before it looks
(in every mode), the model's projections are fused (``inference_weights.fuse_for_inference``: q/k/v/gate and the MLP's gate/up
as one GEMM each, their weights moved into one buffer once), so the weights' addresses it keys on are final.
"""

from __future__ import annotations

import torch

from headscope.heads import HeadscopeError
from headscope.hybrid.inference_weights import fuse_for_inference
from headscope.hybrid.static_cache import HybridStaticCache

MODES = ("auto", "graph", "static", "dynamic")
LENGTH_STEP = 256
_CACHE_ATTRIBUTE = "_headscope_static_cache"
_FUSED_ATTRIBUTE = "_headscope_fused_key"  # the weights key right after a complete fuse_for_inference


def _weights_key(model) -> tuple:
    """Where the weights live, and as what: a captured graph is only valid for these addresses and dtypes.

    Read straight from every module's ``_parameters`` and ``_modules`` at each call (exact whatever changed the model:
    ``setattr``, ``_parameters[...] = ...`` as accelerate writes it, ``ModuleList.insert``, ``.to()``, ``p.data = ...``),
    without ``model.parameters()``'s generators: 0.23 against 0.81 ms for SmolLM2's hybrid layout (513 parameters, 2
    CPU cores; on the H200 box's host the walk took 4 of the 43 ms of a 4K prefill under cProfile). A tied weight
    appears once per owner."""
    key, stack = [], [model]
    append, pop, extend = key.append, stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        for param in module._parameters.values():
            if param is not None:
                append(param.data_ptr())
                append(param.dtype)
        extend(module._modules.values())
    return tuple(key)


def _fused_weights_key(model) -> tuple:
    """``_weights_key`` after ``fuse_for_inference`` (the fused projections' final addresses, before the key records
    them). A model whose key has not moved since a fuse that fused everything is not walked again (the walk cost
    ~0.6 ms a call for SmolLM2 on 2 CPU cores); one where something was refused (a hook) is, at every call."""
    key = _weights_key(model)
    if getattr(model, _FUSED_ATTRIBUTE, None) == key:
        return key
    complete = fuse_for_inference(model)
    key = _weights_key(model)
    if complete:
        setattr(model, _FUSED_ATTRIBUTE, key)
    return key


def _unsupported(input_ids, kwargs, config) -> str | None:
    """Why the static path cannot serve this call, or None."""
    if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        return "generate() got no 2D input_ids"
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return "a cache was passed in"
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        return "assisted decoding"
    for name, fine in (("num_beams", 1), ("num_return_sequences", 1)):
        if kwargs.get(name, getattr(config, name, 1) or 1) != fine:
            return f"{name} != 1"
    if kwargs.get("use_cache", config.use_cache) is False:
        return "use_cache=False"
    return None


def _total_length(input_ids: torch.Tensor, kwargs, config) -> int:
    new = kwargs.get("max_new_tokens", config.max_new_tokens if "max_length" not in kwargs else None)
    if new is not None:
        return input_ids.shape[1] + int(new)
    return int(kwargs.get("max_length", config.max_length))


def static_cache_for_generate(model, inputs, args: tuple, kwargs: dict, mode: str) -> HybridStaticCache | None:
    """The ``HybridStaticCache`` ``generate()`` should decode with, or None (module docstring).

    Args:
        model: the ``HybridForCausalLM``.
        inputs, args, kwargs: what ``generate()`` was called with (``generation_config`` as the first of
            ``args`` or in ``kwargs``; ``input_ids`` as ``inputs`` or in ``kwargs``).
        mode: one of ``MODES``.
    Raises:
        HeadscopeError: an unknown mode, "graph" off CUDA, or an explicit static mode the call cannot use.
    """
    if mode not in MODES:
        raise HeadscopeError(f"decode_mode must be one of {', '.join(MODES)}; got {mode!r}")
    key = _fused_weights_key(model)
    cuda, requested = model.device.type == "cuda", mode
    if mode == "auto":
        mode = "graph" if cuda else "dynamic"
    if mode == "dynamic":
        return None
    if mode == "graph" and not cuda:
        raise HeadscopeError(f"decode_mode='graph' needs a CUDA model; this one is on {model.device} (use 'static')")
    config = (args[0] if args else None) or kwargs.get("generation_config") or model.generation_config
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    reason = _unsupported(input_ids, kwargs, config)
    if reason is not None:
        if requested == "auto":
            return None
        raise HeadscopeError(f"decode_mode={mode!r} cannot serve this generate() call: {reason}")
    batch, needed = input_ids.shape[0], _total_length(input_ids, kwargs, config)
    graphed = mode == "graph"
    cache = getattr(model, _CACHE_ATTRIBUTE, None)
    if cache is not None:
        old, old_key = cache
        if old.batch_size == batch and old.graphed == graphed and old.max_length >= needed and old_key == key:
            old.reset()
            return old
        delattr(model, _CACHE_ATTRIBUTE)  # free the old buffers before allocating the new ones
        del old, cache
    length = -(-needed // LENGTH_STEP) * LENGTH_STEP
    cache = HybridStaticCache(model, batch, length, graphed=graphed)
    setattr(model, _CACHE_ATTRIBUTE, (cache, key))
    return cache
