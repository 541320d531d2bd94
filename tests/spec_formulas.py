"""SPEC.md written out naively in float64, independent of the library's code paths.

Materialises the full softmax, takes gradients with autograd: through ``p`` for the f(p)
weightings (alpha_power, focal), through ``H`` for entropy_reg, and through ``-log p_t``
with detached weights elsewhere; through ``c tanh(z / c) / T`` for the soft-cap and the
temperature, through the smoothing term (times the detached ``w`` of SPEC's table) and
through ``lam lse^2``. ``obj`` may be any object with the weighting's ``name`` and options
(a ``types.SimpleNamespace`` pins documented defaults independently of the dataclasses).

Each weighting's oracle is a function in :data:`ORACLES` (name -> ``oracle(q, obj)``) that
returns ``(value, w_table)``: the per-token value as an autograd expression of the naive
quantities in ``q`` (:class:`Quantities`), and SPEC's ``w`` column where the value is not
``w * (-log p_t)`` (else None). :func:`oracle` registers one (a test module may register its
own weighting's oracle for a while: ``ORACLES.pop(name)`` removes it).
"""

import math
from types import SimpleNamespace

import torch

#: name -> oracle(q, obj) -> (value, w_table or None)
ORACLES = {}


def oracle(name):
    """Decorator: register ``fn`` as the oracle of the weighting ``name``."""

    def deco(fn):
        ORACLES[name] = fn
        return fn

    return deco


class Quantities(SimpleNamespace):
    """The naive float64 quantities of one batch, ``[N]`` each unless noted: ``z_raw`` (``[N, V]``,
    the logits before the cap and temperature), ``z`` (``[N, V]``, after), ``logp_all`` (``[N, V]``),
    ``y0`` (targets, 0 where ignored), ``keep``, ``shape`` (the target's shape), ``logp``, ``p``,
    ``nll``, ``entropy`` (nats), ``z_y``, ``p_max``; ``d`` detaches."""


def _rank(z, z_y):
    return (z >= z_y[:, None]).sum(-1).double()


def _s_of_h(h_bits, p_max):
    return torch.where(h_bits >= 2, 2.0**h_bits / 4 + 1, 2 - p_max)


def _xi(r, s, mode):
    if mode == "max":
        return torch.maximum(r, s)
    if mode == "arith":
        return (r + s) / 2
    if mode == "geo":
        return (r * s).sqrt()
    out = []
    for ri, si in zip(r.tolist(), s.tolist()):
        if abs(math.log(ri) - math.log(si)) < 1e-4:
            out.append((ri + si) / 2)
        else:
            out.append((ri - si) / (math.log(ri) - math.log(si)))
    return torch.tensor(out, dtype=torch.float64)


def _k(xi, mode):
    k = 1.0 / torch.log2(xi + 1) ** 2
    return k * xi / (xi + 1) if mode == "cmvt" else k


def d(t):
    return t.detach()


@oracle("sft")
def _sft(q, obj):
    return q.nll, None


@oracle("dft")
def _dft(q, obj):
    return d(q.p) * q.nll, None


@oracle("ranktuner")
def _ranktuner(q, obj):
    r = _rank(d(q.z_raw), d(q.z_raw.gather(1, q.y0[:, None])[:, 0]))
    s = _s_of_h(d(q.entropy) / math.log(2), d(q.p_max))
    k = _k(_xi(r, s, obj.xi), obj.k)
    if obj.ablation is None:
        base = d(q.p) * s
        if obj.clamp_min is not None:
            base = torch.clamp(base, min=obj.clamp_min)
    elif obj.ablation == "no_prob":
        base = s
    else:
        base = d(q.p)
    scale = base ** (-k)
    w = scale * (d(q.p) if obj.w0 == "p" else 1.0)
    return d(w) * q.nll, None


