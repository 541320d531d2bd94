"""Reference gradient (SPEC, "One mechanism"): ``dz_i = J_i (p p_i - onehot 1[i=y] - uniform
+ entropy p_i (log p_i + H))`` with the coefficients of :class:`~.stats.GradCoefs` and
``J = dz'/dz``."""

import torch

from . import transform
from .row_stats import compute_dtype
from .rows import row_chunks
from .stats import GradCoefs, Transform


def row_grad(logits, target, lse, logp_t, entropy, coefs: GradCoefs, ignore_index, out,
             tr: Transform = Transform(), chunk_elements=None):
    """Write the gradient of ``[B, T, V]`` logits into ``out`` (same shape; may be ``logits``).

    ``lse``, ``logp_t``, ``entropy``: the row statistics ``[B*T]``; ``coefs``: the per-token
    coefficients (already times the upstream gradient over the normaliser). The target's
    element uses ``1 - p_t = -expm1(logp_t)``, so a confident token keeps its gradient.
    Ignored rows get zeros. A kept target outside ``[0, V)`` (on a vocabulary shard: a target
    another shard owns) adds no one-hot term. Returns ``out``.
    """
    dt = compute_dtype(logits.dtype)
    for start, stop, rows in row_chunks(logits, chunk_elements):
        sl = slice(start, stop)
        y = target[sl]
        keep = (y != ignore_index).unsqueeze(1)
        # a kept target outside [0, V) is owned by another vocabulary shard: no one-hot term here
        owned = keep & (y >= 0).unsqueeze(1) & (y < rows.shape[1]).unsqueeze(1)
        y_col = torch.where(owned, y.unsqueeze(1), 0)
        raw = rows.to(dt)
        logp = transform.apply(raw, tr) - lse[sl, None]
        p = logp.exp()
        c_p = coefs.p[sl, None]
        c_onehot = c_p if coefs.onehot is None else coefs.onehot[sl, None]
        d = c_p * p
        p_t = logp_t[sl, None].exp()
        d_y = (c_p - c_onehot) * p_t + c_onehot * torch.expm1(logp_t[sl, None])
        if coefs.entropy is not None:
            h = entropy[sl, None]
            d = d + coefs.entropy[sl, None] * torch.where(p > 0, p * (logp + h), 0)
            d_y = d_y + coefs.entropy[sl, None] * torch.where(p_t > 0, p_t * (logp_t[sl, None] + h), 0)
        d = d.scatter(1, y_col, torch.where(owned, d_y, d.gather(1, y_col)))
        if coefs.uniform is not None:
            d = d - coefs.uniform[sl, None]
        jac = transform.derivative(raw, tr)
        if jac is not None:
            d = d * jac
        b, t0 = divmod(start, logits.shape[1])
        out[b, t0 : t0 + (stop - start)] = torch.where(keep, d, 0)
    return out
