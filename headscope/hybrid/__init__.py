"""Head-wise hybrid attention: FA heads and Gated DeltaNet heads in one layer, the builder and HF modeling."""
