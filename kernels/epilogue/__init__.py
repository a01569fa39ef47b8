"""Fused epilogue of the head-wise hybrid layer: per-head RMSNorm, per-head scale, output gate."""
