"""Decode attention of the full-attention heads against a preallocated KV cache (cache write, log scaling, split-K)."""
