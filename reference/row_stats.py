"""Reference statistics pass: the accumulators of :data:`~.stats.ACCUMULATORS` over a row
(:func:`partial_row_stats`, one vocabulary shard's) and the final formulas that turn them into
:class:`~.stats.RowStats` (:func:`finish_row_stats`), as the kernel does (SPEC)."""

import torch

from . import transform
from .rows import row_chunks
from .stats import ACCUMULATORS, RowStats, Transform, accumulators_for, check_stat_names


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32 whatever the input dtype, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Where ``m - z'_y`` is at least this, ``log p_t`` is formed directly (no cancellation there).
FAR = 30.0
#: Where ``m - z'_y`` is below this, ``log sum p^2`` is formed relative to the target (SPEC).
NEAR = 1.0


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
              extra=frozenset(), chunk_elements=None) -> RowStats:
    """Row statistics of ``[B, T, V]`` logits for ``[B*T]`` int64 targets (SPEC): the
    accumulators of :func:`partial_row_stats` over the whole row, turned into statistics by
    :func:`finish_row_stats`. ``extra``: the optional statistics to compute too (names of
    ``stats.OPTIONAL_STATS``). ``rank`` compares the untransformed logits in their own
    precision (the transform is increasing). NaN or ``+inf`` in a row makes every float
    statistic NaN (``is_top1`` False). Ignored rows: zeros (False).
    """
    z_y = target_logit(logits, target, ignore_index)
    acc = partial_row_stats(logits, target, z_y, ignore_index, tr, extra, chunk_elements)
    return finish_row_stats(acc, z_y, target != ignore_index, tr, logits.shape[-1])


def partial_row_stats(logits: torch.Tensor, target: torch.Tensor, target_logit: torch.Tensor, ignore_index: int,
                      tr: Transform = Transform(), extra=frozenset(), chunk_elements=None) -> dict:
    """The accumulators of one vocabulary shard, ``{name: [B*T]}`` in the compute dtype, for
    the names ``stats.accumulators_for(extra)`` (SPEC: the statistics merge across shards).

    ``target``: ``[B*T]`` shard-local column indices: in ``[0, V_shard)`` where this shard owns
    the target; negative where the target precedes the shard's columns, ``>= V_shard`` where it
    follows them (never ``ignore_index``); ``target_logit``: ``[B*T]`` the global
    *untransformed* target logit (all-reduced beforehand), which the counts compare against.
    ``m``: the shard's max of ``z'`` (``-inf`` if every logit is ``-inf``; NaN for a NaN or
    ``+inf`` row); ``u``, ``a``, ``sum_e2``: the non-target sums ``e_i = exp(z'_i - m)``,
    ``e_i (z'_i - m)``, ``e_i^2``; ``r = #{i : z_i >= z_y}``; ``zsum = sum_i z'_i``;
    ``ties = #{i > y : z_i = z_y}``. Ignored rows: zeros.
    """
    names = accumulators_for(check_stat_names(extra))
    n = target.numel()
    dt = compute_dtype(logits.dtype)
    out = {k: torch.zeros(n, dtype=dt, device=logits.device) for k in names}
    v_size = logits.shape[-1]
    cols = torch.arange(v_size, device=logits.device)
    for start, stop, rows in row_chunks(logits, chunk_elements):
        y = target[start:stop]
        keep = y != ignore_index
        owned = keep & (y >= 0) & (y < v_size)
        y_col = torch.where(owned, y, 0).unsqueeze(1)
        raw = rows.to(dt)  # exact: the logits' dtype embeds in dt
        zy_raw = target_logit[start:stop].to(dt)[:, None]
        z = transform.apply(raw, tr)
        bad = (z.isnan() | z.isposinf()).any(1)
        m = torch.where(bad, float("nan"), z.amax(1))
        m_ref = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf only: the sums are 0
        e = torch.exp(z - m_ref[:, None])
        e = torch.where(owned[:, None], e.scatter(1, y_col, 0.0), e)  # the target's term is not in the sums
        part = {"m": m, "u": e.sum(1), "a": torch.where(e > 0, e * (z - m_ref[:, None]), 0).sum(1),
                "r": (raw >= zy_raw).sum(1).to(dt)}
        if "zsum" in out:
            part["zsum"] = z.sum(1)
        if "sum_e2" in out:
            part["sum_e2"] = (e * e).sum(1)
        if "ties" in out:
            part["ties"] = ((raw == zy_raw) & (cols > y[:, None])).sum(1).to(dt)
        for k, buf in out.items():
            buf[start:stop] = torch.where(keep, part[k], 0)
    return out


def rescale_accumulators(acc: dict, big_m) -> dict:
    """A shard's accumulators ``acc`` but the max, rescaled from its max ``acc["m"]`` to
    ``big_m`` (the group's, at least as large), each by its rule in ``ACCUMULATORS``: summed
    over the shards, they are the whole row's accumulators (SPEC, "Vocabulary shards")."""
    dt = big_m.dtype
    m = acc["m"].to(dt)
    m_ref = torch.where(big_m == float("-inf"), 0.0, big_m)
    scale = torch.exp(m - m_ref)  # 0 for a shard of -inf logits only
    shift = torch.where(m == float("-inf"), 0.0, m - m_ref)
    rescaled = {"sum": lambda x: x, "scaled": lambda x: x * scale, "scaled2": lambda x: x * (scale * scale),
                "entropy": lambda x: (x + shift * acc["u"].to(dt)) * scale}
    return {a.name: rescaled[a.merge](acc[a.name].to(dt)) for a in ACCUMULATORS if a.merge != "max" and a.name in acc}


def finish_row_stats(acc: dict, target_logit, keep, tr: Transform = Transform(), v_size: int = 1) -> RowStats:
    """``RowStats`` from the accumulators ``acc`` of whole rows (:func:`partial_row_stats`'s
    names, e.g. merged over vocabulary shards; each optional statistic whose accumulator is
    present is computed), the untransformed target logit and ``v_size`` columns: the final
    formulas of the statistics kernel (SPEC, "Confident tokens" and "Returned statistics")."""
    m, u, r = acc["m"], acc["u"], acc["r"]
    zy = transform.apply(target_logit.to(m.dtype), tr)
    d = m - zy
    far = ~(d < FAR)
    e_y = torch.exp(-d)
    s = u + e_y
    nll = torch.where(far, d + torch.log(s), torch.log1p(u * torch.exp(torch.where(far, 0.0, d))))
    log_s = torch.where(far, torch.log(s), nll - d)
    a = acc["a"] + torch.where(e_y > 0, -d * e_y, 0)
    out = {"lse": m + log_s, "logp_t": -nll, "target_logit": zy, "max_logit": m, "entropy": log_s - a / s,
           "rank": r.round().long()}
    if "zsum" in acc:
        out["logit_mean"] = acc["zsum"] / v_size
    if "sum_e2" in acc:
        w, near = acc["sum_e2"], d < NEAR
        out["log_sum_p2"] = torch.where(near, torch.log1p(w * torch.exp(2 * torch.where(near, d, 0.0))) - 2 * nll,
                                        torch.log(w + e_y * e_y) - 2 * log_s)
    if "ties" in acc:
        out["is_top1"] = ((r - acc["ties"]).round() == 1) & ~out["lse"].isnan()
    return RowStats(**{k: torch.where(keep, v, False if v.dtype == torch.bool else 0) for k, v in out.items()})
