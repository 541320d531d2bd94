"""Clipped policy-gradient losses on per-token log-probabilities (PPO / GRPO / GSPO-token).

Pure torch on ``[B, T]`` tensors: the log-probabilities come from wherever the caller
computes them, e.g. ``logp = -rk.cross_entropy(logits, tokens, weighting="sft",
reduction="none")`` (the gradient then flows through the library's kernels). With
``r`` the importance ratio of a token and ``A`` its advantage, the per-token loss is

    l = -min(r·A, clip(r, 1 - eps_low, 1 + eps_high)·A)          (PPO / GRPO)

optionally with the dual clip ``l = min(l, -c·A)`` for ``A < 0`` (``dual_clip=c``), then
aggregated over the kept tokens (:func:`aggregate`, verl's ``agg_loss`` modes) and combined
with the k3 KL estimate to a reference policy and an entropy bonus:

    loss = agg(l) + kl_coef · agg(k3) - entropy_coef · agg(H)

Ratios (``ratio=``):

* ``"token"``: ``r_t = exp(logp_t - old_logp_t)``.
* ``"gspo_token"`` (GSPO-token, THR paper eq. 9-10, Zheng et al. 2025):
  ``s_i = exp(mean_t (logp_t - old_logp_t))`` over the kept tokens of sequence ``i``, and
  ``s_{i,t} = sg[s_i] · exp(logp_t - sg[logp_t])``: its value is the sequence ratio ``s_i`` for
  every token (clipping is sequence-level) while its gradient is ``s_i · ∇logp_t``, so each
  token keeps its own advantage ``A_{i,t}``. With per-sequence advantages and
  ``"seq-mean-token-mean"`` this equals GSPO in value and gradient.
"""

from __future__ import annotations

import torch

from .._inputs import check_num_items, divisor

