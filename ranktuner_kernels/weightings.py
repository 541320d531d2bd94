"""Weightings: the per-token part of every objective, one small config class each.

A weighting maps the row statistics of token ``t`` (SPEC.md) to its :class:`Terms`:

* ``value``: the token's loss value,
* ``w``: a detached weight on the NLL gradient,
* ``beta``: a coefficient on the entropy gradient (0 but for ``entropy_reg``),

so that ``dL/dz_i = g_t * (w_t * (p_i - 1[i = y]) + beta_t * p_i * (log p_i + H_t))``.
The kernels stay generic; these formulas run on ``[N]`` tensors only.

Each config is a frozen dataclass of its options with its torch formula (``terms``); a
row-local weighting also has a Triton formula (by default the function of the same name in
``csrc_triton/weightings.py``), whose float options and ``tl.constexpr`` switches
``kernel_args()`` gives.

**The registry.** :data:`WEIGHTINGS` (name -> class), filled by :func:`register`, is the one
list of weightings: names resolve through it (:func:`resolve`), the package exports its
classes (``rk.RankTuner``, ``__all__``), and the tests, the demo and the benchmarks loop over
it. The interface and the registry live in ``_registry.py`` and are re-exported here
(``rk.weightings.register``, ``Weighting``, ``Terms``, ``Batch``, ...); this file holds the
configs only. Adding an objective to the library: its class here (``@register``, with its
``variants``), its Triton formula in ``csrc_triton/weightings.py`` (row-local ones only), its
oracle in ``tests/spec_formulas.py`` and its row in the README's table of objectives; nothing
else. Code outside the package may register its own (a ``triton_formula`` attribute then names
its Triton formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# the interface and the registry, re-exported: rk.weightings.register, rk.weightings.Terms, ...
from ._registry import WEIGHTINGS, Batch, Terms, Weighting, describe, register, resolve, unregister  # noqa: F401
from .reference import RowStats

LN2 = math.log(2.0)


def expected_rank_bound(entropy_bits: torch.Tensor, p_max: torch.Tensor) -> torch.Tensor:
    """``s(H)`` (RankTuner paper Eq. 5, SPEC.md): ``2^{H_bits}/4 + 1`` where ``H_bits >= 2``,
    else ``2 - p_max``; a lower bound on the expected rank ``E[R] = sum_i i p_(i)``. NaN stays
    NaN. The one place ``s(H)`` is written (the RankTuner weight and the token inspector's
    Relative Rank Indicator use it)."""
    return torch.where(entropy_bits >= 2, torch.exp2(entropy_bits) / 4 + 1, 2 - p_max)


def _nll_weighted(stats: RowStats, w: torch.Tensor) -> Terms:
    return Terms(w * (-stats.logp_t), w, None)


def _check_positive(obj, name):
    v = getattr(obj, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{type(obj).__name__}: {name} must be a finite number > 0, got {v!r}")


def _check_choice(obj, name, choices):
    v = getattr(obj, name)
    if v not in choices:
        raise ValueError(f"{type(obj).__name__}: {name} must be one of {choices}, got {v!r}")


@register
@dataclass(frozen=True)
class SFT(Weighting):
    """Plain cross-entropy: ``value = -log p_t``, ``w = 1``."""

    name = "sft"

    def terms(self, stats, batch):
        return _nll_weighted(stats, torch.ones_like(stats.logp_t))


@register
@dataclass(frozen=True)
class DFT(Weighting):
    """Dynamic fine-tuning: ``value = sg(p_t) * (-log p_t)``, ``w = p_t``."""

    name = "dft"

    def terms(self, stats, batch):
        return _nll_weighted(stats, stats.logp_t.exp())


@register
@dataclass(frozen=True)
class RankTuner(Weighting):
    """RankTuner's Relative Scale (paper Algorithm 1).

    ``s(H) = 2^{H_bits}/4 + 1`` if ``H_bits >= 2`` else ``2 - p_max``;
    ``xi = max(R, s)`` (or the arithmetic / geometric / logarithmic mean);
    ``K = log2(xi + 1)^-2`` (times ``xi/(xi+1)`` for ``k="cmvt"``);
    ``S = max(p_t * s, clamp_min)^-K`` (``s^-K`` / ``p_t^-K`` for the ablations);
    ``w = sg(w0 * S)`` with ``w0 = p_t`` or 1; ``value = w * (-log p_t)``.
    """

    w0: str = "p"
    xi: str = "max"
    k: str = "simplified"
    ablation: Optional[str] = None
    clamp_min: Optional[float] = 1e-6
    name = "ranktuner"
    variants = (dict(w0="one"), dict(xi="arith"), dict(xi="geo"), dict(xi="log"), dict(k="cmvt"),
                dict(ablation="no_prob"), dict(ablation="no_entropy"), dict(clamp_min=None), dict(clamp_min=0.3))

    def validate(self):
        _check_choice(self, "w0", ("p", "one"))
        _check_choice(self, "xi", ("max", "arith", "geo", "log"))
        _check_choice(self, "k", ("simplified", "cmvt"))
        _check_choice(self, "ablation", (None, "no_prob", "no_entropy"))
        if self.clamp_min is not None:
            _check_positive(self, "clamp_min")

    def kernel_args(self):
        log_clamp = -math.inf if self.clamp_min is None or self.ablation is not None else math.log(self.clamp_min)
        return (log_clamp, 0.0), (self.w0, self.xi, self.k, self.ablation)

    def relative_scale_terms(self, stats: RowStats):
        """``(log s(H), xi, K)`` per token."""
        s = expected_rank_bound(stats.entropy / LN2, stats.p_max)
        r = stats.rank.to(s.dtype)
        if self.xi == "max":
            xi = torch.maximum(r, s)
        elif self.xi == "arith":
            xi = (r + s) / 2
        elif self.xi == "geo":
            xi = torch.sqrt(r * s)
        else:  # logarithmic mean, arithmetic where R ~ s (the limit of the log mean)
            dlog = torch.log(r) - torch.log(s)
            close = dlog.abs() < 1e-4
            xi = torch.where(close, (r + s) / 2, (r - s) / torch.where(close, 1.0, dlog))
        k = torch.log2(xi + 1).pow(-2)
        if self.k == "cmvt":
            k = k * xi / (xi + 1)
        return torch.log(s), xi, k

    def terms(self, stats, batch):
        log_s, _, k = self.relative_scale_terms(stats)
        if self.ablation is None:
            log_base = stats.logp_t + log_s
            if self.clamp_min is not None:
                log_base = torch.clamp_min(log_base, math.log(self.clamp_min))
        elif self.ablation == "no_prob":
            log_base = log_s
        else:
            log_base = stats.logp_t
        log_scale = -k * log_base
        if self.w0 == "p":
            log_scale = log_scale + stats.logp_t
        return _nll_weighted(stats, log_scale.exp())


@register
@dataclass(frozen=True)
class TALR(Weighting):
    """``w = max(max(p_t, 1e-6)^{1/tau}, w_min)``; ``tau`` is the median over the
    batch's sequences of each sequence's mean NLL (sequences with no token left out;
    the median of an even count is the mean of the two middle values), unless given. Under
    data parallelism the batch is the group's: the sequences' means go through
    ``batch.gather`` before the median."""

    w_min: float = 0.01
    tau: Optional[float] = None
    name = "talr"
    variants = (dict(tau=2.0), dict(w_min=0.3))
    batch_level = True

    def validate(self):
        if not isinstance(self.w_min, (int, float)) or not 0 <= self.w_min <= 1:
            raise ValueError(f"TALR: w_min must be in [0, 1], got {self.w_min!r}")
        if self.tau is not None:
            _check_positive(self, "tau")

    @staticmethod
    def sequence_means(stats: RowStats, batch: Batch) -> torch.Tensor:
        """Each sequence's mean NLL over its kept tokens, sequences with none left out."""
        if len(batch.shape) != 2:
            raise ValueError("TALR needs [B, T] targets (per-sequence mean NLL) or an explicit tau=")
        nll = torch.where(batch.keep, -stats.logp_t, 0).reshape(batch.shape)
        count = batch.keep.reshape(batch.shape).sum(1)
        return nll.sum(1)[count > 0] / count[count > 0]

    @staticmethod
    def median(seq_means: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``tau``: the median of the sequences' mean NLL (1 when there is none)."""
        if seq_means.numel() == 0:
            return torch.ones((), dtype=like.dtype, device=like.device)
        return torch.quantile(seq_means, 0.5)

    def temperature(self, stats: RowStats, batch: Batch) -> torch.Tensor:
        if self.tau is not None:
            return torch.tensor(float(self.tau), dtype=stats.logp_t.dtype, device=stats.logp_t.device)
        means = self.sequence_means(stats, batch)
        if batch.gather is not None:
            means = batch.gather(means)
        return self.median(means, stats.logp_t)

    def terms(self, stats, batch):
        tau = self.temperature(stats, batch)
        p = stats.logp_t.exp().clamp_min(1e-6)
        w = torch.clamp_min(p.pow(1.0 / tau), self.w_min)
        return _nll_weighted(stats, w)


@register
@dataclass(frozen=True)
class EAFT(Weighting):
    """``w = (H_topK / norm)^alpha`` with ``H_topK`` the entropy of the softmax over the
    ``k`` largest logits (all of them where ``V < k``)."""

    k: int = 20
    alpha: float = 1.0
    norm: float = 3.0
    name = "eaft"
    variants = (dict(k=3, alpha=2.0, norm=1.0),)
    needs_topk = True

    def validate(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"EAFT: k must be an int >= 1, got {self.k!r}")
        _check_positive(self, "alpha")
        _check_positive(self, "norm")

    def terms(self, stats, batch):
        return _nll_weighted(stats, (batch.topk_entropy / self.norm).pow(self.alpha))


@register
@dataclass(frozen=True)
class OverTone(Weighting):
    """``w = lam`` where the target's logit is the row maximum (ties included), else 1."""

    lam: float = 0.1
    name = "overtone"
    variants = (dict(lam=0.5),)

    def validate(self):
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"OverTone: lam must be a finite number >= 0, got {self.lam!r}")

    def kernel_args(self):
        return (float(self.lam), 0.0), (None,) * 4

    def terms(self, stats, batch):
        is_max = stats.target_logit >= stats.max_logit
        return _nll_weighted(stats, torch.where(is_max, self.lam, 1.0).to(stats.logp_t.dtype))


