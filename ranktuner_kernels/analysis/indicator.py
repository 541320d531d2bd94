"""The per-token scores the renderer and the noise metric share: the Relative Rank Indicator
``I_t`` of the RankTuner paper (Def. 4.2, Eq. 2) with the expected rank replaced by its entropy
bound ``s(H_t)`` (:func:`ranktuner_kernels.weightings.expected_rank_bound`, the one place
``s(H)`` is written), and a model's logits."""

from __future__ import annotations

import numpy as np
import torch

from ..weightings import expected_rank_bound

__all__ = ["expected_rank_bound", "relative_rank_indicator", "relative_rank_terms", "model_logits"]


def relative_rank_indicator(rank, expected_rank):
    """``I = 2^{f(R) - f(E)}``, ``f(x) = 1/log2(x + 1)`` (paper Eq. 2); 1 where ``R = E``.
    Tensors or arrays."""
    if isinstance(rank, torch.Tensor):
        f = lambda x: 1.0 / torch.log2(x + 1)  # noqa: E731
        return torch.exp2(f(rank.to(expected_rank.dtype)) - f(expected_rank))
    f = lambda x: 1.0 / np.log2(x + 1)  # noqa: E731
    return np.exp2(f(np.asarray(rank, dtype=np.float64)) - f(np.asarray(expected_rank, dtype=np.float64)))


def relative_rank_terms(stats: dict) -> dict:
    """``{"s": s(H_t), "indicator": I_t}`` from a stats dict of ``rk.token_stats`` or
    ``return_stats=True`` (keys ``entropy_bits``, ``p_max``, ``rank``; tensors or arrays).

    ``I_t = 2^{f(R_t) - f(s(H_t))}`` with ``f(x) = 1/log2(x+1)``: the paper's Relative Rank
    Indicator (Def. 4.2) with the expected rank ``E[R_t]`` replaced by its entropy bound
    ``s(H_t)``, the same substitution the RankTuner weight makes (Algorithm 1). Its inverse
    ``1/I_t`` is the RankTuner score of the noise diagnostic (App. B.3). Positions whose
    statistics are NaN (ignored targets) give NaN."""
    h = stats["entropy_bits"]
    arrays = not isinstance(h, torch.Tensor)
    if arrays:
        h = torch.as_tensor(np.asarray(h, dtype=np.float64))
    h = h.float() if h.dtype != torch.float64 else h
    p_max = torch.as_tensor(np.asarray(stats["p_max"]) if arrays else stats["p_max"]).to(h.dtype)
    rank = torch.as_tensor(np.asarray(stats["rank"]) if arrays else stats["rank"]).to(h.dtype)
    s = expected_rank_bound(h, p_max)
    out = {"s": s, "indicator": relative_rank_indicator(rank, s)}
    return {k: v.numpy() for k, v in out.items()} if arrays else out


def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` as a logits tensor: the output itself, its ``.logits`` (Hugging Face
    style), or the first element of a tuple."""
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected logits (a tensor, or an object with .logits), got {type(out).__name__}")
    return out
