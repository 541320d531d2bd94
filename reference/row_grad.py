"""Reference gradient: ``dz_i = gw_t (p_i - 1[i=y]) + gb_t p_i (log p_i + H_t)``."""

import torch

from .row_stats import compute_dtype
from .rows import row_chunks


def row_grad(logits, target, lse, entropy, gw, gb, ignore_index, out, chunk_elements=None):
    """Write the gradient of ``[B, T, V]`` logits into ``out`` (same shape; may be ``logits``).

    ``lse``, ``entropy``: the row statistics ``[B*T]``; ``gw = g_t * w_t`` and
    ``gb = g_t * beta_t`` (``None`` for no entropy term), ``g_t`` the upstream gradient
    over the normaliser. Ignored rows get zeros. Returns ``out``.
    """
    dt = compute_dtype(logits.dtype)
    for start, stop, rows in row_chunks(logits, chunk_elements):
        y = target[start:stop]
        keep = (y != ignore_index).unsqueeze(1)
        logp = rows.to(dt) - lse[start:stop, None]
        p = logp.exp()
        onehot = torch.zeros_like(p).scatter_(1, torch.where(keep, y.unsqueeze(1), 0), 1.0)
        d = gw[start:stop, None] * (p - onehot)
        if gb is not None:
            d = d + gb[start:stop, None] * torch.where(p > 0, p * (logp + entropy[start:stop, None]), 0)
        b, t0 = divmod(start, logits.shape[1])
        out[b, t0 : t0 + (stop - start)] = torch.where(keep, d, 0)
    return out