@register
@dataclass(frozen=True)
class AlphaPower(Weighting):
    """``value = (1 - p_t^alpha)/alpha``, ``w = p_t^alpha`` (exact gradient of the f(p) objective)."""

    alpha: float = 1.0
    name = "alpha_power"
    variants = (dict(alpha=0.5), dict(alpha=2.0))

    def validate(self):
        _check_positive(self, "alpha")

    def kernel_args(self):
        return (float(self.alpha), 0.0), (None,) * 4

    def terms(self, stats, batch):
        w = (self.alpha * stats.logp_t).exp()
        return Terms(-torch.expm1(self.alpha * stats.logp_t) / self.alpha, w, None)


@register
@dataclass(frozen=True)
class Threshold(Weighting):
    """``w = 1[low <= p_t <= high]``, ``value = w * (-log p_t)``."""

    low: float = 0.2
    high: float = 1.0
    name = "threshold"
    variants = (dict(low=0.05, high=0.5),)

    def validate(self):
        for n in ("low", "high"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"Threshold: {n} must be in [0, 1], got {v!r}")
        if self.low > self.high:
            raise ValueError(f"Threshold: low ({self.low}) must be <= high ({self.high})")

    def kernel_args(self):
        return (float(self.low), float(self.high)), (None,) * 4

    def terms(self, stats, batch):
        p = stats.logp_t.exp()
        return _nll_weighted(stats, ((p >= self.low) & (p <= self.high)).to(p.dtype))