@oracle("talr")
def _talr(q, obj):
    if obj.tau is not None:
        tau = obj.tau
    else:
        nll2 = torch.where(q.keep, d(q.nll), 0).reshape(q.shape)
        cnt = q.keep.reshape(q.shape).sum(1)
        means = sorted((nll2.sum(1)[cnt > 0] / cnt[cnt > 0]).tolist())
        mid = len(means) // 2
        tau = means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2
    w = torch.clamp(torch.clamp(d(q.p), min=1e-6) ** (1 / tau), min=obj.w_min)
    return w * q.nll, None


@oracle("eaft")
def _eaft(q, obj):
    top = d(q.z).topk(min(obj.k, q.z.shape[1]), -1).values
    soft = torch.softmax(top, -1)
    h_top = -(soft * soft.log()).sum(-1)
    return (h_top / obj.norm) ** obj.alpha * q.nll, None


@oracle("overtone")
def _overtone(q, obj):
    is_max = d(q.z_y) >= d(q.z).max(-1).values
    return torch.where(is_max, obj.lam, 1.0) * q.nll, None


@oracle("alpha_power")
def _alpha_power(q, obj):
    return (1 - q.p**obj.alpha) / obj.alpha, d(q.p) ** obj.alpha


@oracle("threshold")
def _threshold(q, obj):
    return ((d(q.p) >= obj.low) & (d(q.p) <= obj.high)).double() * q.nll, None


@oracle("entropy_reg")
def _entropy_reg(q, obj):
    return q.nll - obj.alpha * q.entropy, torch.ones_like(q.nll)


@oracle("focal")
def _focal(q, obj):
    value = -((1 - q.p) ** obj.gamma) * q.logp
    c, pp = 1 - d(q.p), d(q.p)
    w_table = c ** (obj.gamma - 1) * (c - obj.gamma * pp * d(q.logp)) if obj.gamma != 0 else torch.ones_like(c)
    return value, w_table


def spec_loss(logits, target, obj, *, ignore_index=-100, reduction="mean", num_items=None,
              token_weight=None, sequence_weight=None, softcap=None, temperature=1.0, label_smoothing=0.0,
              z_loss=0.0):
    """``logits [..., V]`` float64 (requires grad), ``target [...]``; ``obj`` a config object."""
    shape = target.shape
    z_raw = logits.reshape(-1, logits.shape[-1])
    z = z_raw if softcap is None else softcap * torch.tanh(z_raw / softcap)
    z = z / temperature
    y = target.reshape(-1)
    keep = y != ignore_index
    y0 = torch.where(keep, y, 0)
    logp_all = torch.log_softmax(z, -1)
    p_all = logp_all.exp()
    logp = logp_all.gather(1, y0[:, None])[:, 0]
    q = Quantities(z_raw=z_raw, z=z, logp_all=logp_all, y0=y0, keep=keep, shape=shape, logp=logp, p=logp.exp(),
                   nll=-logp, entropy=-(p_all * logp_all).sum(-1), z_y=z.gather(1, y0[:, None])[:, 0],
                   p_max=p_all.max(-1).values, d=d)
    if obj.name not in ORACLES:
        raise ValueError(f"no oracle for {obj.name!r}")
    value, w_table = ORACLES[obj.name](q, obj)
    nll = q.nll
    if label_smoothing:
        w = w_table if w_table is not None else d(value) / d(nll)  # value = w * (-log p_t)
        smooth = -logp_all.mean(-1)  # the cross-entropy against the uniform distribution
        value = value + label_smoothing * w * (smooth - nll)
    mult = torch.ones_like(value)
    if token_weight is not None:
        mult = mult * token_weight.reshape(-1).double()
    if sequence_weight is not None:
        mult = mult * sequence_weight.double()[:, None].expand(shape).reshape(-1)
    value = value * mult
    if z_loss:
        value = value + z_loss * torch.logsumexp(z, -1) ** 2
    value = torch.where(keep, value, 0)
    if reduction == "none":
        return value.reshape(shape)
    if reduction == "sum":
        return value.sum()
    n = keep.sum().double() if num_items is None else torch.tensor(float(num_items), dtype=torch.float64)
    return value.sum() / n.clamp(min=1)
