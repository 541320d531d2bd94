"""``nn.Module`` wrappers, for use as a model's ``loss_fn`` or LM head loss."""

from __future__ import annotations

import torch
from torch import nn

from ._call import check_options_of
from .linear_loss import linear_cross_entropy
from .token_loss import cross_entropy
from .weightings import resolve


class TokenReweightedLoss(nn.Module):
    """``loss_fn(logits, target)`` = :func:`ranktuner_kernels.cross_entropy` with fixed settings.

    Example: ``loss_fn = rk.TokenReweightedLoss("ranktuner", ignore_index=-100)``;
    ``loss = loss_fn(logits[:, :-1], labels[:, 1:])``. Any keyword option of
    ``rk.cross_entropy`` may be fixed here (``softcap=30.0``, ``label_smoothing=0.1``, ...);
    per-call keyword arguments (``token_weight``, ``num_items_in_batch``, ...) override them.
    """

    def __init__(self, weighting="sft", **options):
        super().__init__()
        check_options_of(cross_entropy, options, fixed=("input", "target", "weighting"))
        self.weighting = resolve(weighting)
        self.options = options

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs):
        return cross_entropy(input, target, weighting=self.weighting, **{**self.options, **kwargs})

    def extra_repr(self):
        return ", ".join([repr(self.weighting)] + [f"{k}={v!r}" for k, v in self.options.items()])


class LinearTokenReweightedLoss(nn.Module):
    """``loss_fn(hidden, target)`` with the LM head held by the module (``weight [V, D]``,
    optional ``bias``), as :func:`ranktuner_kernels.linear_cross_entropy`.

    ``LinearTokenReweightedLoss.from_linear(model.lm_head, "ranktuner")`` shares the head's
    parameters; gradients flow to them. Example:
    ``loss = head_loss(hidden[:, :-1], labels[:, 1:])`` with ``hidden`` the final hidden states.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None, weighting="sft", **options):
        super().__init__()
        check_options_of(linear_cross_entropy, options, fixed=("input", "linear_weight", "target", "weighting"))
        self.weight, self.bias = weight, bias
        self.weighting = resolve(weighting)
        self.options = options

    @classmethod
    def from_linear(cls, linear: nn.Linear, weighting="sft", **options):
        return cls(linear.weight, linear.bias, weighting, **options)

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs):
        opts = {"linear_bias": self.bias, **self.options, **kwargs}
        return linear_cross_entropy(input, self.weight, target, weighting=self.weighting, **opts)

    def extra_repr(self):
        v, d = self.weight.shape
        return ", ".join([f"vocab={v}, hidden={d}, bias={self.bias is not None}", repr(self.weighting)]
                         + [f"{k}={v!r}" for k, v in self.options.items()])