@register
@dataclass(frozen=True)
class EntropyReg(Weighting):
    """``value = -log p_t - alpha * H``, ``w = 1``, ``beta = alpha``."""

    alpha: float = 0.02
    name = "entropy_reg"
    variants = (dict(alpha=0.5),)
    has_entropy_term = True

    def validate(self):
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"EntropyReg: alpha must be a finite number, got {self.alpha!r}")

    def kernel_args(self):
        return (float(self.alpha), 0.0), (None,) * 4

    def terms(self, stats, batch):
        w = torch.ones_like(stats.logp_t)
        return Terms(-stats.logp_t - self.alpha * stats.entropy, w, torch.full_like(w, self.alpha))


@register
@dataclass(frozen=True)
class Focal(Weighting):
    """``value = -(1-p)^gamma log p``; ``w = (1-p)^{gamma-1}((1-p) - gamma p log p)``."""

    gamma: float = 2.0
    name = "focal"
    variants = (dict(gamma=0.5), dict(gamma=0.0))

    def validate(self):
        if not isinstance(self.gamma, (int, float)) or not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(f"Focal: gamma must be a finite number >= 0, got {self.gamma!r}")

    def kernel_args(self):
        return (float(self.gamma), 0.0), (None,) * 4

    def terms(self, stats, batch):
        logp = stats.logp_t
        p = logp.exp()
        q = -torch.expm1(logp)  # 1 - p, accurate near p = 1
        value = -q.pow(self.gamma) * logp
        if self.gamma == 0:
            w = torch.ones_like(p)
        else:
            w = q.pow(self.gamma - 1) * (q - self.gamma * p * logp)
            w = torch.where(q == 0, 0.0, w)  # the limit (1 + gamma) q^gamma -> 0 at p = 1
        return Terms(value, w, None)
