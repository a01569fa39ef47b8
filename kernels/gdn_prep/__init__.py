"""Fused Gated DeltaNet input preparation: causal depthwise conv + SiLU of q/k/v, then RoPE + L2 norm of q/k."""
