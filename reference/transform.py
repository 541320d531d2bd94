"""The logit transform ``z' = c tanh(z / c) / T`` and its derivative, in torch."""

import torch

from .stats import Transform


def apply(z: torch.Tensor, tr: Transform) -> torch.Tensor:
    """``z'`` of float32/float64 logits ``z``."""
    if tr.softcap is not None:
        z = tr.softcap * torch.tanh(z / tr.softcap)
    if tr.temperature != 1.0:
        z = z / tr.temperature
    return z


def derivative(z: torch.Tensor, tr: Transform) -> torch.Tensor | None:
    """``dz'/dz = (1 - tanh(z / c)^2) / T`` elementwise, or None where it is 1."""
    d = None
    if tr.softcap is not None:
        d = 1 - torch.tanh(z / tr.softcap).square()
    if tr.temperature != 1.0:
        d = (1.0 / tr.temperature) if d is None else d / tr.temperature
    return d
