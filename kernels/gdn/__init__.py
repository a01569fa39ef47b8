"""Gated DeltaNet: float32 recurrent reference, pure-torch chunked form, fla dispatch on CUDA."""
