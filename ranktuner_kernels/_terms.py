"""From row statistics to per-token terms, gradient coefficients and the reduced loss: the
O(N) algebra both implementations and both paths share (SPEC, "One mechanism").

Per kept token, with the weighting's ``(value_w, w, beta)`` (times the caller's weights ``c``):

    value = value_w + eps * w * (lse - mean z' + log p_t) + lam * lse^2
    dz'_i = p p_i - onehot 1[i = y] - uniform + entropy p_i (log p_i + H)
    p = g (w + 2 lam lse),  onehot = g (1 - eps) w,  uniform = g eps w / V,  entropy = g beta

(``eps`` label smoothing, ``lam`` z-loss, ``g`` the upstream gradient over the normaliser; the
coefficients are ``GradCoefs``' fields).
"""

from __future__ import annotations

import torch

from .reference import GradCoefs, RowStats
from .weightings import Batch, Terms


def forward_terms(params, logits, target, keep, scale):
    """``(stats, terms, z_loss, value)`` of ``[B, T, V]`` logits: the statistics, the
    weighting's terms (fused in the Triton kernel where row-local), and the token values."""
    backend, weighting = params.backend, params.weighting
    stats, fused = backend.row_stats(logits, target, params, weighting, scale)
    if fused is not None:
        value, w, beta = fused
        terms = Terms(value, w, beta if weighting.has_entropy_term else None)
    else:
        topk = backend.topk_entropy(logits, target, weighting.k, params) if weighting.needs_topk else None
        terms = weighting_terms(params, stats, keep, scale, topk)
    z_loss = z_loss_terms(params, stats, keep)
    return stats, terms, z_loss, total_value(params, stats, terms, z_loss)


def weighting_terms(params, stats: RowStats, keep, scale, topk_entropy=None) -> Terms:
    """The weighting's torch formula times the caller's ``scale``, exactly zero on ignored tokens
    (a batch-level statistic, TALR's median, over the data-parallel group through
    ``params.batch_gather`` where given)."""
    t = params.weighting.terms(stats, Batch(keep, params.shape, topk_entropy, params.batch_gather))
    mult = keep.to(t.value.dtype) if scale is None else torch.where(keep, scale.to(t.value.dtype), 0)

    def masked(x):
        return torch.where(keep, x * mult, 0)

    return Terms(masked(t.value), masked(t.w), None if t.beta is None else masked(t.beta))


def z_loss_terms(params, stats: RowStats, keep):
    """``lam * lse^2`` per token (0 where ignored), or None without z-loss."""
    if params.z_loss == 0:
        return None
    return torch.where(keep, params.z_loss * stats.lse.square(), 0)


def total_value(params, stats: RowStats, terms: Terms, z_loss):
    """The token's loss: the weighting's value plus label smoothing and z-loss."""
    value = terms.value
    if params.label_smoothing > 0:
        smooth_minus_nll = stats.lse - stats.logit_mean + stats.logp_t
        value = value + params.label_smoothing * terms.w * smooth_minus_nll
    if z_loss is not None:
        value = value + z_loss
    return value


def grad_coefs(params, stats: RowStats, keep, terms: Terms, g, v_size: int) -> GradCoefs:
    """The per-token coefficients of the one gradient for upstream ``g`` (a scalar or ``[N]``)."""
    gw = g * terms.w
    p, onehot, uniform = gw, None, None
    if params.label_smoothing > 0:
        onehot = gw * (1 - params.label_smoothing)
        uniform = gw * (params.label_smoothing / v_size)
    if params.z_loss != 0:
        p = gw + torch.where(keep, g * (2 * params.z_loss) * stats.lse, 0)
        onehot = gw if onehot is None else onehot
    entropy = None if terms.beta is None else g * terms.beta
    return GradCoefs(p=p, onehot=onehot, uniform=uniform, entropy=entropy)


def reduce(value, reduction, norm, shape):
    if reduction == "none":
        return value.reshape(shape)
    total = value.sum()
    return total / norm if reduction == "mean" else total


def upstream(grad, reduction, norm, n, dtype):
    """``g_t``: the upstream gradient over the normaliser, as ``[N]``."""
    if reduction == "none":
        return grad.reshape(-1).to(dtype)
    g = grad.to(dtype)
    g = g / norm if reduction == "mean" else g
    return g.expand(n)
