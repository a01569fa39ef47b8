"""Head-wise hybrid attention: FA heads and Gated DeltaNet heads in one layer, the builder and HF modeling.

Importing this package registers ``HybridConfig`` / ``HybridForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (model_type ``"headscope_hybrid"``).
"""

from headscope.hybrid.builder import build_hybrid, calibrate_gamma, hybrid_config_for
from headscope.hybrid.layer import HeadwiseHybridAttention, HybridLayerSpec
from headscope.hybrid.modeling import HybridConfig, HybridForCausalLM

__all__ = [
    "HeadwiseHybridAttention", "HybridConfig", "HybridForCausalLM", "HybridLayerSpec", "build_hybrid", "calibrate_gamma",
    "hybrid_config_for",
]
