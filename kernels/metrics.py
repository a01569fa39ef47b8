"""Error metric shared by the kernel tests and the GPU check: fla's relative RMS error.

``relative_rms_error(actual, reference) = RMS(actual - reference) / RMS(reference)``, computed in
float64. A NaN or inf anywhere in ``actual`` makes the error ``inf``, so no tolerance can pass it.
"""

from __future__ import annotations

import torch


def relative_rms_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS(actual - reference) / RMS(reference), inf when ``actual`` is not finite.

    Args:
        actual: tensor under test, any shape and dtype.
        reference: tensor of the same shape (the exact twin's result).

    Returns:
        The relative error as a Python float (0.0 when both are exactly zero).
    """
    if actual.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(reference.shape)}")
    actual, reference = actual.detach().double(), reference.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    diff = (actual - reference).pow(2).mean().sqrt()
    scale = reference.pow(2).mean().sqrt()
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / scale).item()
