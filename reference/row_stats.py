"""Reference row statistics: ``lse``, ``log p_t``, ``z'_y``, ``max z'``, entropy and rank."""

import torch

from . import transform
from .rows import row_chunks
from .stats import RowStats, Transform


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32 whatever the input dtype, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Where ``m - z'_y`` is at least this, ``log p_t`` is formed directly (no cancellation there).
FAR = 30.0


def target_logit(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[B*T]`` the untransformed target logit ``z_y`` of each row of ``[B, T, V]`` logits, in
    the compute dtype (the logits' dtype embeds in it exactly); ``-inf`` where the row is
    ignored or its target is not a column of these logits (another vocabulary shard's)."""
    t_size, v_size = max(logits.shape[1], 1), logits.shape[-1]
    rows = torch.arange(target.numel(), device=logits.device)
    owned = (target != ignore_index) & (target >= 0) & (target < v_size)
    z_y = logits[rows // t_size, rows % t_size, torch.where(owned, target, 0)].to(compute_dtype(logits.dtype))
    return torch.where(owned, z_y, float("-inf"))


def row_stats(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, tr: Transform = Transform(),
              with_mean: bool = False, chunk_elements=None) -> RowStats:
    """Row statistics of ``[B, T, V]`` logits for ``[B*T]`` int64 targets (SPEC): the
    accumulators of :func:`partial_row_stats` over the whole row, turned into statistics by
    :func:`finish_row_stats` (``H = log s - sum_i e_i (z'_i - m) / s``, ``-log p_t`` from the
    non-target mass). ``rank`` compares the untransformed logits in their own precision (the
    transform is increasing). NaN or ``+inf`` in a row makes every statistic NaN. Ignored rows:
    zeros. ``with_mean``: also ``logit_mean`` (label smoothing).
    """
    z_y = target_logit(logits, target, ignore_index)
    acc = partial_row_stats(logits, target, z_y, ignore_index, tr, with_mean, chunk_elements)
    return finish_row_stats(*acc, z_y, target != ignore_index, tr, logits.shape[-1])


def partial_row_stats(logits: torch.Tensor, target: torch.Tensor, target_logit: torch.Tensor, ignore_index: int,
                      tr: Transform = Transform(), with_mean: bool = False, chunk_elements=None):
    """The raw accumulators of one vocabulary shard (SPEC: the statistics merge across shards).

    ``target``: ``[B*T]`` shard-local indices: in ``[0, V_shard)`` where this shard owns the
    target, any other value but ``ignore_index`` where it does not; ``target_logit``: ``[B*T]``
    the global *untransformed* target logit (all-reduced beforehand), which the rank compares
    against. Returns ``(m, u, a, r, zsum)`` per row, in the compute dtype: the shard's max
    ``m`` of ``z'`` (``-inf`` if every logit is ``-inf``; NaN for a NaN or ``+inf`` row), the
    non-target mass ``u = sum_{i != y} exp(z'_i - m)`` and ``a = sum_{i != y} exp(z'_i - m)
    (z'_i - m)`` (over this shard's columns, the target's own term left out), the count
    ``r = #{i : z_i >= z_y}`` and ``zsum = sum_i z'_i`` (``None`` unless ``with_mean``).
    Ignored rows: zeros. :func:`finish_row_stats` turns merged accumulators into ``RowStats``.
    """
    n = target.numel()
    dt = compute_dtype(logits.dtype)
    m_out, u_out, a_out, r_out = (torch.zeros(n, dtype=dt, device=logits.device) for _ in range(4))
    z_out = torch.zeros(n, dtype=dt, device=logits.device) if with_mean else None
    v_size = logits.shape[-1]
    for start, stop, rows in row_chunks(logits, chunk_elements):
        y = target[start:stop]
        keep = y != ignore_index
        owned = keep & (y >= 0) & (y < v_size)
        y_col = torch.where(owned, y, 0).unsqueeze(1)
        zy_raw = target_logit[start:stop].to(dt)
        r = (rows.to(dt) >= zy_raw[:, None]).sum(1)  # exact: the logits' dtype embeds in dt
        z = transform.apply(rows.to(dt), tr)
        bad = (z.isnan() | z.isposinf()).any(1)
        m = torch.where(bad, float("nan"), z.amax(1))
        m_ref = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf only: u = a = 0
        e = torch.exp(z - m_ref[:, None])
        e = torch.where(owned[:, None], e.scatter(1, y_col, 0.0), e)  # the target's term is not in u, a
        u = e.sum(1)
        a = torch.where(e > 0, e * (z - m_ref[:, None]), 0).sum(1)
        for o, x in ((m_out, m), (u_out, u), (a_out, a), (r_out, r.to(dt))):
            o[start:stop] = torch.where(keep, x, 0)
        if with_mean:
            z_out[start:stop] = torch.where(keep, z.sum(1), 0)
    return m_out, u_out, a_out, r_out, z_out


def finish_row_stats(m, u, a, r, zsum, target_logit, keep, tr: Transform = Transform(), v_size: int = 1) -> RowStats:
    """``RowStats`` from the accumulators of a whole row (e.g. merged over vocabulary shards):
    the row max ``m`` of ``z'``, ``u`` and ``a`` rescaled to ``m`` (the target's term left out),
    the count ``r``, ``zsum`` (or None) over ``v_size`` columns, the untransformed target
    logit; the final formulas of the statistics kernel (SPEC, "Confident tokens")."""
    zy = transform.apply(target_logit.to(m.dtype), tr)
    d = m - zy
    far = ~(d < FAR)
    e_y = torch.exp(-d)
    s = u + e_y
    nll = torch.where(far, d + torch.log(s), torch.log1p(u * torch.exp(torch.where(far, 0.0, d))))
    log_s = torch.where(far, torch.log(s), nll - d)
    a = a + torch.where(e_y > 0, -d * e_y, 0)
    entropy = log_s - a / s

    def masked(x):
        return torch.where(keep, x, 0)

    mean = None if zsum is None else masked(zsum / v_size)
    return RowStats(masked(m + log_s), masked(-nll), masked(zy), masked(m), masked(entropy),
                    torch.where(keep, r.round().long(), 0), mean)