__all__ = ["policy_loss", "aggregate", "AGGREGATIONS", "RATIOS"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
RATIOS = ("token", "gspo_token")
#: The aggregation each ratio's paper uses, when ``aggregation=None``.
DEFAULT_AGGREGATION = {"token": "token-mean", "gspo_token": "seq-mean-token-mean"}


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", num_items_in_batch=None):
    """Reduce ``[B, T]`` per-token ``values`` over the tokens where ``mask`` is 1 (verl's ``agg_loss``).

    * ``"token-mean"``: ``sum(values·mask) / n``, ``n`` = number of kept tokens.
    * ``"seq-mean-token-mean"``: the mean over sequences of each sequence's mean over its kept
      tokens; sequences with no kept token are left out of both means.
    * ``"seq-mean-token-sum"``: the mean over sequences of each sequence's sum over its kept tokens
      (sequences with no kept token left out).

    ``num_items_in_batch`` replaces the outer divisor (the token count for ``"token-mean"``, the
    sequence count otherwise), for gradient accumulation or data parallelism, by the losses'
    rule: 0 divides by 1, NaN gives NaN, a negative number raises (a tensor's sign is not read
    back here: no synchronisation). Nothing kept: 0, with a zero gradient.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {mode!r}")
    num_items_in_batch = check_num_items(num_items_in_batch)
    keep = mask != 0
    m = keep.to(values.dtype)
    values = torch.where(keep, values, values.new_zeros(()))
    if mode == "token-mean":
        total = values.sum()
        count = m.sum()
    else:
        per_seq = values.sum(dim=-1)
        n_tok = m.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / n_tok.clamp_min(1)
        total = per_seq.sum()  # sequences with no kept token contribute 0
        count = (n_tok > 0).sum()
    return total / divisor(count, num_items_in_batch, values.dtype, values.device)


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp_min(1)


def _check(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.2,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ratio: str = "token",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str | None = None,
    num_items_in_batch=None,
):
    """Clipped surrogate policy loss and its metrics.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the current policy
            (differentiable).
        old_logp: ``[B, T]`` the same under the policy that sampled them (treated as constants).
        advantages: ``[B, T]`` per-token or ``[B]`` per-sequence advantages (constants).
        mask: ``[B, T]`` 1 for response tokens that count, 0 for prompt / padding (bool, int
            or float holding 0 and 1).
        eps: the clip range on both sides; ``clip_low`` / ``clip_high`` override one side
            (DAPO's "clip higher": ``clip_high=0.28``). The ratio is clipped to
            ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: ``c > 1`` bounds the loss of negative-advantage tokens by ``-c·A``
            (dual-clip PPO); None (default) turns it off.
        ratio: ``"token"`` or ``"gspo_token"`` (module docstring).
        ref_logp: ``[B, T]`` log-probabilities under a reference policy (constants), for the
            KL term ``kl_coef · agg(k3)`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``.
        entropy: ``[B, T]`` per-token entropies of the current policy (differentiable if the
            bonus should train), for the term ``-entropy_coef · agg(H)``.
        aggregation: ``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"``
            (:func:`aggregate`); None picks the ratio's paper default: ``"token-mean"`` for
            ``"token"``, ``"seq-mean-token-mean"`` for ``"gspo_token"`` (THR eq. 9).
        num_items_in_batch: optional global divisor for the aggregation (:func:`aggregate`).

    Returns:
        ``(loss, metrics)``: the scalar loss (dtype of ``logp``) and a dict of detached 0-dim
        tensors: ``pg_loss``, ``clip_frac`` (kept tokens whose clipped branch is the active
        one), ``clip_frac_low`` (of those, ratio below ``1 - clip_low`` with ``A < 0``),
        ``clip_frac_high`` (ratio above ``1 + clip_high`` with ``A > 0``), ``ratio_mean``,
        ``ratio_min``, ``ratio_max`` (of the ratio used for clipping), ``approx_kl_old`` (mean
        of ``old_logp - logp``), and ``kl`` (mean k3), ``entropy`` (mean entropy) and
        ``dual_clip_frac`` when those terms are present. Means are over kept tokens.
    """
    _check("logp", logp, logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [B, T], got shape {tuple(logp.shape)}")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp: expected a floating dtype, got {logp.dtype}")
    shape = logp.shape
    _check("old_logp", old_logp, shape)
    _check("mask", mask, shape)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages: expected a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 1:
        _check("advantages", advantages, shape[:1])
        advantages = advantages[:, None].expand(shape)
    else:
        _check("advantages", advantages, shape)
    if ratio not in RATIOS:
        raise ValueError(f"ratio: expected one of {RATIOS}, got {ratio!r}")
    if aggregation is None:
        aggregation = DEFAULT_AGGREGATION[ratio]
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    lo = eps if clip_low is None else clip_low
    hi = eps if clip_high is None else clip_high
    if lo < 0 or hi < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={lo}, clip_high={hi}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip: expected a number > 1, got {dual_clip}")
    if ref_logp is not None:
        _check("ref_logp", ref_logp, shape)
    elif kl_coef != 0:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if entropy is not None:
        _check("entropy", entropy, shape)
    elif entropy_coef != 0:
        raise ValueError("entropy_coef != 0 needs entropy")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask: expected values 0 and 1 only")

    dt = logp.dtype
    keep = mask != 0
    m = keep.to(dt)
    zero = logp.new_zeros(())
    # whatever sits at dropped positions (padding, -inf, NaN) never reaches the loss or its gradient
    logp = torch.where(keep, logp, zero)
    adv = torch.where(keep, advantages.detach().to(dt), zero)
    old = torch.where(keep, old_logp.detach().to(dt), zero)
    log_ratio = logp - old

    if ratio == "token":
        r = torch.exp(log_ratio)
    else:  # gspo_token
        n_tok = m.sum(dim=-1, keepdim=True).clamp_min(1)
        log_s = ((log_ratio * m).sum(dim=-1, keepdim=True) / n_tok).detach()
        r = torch.exp(log_s + logp - logp.detach())  # value s_i, gradient s_i · ∇logp_t

    surr = -adv * r
    surr_clipped = -adv * torch.clamp(r, 1.0 - lo, 1.0 + hi)
    per_token = torch.maximum(surr, surr_clipped)
    metrics = {}
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
        metrics["dual_clip_frac"] = _masked_mean(dual_active.to(dt), m).detach()

    pg = aggregate(per_token, m, aggregation, num_items_in_batch)
    loss = pg
    with torch.no_grad():
        rv = r.detach()
        clipped = surr_clipped > surr
        metrics["pg_loss"] = pg.detach()
        metrics["clip_frac"] = _masked_mean(clipped.to(dt), m)
        metrics["clip_frac_low"] = _masked_mean((clipped & (adv < 0)).to(dt), m)
        metrics["clip_frac_high"] = _masked_mean((clipped & (adv > 0)).to(dt), m)
        metrics["ratio_mean"] = _masked_mean(rv, m)
        inf = torch.full_like(rv, float("inf"))
        anyk = keep.any()
        metrics["ratio_min"] = torch.where(anyk, torch.where(keep, rv, inf).amin(), 1.0)
        metrics["ratio_max"] = torch.where(anyk, torch.where(keep, rv, -inf).amax(), 1.0)
        metrics["approx_kl_old"] = _masked_mean(-log_ratio.detach(), m)

    if ref_logp is not None:
        d = torch.where(keep, ref_logp.detach().to(dt), zero) - logp
        k3 = torch.exp(d) - d - 1.0
        metrics["kl"] = _masked_mean(k3.detach(), m)
        if kl_coef != 0:
            loss = loss + kl_coef * aggregate(k3, m, aggregation, num_items_in_batch)
    if entropy is not None:
        ent = torch.where(keep, entropy.to(dt), zero)
        metrics["entropy"] = _masked_mean(ent.detach(), m)
        if entropy_coef != 0:
            loss = loss - entropy_coef * aggregate(ent, m, aggregation, num_items_in_batch)
    return loss, metrics
