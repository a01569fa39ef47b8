"""Fused RoPE + L2 norm of the Gated DeltaNet queries and keys: ``l2_normalize(apply_rope(x, cos, sin))``."""
