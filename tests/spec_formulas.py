"""SPEC.md written out naively in float64, independent of the library's code paths.

Materialises the full softmax, takes gradients with autograd: through ``p`` for the f(p)
weightings (alpha_power, focal), through ``H`` for entropy_reg, and through ``-log p_t``
with detached weights elsewhere; through ``c tanh(z / c) / T`` for the soft-cap and the
temperature, through the smoothing term (times the detached ``w`` of SPEC's table) and
through ``lam lse^2``. ``obj`` may be any object with the weighting's ``name`` and options
(a ``types.SimpleNamespace`` pins documented defaults independently of the dataclasses).
"""

import math

import torch


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
    p = logp.exp()
    entropy = -(p_all * logp_all).sum(-1)
    z_y = z.gather(1, y0[:, None])[:, 0]
    p_max = p_all.max(-1).values
    name = obj.name
    nll = -logp
    d = lambda t: t.detach()  # noqa: E731
    w_table = None  # SPEC's w column where the value is not w * (-log p_t)
    if name == "sft":
        value = nll
    elif name == "dft":
        value = d(p) * nll
    elif name == "ranktuner":
        r = _rank(d(z_raw), d(z_raw.gather(1, y0[:, None])[:, 0]))
        s = _s_of_h(d(entropy) / math.log(2), d(p_max))
        k = _k(_xi(r, s, obj.xi), obj.k)
        if obj.ablation is None:
            base = d(p) * s
            if obj.clamp_min is not None:
                base = torch.clamp(base, min=obj.clamp_min)
        elif obj.ablation == "no_prob":
            base = s
        else:
            base = d(p)
        scale = base ** (-k)
        w = scale * (d(p) if obj.w0 == "p" else 1.0)
        value = d(w) * nll
    elif name == "talr":
        if obj.tau is not None:
            tau = obj.tau
        else:
            nll2 = torch.where(keep, d(nll), 0).reshape(shape)
            cnt = keep.reshape(shape).sum(1)
            means = sorted((nll2.sum(1)[cnt > 0] / cnt[cnt > 0]).tolist())
            mid = len(means) // 2
            tau = means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2
        w = torch.clamp(torch.clamp(d(p), min=1e-6) ** (1 / tau), min=obj.w_min)
        value = w * nll
    elif name == "eaft":
        top = d(z).topk(min(obj.k, z.shape[1]), -1).values
        q = torch.softmax(top, -1)
        h_top = -(q * q.log()).sum(-1)
        value = (h_top / obj.norm) ** obj.alpha * nll
    elif name == "overtone":
        is_max = d(z_y) >= d(z).max(-1).values
        value = torch.where(is_max, obj.lam, 1.0) * nll
    elif name == "alpha_power":
        value = (1 - p**obj.alpha) / obj.alpha
        w_table = d(p) ** obj.alpha
    elif name == "threshold":
        value = ((d(p) >= obj.low) & (d(p) <= obj.high)).double() * nll
    elif name == "entropy_reg":
        value = nll - obj.alpha * entropy
        w_table = torch.ones_like(nll)
    elif name == "focal":
        value = -((1 - p) ** obj.gamma) * logp
        q, pp = 1 - d(p), d(p)
        w_table = q ** (obj.gamma - 1) * (q - obj.gamma * pp * d(logp)) if obj.gamma != 0 else torch.ones_like(q)
    else:
        raise ValueError(name)
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
