"""The gated MLP's ``silu(gate) * up`` in one launch: ``swiglu``."""
