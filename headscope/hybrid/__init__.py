"""Head-wise hybrid attention: FA heads and Gated DeltaNet heads in one layer, the builder and HF modeling.

``import headscope`` makes a saved hybrid loadable with ``AutoModelForCausalLM.from_pretrained``
(``headscope.registration``); ``save_pretrained`` also makes it loadable with ``trust_remote_code=True``
(``headscope.hybrid.configuration``). The names below resolve on first use, so reading a hybrid's config
does not load the model code and the kernels.
"""

import importlib

_HOMES = {
    "HeadwiseHybridAttention": "layer", "HybridConfig": "configuration", "HybridForCausalLM": "modeling",
    "HybridLayerSpec": "layer", "build_full_attention": "builder", "build_hybrid": "builder", "calibrate_gamma": "builder",
    "hybrid_config_for": "builder",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
