"""``nn.Module`` wrappers, for use as a model's ``loss_fn`` or LM head loss."""

from __future__ import annotations

import torch
from torch import nn

from .token_loss import cross_entropy
from .linear_loss import linear_cross_entropy
from .objectives import resolve


class TokenReweightedLoss(nn.Module):
    """``loss_fn(logits, target)`` = :func:`ranktuner_kernels.cross_entropy` with fixed settings.

    Example: ``loss_fn = rk.TokenReweightedLoss("ranktuner")``; ``loss = loss_fn(logits, labels)``.
    Per-call keyword arguments (``token_weight``, ``num_items_in_batch``, ...) pass through.
    """

    def __init__(self, weighting="ranktuner", *, ignore_index=-100, reduction="mean", inplace_backward=False, impl="auto"):
        super().__init__()
        self.objective = resolve(weighting)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.inplace_backward, self.impl = inplace_backward, impl

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs):
        opts = dict(ignore_index=self.ignore_index, reduction=self.reduction, inplace_backward=self.inplace_backward, impl=self.impl)
        opts.update(kwargs)
        return cross_entropy(input, target, self.objective, **opts)

    def extra_repr(self):
        return f"{self.objective}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class LinearTokenReweightedLoss(nn.Module):
    """``loss_fn(hidden, target)`` with the LM head held by the module (``weight [V, D]``,
    optional ``bias``), as :func:`ranktuner_kernels.linear_cross_entropy`.

    ``LinearTokenReweightedLoss.from_linear(model.lm_head, "ranktuner")`` shares the head's
    parameters; gradients flow to them.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None, weighting="ranktuner", *,
                 ignore_index=-100, reduction="mean", chunk_size=None, impl="auto"):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.objective = resolve(weighting)
        self.ignore_index, self.reduction, self.chunk_size, self.impl = ignore_index, reduction, chunk_size, impl

    @classmethod
    def from_linear(cls, linear: nn.Linear, weighting="ranktuner", **kwargs):
        return cls(linear.weight, linear.bias, weighting, **kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs):
        opts = dict(linear_bias=self.bias, weighting=self.objective, ignore_index=self.ignore_index,
                    reduction=self.reduction, chunk_size=self.chunk_size, impl=self.impl)
        opts.update(kwargs)
        return linear_cross_entropy(input, self.weight, target, **opts)
