"""Entropy of the softmax over each row's ``k`` largest logits (EAFT)."""

import torch

from .row_stats import compute_dtype
from .rows import row_chunks


def topk_entropy(logits, target, k, ignore_index, chunk_elements=None):
    """``[B*T]`` entropy (nats) of ``softmax(topk(z, min(k, V)))`` per row; ignored rows: 0.

    Used by both the reference and the kernel path: EAFT's top-K needs a sort-like pass
    that the streaming kernels do not carry, and ``torch.topk`` is exact.
    """
    dt = compute_dtype(logits.dtype)
    out = torch.zeros(target.numel(), dtype=dt, device=logits.device)
    k = min(k, logits.shape[-1])
    for start, stop, rows in row_chunks(logits, chunk_elements):
        top = rows.topk(k, dim=1, sorted=False).values.to(dt)
        logp = torch.log_softmax(top, dim=1)
        h = -torch.where(logp.exp() > 0, logp.exp() * logp, 0).sum(1)
        h = torch.where(top.isnan().any(1), float("nan"), h)
        keep = target[start:stop] != ignore_index
        out[start:stop] = torch.where(keep, h, 0)
    return out
