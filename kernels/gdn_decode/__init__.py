"""One fused Gated DeltaNet decode step: conv window update, SiLU, RoPE + L2 norm, beta/decay, delta rule, in place."""
