"""The types shared by the reference, the kernels' launchers and the public package (a leaf
module: it imports torch only)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class RowStats(NamedTuple):
    """Per-token statistics of the (transformed) logits ``z' = softcap(z) / T``, each ``[N]``
    (float32, or float64 for float64 logits); ignored tokens hold zeros.

    ``lse = log sum_i exp z'_i``; ``logp_t = log p_t``, formed from the non-target mass so that
    it keeps its relative precision when ``p_t -> 1`` (SPEC, "Confident tokens");
    ``target_logit = z'_y``; ``max_logit = max_i z'_i``; ``entropy = -sum_i p_i log p_i``
    (nats); ``rank = #{i : z_i >= z_y}`` (int64, compared on the untransformed logits in their
    own precision); ``logit_mean = mean_i z'_i`` (only with label smoothing, else None).
    """

    lse: torch.Tensor
    logp_t: torch.Tensor
    target_logit: torch.Tensor
    max_logit: torch.Tensor
    entropy: torch.Tensor
    rank: torch.Tensor
    logit_mean: Optional[torch.Tensor] = None

    @property
    def p_max(self) -> torch.Tensor:
        return torch.exp(self.max_logit - self.lse)


class GradCoefs(NamedTuple):
    """Per-token coefficients ``[N]`` of the one gradient (SPEC, "One mechanism"):

        dz'_i = ga * p_i - gy * 1[i = y] - gc + gb * p_i * (log p_i + H)

    ``gy`` None means ``gy = ga``; ``gc`` and ``gb`` None mean 0. The target's element is
    formed as ``(ga - gy) p_t - gy (1 - p_t) - gc + ...`` with ``1 - p_t`` from ``logp_t``.
    """

    ga: torch.Tensor
    gy: Optional[torch.Tensor] = None
    gc: Optional[torch.Tensor] = None
    gb: Optional[torch.Tensor] = None


class Transform(NamedTuple):
    """The map applied to the logits before every statistic: ``z' = c tanh(z / c) / T``
    (``softcap`` c None: no capping; ``temperature`` T = 1: no scaling)."""

    softcap: Optional[float] = None
    temperature: float = 1.0
