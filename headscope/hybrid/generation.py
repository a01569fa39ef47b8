"""Which cache ``HybridForCausalLM.generate`` decodes with: the static hybrid cache where it applies.

``generate()`` takes ``decode_mode`` (:func:`check_mode` refuses a bad one before any work) and transformers then
asks the model for its cache (``_prepare_cache_for_generation``) once it has settled the call's settings: the
generation config merged from the call's keyword arguments, its ``generation_config`` and the model's, the
generation mode, the batch size and ``max_length`` after its own length rules (``max_new_tokens`` wins over
``max_length``; with neither, 20 new tokens capped at ``max_position_embeddings``). There
``static_cache_for_generate`` returns a ``HybridStaticCache`` to decode with, or None for transformers' own
``DynamicCache`` (the eager reference path). Modes:

* ``"graph"``: static cache, decode steps captured in a CUDA graph (CUDA models only);
* ``"static"``: static cache, eager decode steps (any device: how the CPU tests check the static path);
* ``"dynamic"``: None;
* ``"auto"`` (the default): ``"graph"`` on CUDA, ``"dynamic"`` elsewhere.

The static path serves greedy search and sampling of one sequence per prompt row from ``input_ids``: beam
search, several sequences per prompt, assisted decoding, ``use_cache=False``, a cache passed in or
``inputs_embeds`` take the dynamic path (an explicit "graph"/"static" there is a ``HeadscopeError``). The cache
holds ``max_length`` tokens, rounded up to ``LENGTH_STEP``. It is kept on the model and reused (reset, its
captured graph kept) by the next call with the same batch size, as long as it is long enough and the model's
weights have not moved; otherwise it is replaced. Before it looks (in every mode), the model's projections are
fused (``inference_weights.fuse_for_inference``: q/k/v/gate and the MLP's gate/up as one GEMM each, their weights
moved into one buffer once), so the weights' addresses it keys on are final.
"""

from __future__ import annotations

from transformers.generation.configuration_utils import GenerationMode

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


def _unsupported(config, model_kwargs: dict, generation_mode) -> str | None:
    """Why the static path cannot serve this call (transformers' settled config and model inputs), or None."""
    if model_kwargs.get("inputs_embeds") is not None:
        return "generate() got inputs_embeds"
    if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
        return "a cache was passed in"
    if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"{generation_mode.value} (num_beams={config.num_beams}); it serves greedy search and sampling"
    if (config.num_return_sequences or 1) != 1:
        return "num_return_sequences != 1"
    if config.use_cache is False:
        return "use_cache=False"
    return None


def check_mode(model, mode: str) -> str:
    """``mode`` resolved for ``model`` ("auto" -> "graph" on CUDA, else "dynamic"), or a ``HeadscopeError`` for an
    unknown mode or "graph" off CUDA (``generate()`` asks before any work)."""
    if mode not in MODES:
        raise HeadscopeError(f"decode_mode must be one of {', '.join(MODES)}; got {mode!r}")
    cuda = model.device.type == "cuda"
    if mode == "graph" and not cuda:
        raise HeadscopeError(f"decode_mode='graph' needs a CUDA model; this one is on {model.device} (use 'static')")
    return ("graph" if cuda else "dynamic") if mode == "auto" else mode


def kept_static_cache(model) -> HybridStaticCache | None:
    """The static cache ``generate()`` keeps on ``model`` for its next call, if any."""
    kept = getattr(model, _CACHE_ATTRIBUTE, None)
    return kept[0] if kept is not None else None


def drop_static_cache(model) -> None:
    """Forget the kept static cache (and its captured graph), so that its memory can be freed."""
    if hasattr(model, _CACHE_ATTRIBUTE):
        delattr(model, _CACHE_ATTRIBUTE)


def static_cache_for_generate(model, config, model_kwargs: dict, generation_mode, batch_size: int, requested: str) -> HybridStaticCache | None:
    """The ``HybridStaticCache`` ``generate()`` should decode with, or None (module docstring).

    Args:
        model: the ``HybridForCausalLM``.
        config: the call's ``GenerationConfig`` as transformers settled it (``max_length`` final).
        model_kwargs: the model inputs ``generate()`` passes on (a cache passed in, ``inputs_embeds``).
        generation_mode: transformers' ``GenerationMode`` of the call.
        batch_size: prompt rows.
        requested: the call's ``decode_mode``, one of ``MODES``.
    Raises:
        HeadscopeError: an unknown mode, "graph" off CUDA, or an explicit static mode the call cannot use.
    """
    key = _fused_weights_key(model)
    mode = check_mode(model, requested)
    if mode == "dynamic":
        return None
    reason = _unsupported(config, model_kwargs, generation_mode)
    if reason is not None:
        if requested == "auto":
            return None
        raise HeadscopeError(f"decode_mode={mode!r} cannot serve this generate() call: {reason}")
    needed, graphed = int(config.max_length), mode == "graph"
    cache = getattr(model, _CACHE_ATTRIBUTE, None)
    if cache is not None:
        old, old_key = cache
        if old.batch_size == batch_size and old.graphed == graphed and old.max_length >= needed and old_key == key:
            old.reset()
            return old
        delattr(model, _CACHE_ATTRIBUTE)  # free the old buffers before allocating the new ones
        del old, cache
    length = -(-needed // LENGTH_STEP) * LENGTH_STEP
    cache = HybridStaticCache(model, batch_size, length, graphed=graphed)
    setattr(model, _CACHE_ATTRIBUTE, (cache, key))
    return cache
