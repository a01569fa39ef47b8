"""GPU and reference kernels, importable as ``headscope.kernels``."""
