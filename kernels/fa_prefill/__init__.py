"""Causal prefill attention of the full-attention heads: grouped KV heads of uneven group sizes, one launch."""
