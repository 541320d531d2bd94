"""Reference row statistics: ``lse``, ``z_y``, ``max z``, entropy and rank per token."""

import torch

from ranktuner_kernels.objectives import RowStats

from .rows import row_chunks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32 whatever the input dtype, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_stats(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk_elements=None) -> RowStats:
    """Row statistics of ``[B, T, V]`` logits for ``[B*T]`` int64 targets.

    ``lse = log sum exp z``; ``H = -sum p_i log p_i`` (terms with ``p_i = 0`` count 0);
    ``rank = #{i : z_i >= z_y}`` compared in the logits' own precision. Ignored rows: zeros.
    """
    n = target.numel()
    dt = compute_dtype(logits.dtype)
    out = [torch.zeros(n, dtype=dt, device=logits.device) for _ in range(4)]
    rank = torch.zeros(n, dtype=torch.int64, device=logits.device)
    for start, stop, rows in row_chunks(logits, chunk_elements):
        y = target[start:stop]
        keep = y != ignore_index
        y_safe = torch.where(keep, y, 0).unsqueeze(1)
        z_y_raw = rows.gather(1, y_safe)
        rank_c = (rows >= z_y_raw).sum(1)
        z = rows.to(dt)
        lse = torch.logsumexp(z, dim=1)
        # NaN or +inf anywhere in the row: every statistic is NaN, never a finite wrong number
        lse = torch.where((z.isnan() | z.isposinf()).any(1), float("nan"), lse)
        logp = z - lse.unsqueeze(1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, 0).sum(1)
        entropy = torch.where(lse.isnan(), lse, entropy)
        stats_c = (lse, z_y_raw.squeeze(1).to(dt), z.amax(1), entropy)
        for o, s in zip(out, stats_c):
            o[start:stop] = torch.where(keep, s, 0)
        rank[start:stop] = torch.where(keep, rank_c, 0)
    return RowStats(*out, rank)
