"""Entropy of the softmax over each row's ``k`` largest logits (EAFT)."""

import torch

from . import transform
from .row_stats import compute_dtype
from .rows import row_chunks
from .stats import Transform


def top_values(logits, target, k, ignore_index, tr: Transform = Transform(), chunk_elements=None):
    """``[B*T, min(k, V)]`` the ``k`` largest transformed logits ``z'`` of each row (unsorted;
    ignored rows: ``-inf``). A vocabulary shard's candidates for the global top-K."""
    dt = compute_dtype(logits.dtype)
    k = min(k, logits.shape[-1])
    out = torch.full((target.numel(), k), float("-inf"), dtype=dt, device=logits.device)
    for start, stop, rows in row_chunks(logits, chunk_elements):
        top = transform.apply(rows.topk(k, dim=1, sorted=False).values.to(dt), tr)
        keep = target[start:stop] != ignore_index
        out[start:stop] = torch.where(keep[:, None], top, float("-inf"))
    return out


def entropy_of_values(top):
    """``[C]`` entropy (nats) of ``softmax`` over each row of ``top [C, K]`` (``-inf``: no mass)."""
    # H = log s - sum_i e_i (z_i - m) / s with s = 1 + u, u the mass besides the max:
    # log1p(u) keeps a confident row's tiny entropy (log_softmax would cancel it away)
    m, arg = top.max(1, keepdim=True)
    e = torch.exp(top - m)
    u = e.scatter(1, arg, 0.0).sum(1)
    a = torch.where(e > 0, e * (top - m), 0).sum(1)
    h = torch.log1p(u) - a / (1 + u)
    return torch.where(top.isnan().any(1), float("nan"), h)


def topk_entropy(logits, target, k, ignore_index, tr: Transform = Transform(), chunk_elements=None):
    """``[B*T]`` entropy (nats) of ``softmax(topk(z', min(k, V)))`` per row; ignored rows: 0.

    Used by both the reference and the kernel path: EAFT's top-K needs a sort-like pass
    that the streaming kernels do not carry, and ``torch.topk`` is exact.
    """
    dt = compute_dtype(logits.dtype)
    out = torch.zeros(target.numel(), dtype=dt, device=logits.device)
    k = min(k, logits.shape[-1])
    for start, stop, rows in row_chunks(logits, chunk_elements):
        top = transform.apply(rows.topk(k, dim=1, sorted=False).values.to(dt), tr)
        keep = target[start:stop] != ignore_index
        out[start:stop] = torch.where(keep, entropy_of_values(top), 0)
    return out
