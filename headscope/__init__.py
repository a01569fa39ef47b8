"""headscope: find the attention heads a causal LM needs at full attention, then build the hybrid."""

from headscope import registration
from headscope.heads import Head, HeadMask, HeadScores, HeadscopeError, ModelFingerprint
from headscope.models import LoadedModel, load_model

registration.install()  # saved hybrids load with AutoModelForCausalLM once transformers is imported

__all__ = ["Head", "HeadMask", "HeadScores", "HeadscopeError", "ModelFingerprint", "LoadedModel", "load_model"]
__version__ = "0.1.0"
