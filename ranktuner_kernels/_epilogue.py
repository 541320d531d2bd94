"""From row statistics to per-token ``value``, ``w``, ``beta`` and the reduced loss."""

from __future__ import annotations

import torch

from .objectives import Batch


def token_terms(objective, stats, keep, shape, scale, topk_entropy=None):
    """``(value, w, beta)`` per token ``[N]``: the objective's coefficients times the caller's
    weights, exactly zero on ignored tokens (whatever their statistics)."""
    c = objective.coefficients(stats, Batch(keep, shape, topk_entropy))
    mult = keep.to(c.value.dtype) if scale is None else torch.where(keep, scale.to(c.value.dtype), 0)

    def masked(x):
        return torch.where(keep, x * mult, 0)

    return masked(c.value), masked(c.w), None if c.beta is None else masked(c.beta)


def reduce(value, reduction, norm, shape):
    if reduction == "none":
        return value.reshape(shape)
    total = value.sum()
    return total / norm if reduction == "mean" else total


def upstream(grad, reduction, norm, dtype):
    """``g_t``: the upstream gradient over the normaliser, ``[N]`` or a scalar."""
    if reduction == "none":
        return grad.reshape(-1).to(dtype)
    g = grad.to(dtype)
    return g / norm if reduction == "mean" else g
