"""Row statistics in one streaming pass over the vocabulary, with the weighting's formula.

For each row (``V`` logits, any float dtype, accumulated in float32) and target ``y``, on
the transformed logits ``z' = c tanh(z / c) / T``: online max ``m``, the rescaled non-target
mass ``u = sum_{i != y} exp(z'_i - m)``, the rescaled entropy sum
``a = sum_i exp(z'_i - m)(z'_i - m)``, the rank count ``r = #{z_i >= z_y}`` (on the raw
logits); one tile at a time. Then (SPEC, "Confident tokens"), with ``d = m - z'_y``:
``-log p_t = log1p(u e^d)``, ``1 - p_t = u e^d / (1 + u e^d)``, ``log s = -log p_t - d``,
``lse = m + log s``, ``H = log s - a / s`` (the direct forms where ``d >= 30``). (Per-lane
accumulators measured slower on an H100: 1.98 vs 1.25 ms at N=8192, V=152064.)

The optional statistics (``reference.stats.ROW_STATS``) each add one accumulator behind a
``tl.constexpr`` switch, off unless the caller asks (``extra``): ``HAS_MEAN`` (``sum_i z'_i``:
``logit_mean``), ``HAS_SUM_P2`` (``sum_{i != y} e^{2(z'_i - m)}``: ``log_sum_p2``) and
``HAS_TOP1`` (ties after the target, ``#{i > y : z_i = z_y}``: ``is_top1 = (r - ties == 1)``).

Where the weighting needs only the row's own statistics (every one but TALR and EAFT), its
Triton formula (``FORMULA``, from ``weightings.py``) runs in registers too and writes
``value``, ``w`` and ``beta`` times the caller's per-token ``scale``. One program per row;
ignored rows load nothing and store zeros.

``PARTIAL`` (a vocabulary shard, ``ranktuner_kernels._distributed``): the target logit comes
from a pointer (the global one, all-reduced beforehand; the counts compare against it), the
target's column is the shard-local index (negative where the target precedes the shard's
columns, ``>= V`` where it follows them), and the kernel stores the raw accumulators
(``reference.stats.ACCUMULATORS``) for the caller to merge across shards instead of the final
formulas. The single-process launch is unchanged (``PARTIAL`` is a ``tl.constexpr``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import AUTOTUNE, autotune_configs, fixed_config, row_offsets
from .fmath import expm1, log1p, transform

#: ``m - z'_y`` from which ``-log p_t`` is formed directly (mirrors ``reference.row_stats.FAR``).
FAR = tl.constexpr(30.0)
#: ``m - z'_y`` below which ``log sum p^2`` is formed relative to the target (``reference.row_stats.NEAR``).
NEAR = tl.constexpr(1.0)
#: ``log2 e``: ``exp(x) = exp2(x log2 e)`` (the GPU's exponential is a base-2 instruction).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: ``(z' - m) log2 e`` is clamped from below here: ``exp2`` of it is 0 in float32 and ``0 * t`` stays
#: 0 for a ``-inf`` logit (a NaN still propagates).
FLOOR = tl.constexpr(-1000.0)


@triton.jit
def _tile(base, start, cols, y, zy_raw, v_live, after, m, u, a, r, zsum, sum_e2, ties, softcap, inv_temperature,
          MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, HAS_MEAN: tl.constexpr,
          HAS_SUM_P2: tl.constexpr, HAS_TOP1: tl.constexpr):
    """One ``BLOCK_V`` tile of the row into the per-lane accumulators ``u, a, r, zsum, sum_e2,
    ties`` (``[BLOCK_V]`` float32 each, relative to the running max ``m``, a scalar; ``a`` in
    units of ``log2 e``: ``sum e (z' - m) log2 e``; the counts ``r``, ``ties`` in float32, exact
    below 2^24 per lane). ``MASKED``: the ragged tail or the target's tile (columns past
    ``v_live`` are padding, the target's term is left out of the sums); otherwise a full tile
    without the target, with no mask or compare (``after``: 1.0 if it lies after the target's
    column, else 0.0). One block reduction per tile (the max); the lanes are summed once per row
    by the caller."""
    if MASKED:
        idx = start + cols
        mask = idx < v_live
        z_raw = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        r += tl.where((z_raw >= zy_raw) & mask, 1.0, 0.0)
        if HAS_TOP1:
            ties += tl.where((z_raw == zy_raw) & mask & (idx > y), 1.0, 0.0)
    else:
        z_raw = tl.load(base + start + cols).to(tl.float32)
        r += tl.where(z_raw >= zy_raw, 1.0, 0.0)
        if HAS_TOP1:
            ties += tl.where(z_raw == zy_raw, after, 0.0)
    z = transform(z_raw, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    if MASKED:
        if HAS_SOFTCAP:
            z = tl.where(mask, z, float("-inf"))  # the padding, not c tanh(-inf) = -c
        if HAS_MEAN:
            zsum += tl.where(mask, z, 0.0)
    elif HAS_MEAN:
        zsum += z
    m_new = tl.maximum(m, tl.max(z, axis=0))
    if m_new > m:  # rare once the row's max is seen: rescale the lanes to the new max
        shift = tl.where(m == float("-inf"), 0.0, (m - m_new) * LOG2E)  # the sums are 0 while m = -inf
        alpha = tl.exp2(shift)
        a = (a + shift * u) * alpha
        u = u * alpha
        if HAS_SUM_P2:
            sum_e2 = sum_e2 * (alpha * alpha)
        m = m_new
    # t = (z' - m) log2 e in one FMA; a is accumulated in these units (times ln 2 at the end)
    m2 = tl.where(m == float("-inf"), 0.0, m) * LOG2E
    t = tl.maximum(z * LOG2E - m2, FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(t)
    if MASKED:
        e = tl.where(start + cols == y, 0.0, e)  # the target's term is added at the end
    u += e
    a += e * t
    if HAS_SUM_P2:
        sum_e2 += e * e
    return m, u, a, r, zsum, sum_e2, ties


@triton.heuristics({"HAS_SCALE": lambda args: args["scale_ptr"] is not None,
                    "HAS_MEAN": lambda args: args["mean_ptr"] is not None,
                    "HAS_SUM_P2": lambda args: args["sum_p2_ptr"] is not None,
                    "HAS_TOP1": lambda args: args["top1_ptr"] is not None,
                    "HAS_TERMS": lambda args: args["value_ptr"] is not None,
                    "PARTIAL": lambda args: args["zy_in_ptr"] is not None})
@triton.jit
def _row_stats_kernel(
    logits_ptr, target_ptr,
    lse_ptr, logp_ptr, zy_ptr, max_ptr, ent_ptr, rank_ptr, mean_ptr, sum_p2_ptr, top1_ptr,
    value_ptr, w_ptr, beta_ptr, scale_ptr, zy_in_ptr,
    softcap, inv_temperature, P0, P1,
    T, stride_b, stride_t, V, ignore_index,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_SUM_P2: tl.constexpr, HAS_TOP1: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_TERMS: tl.constexpr, FORMULA: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    S3: tl.constexpr, PARTIAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    in_row = keep & (y >= 0) & (y < V)
    if PARTIAL:  # a vocabulary shard: the global target logit, all-reduced by the caller
        zy_raw = tl.load(zy_in_ptr + row)
    else:
        # column 0 always exists; an out-of-range target (reported by the caller) reads it too
        zy_raw = tl.load(base + tl.where(in_row, y, 0)).to(tl.float32)
    zy = transform(zy_raw, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)

    cols = tl.arange(0, BLOCK_V)
    v_live = tl.where(keep, V, 0)  # ignored rows load nothing
    n_full = v_live // BLOCK_V  # full tiles
    t_y = tl.where(in_row, y // BLOCK_V, n_full).to(tl.int32)  # the target's tile (n_full: none is full)
    has_t_y = (t_y < n_full).to(tl.int32)
    m = float("-inf")  # running max of z'
    u = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum_{i != y} exp(z'_i - m)
    a = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum_{i != y} exp(z'_i - m) * (z'_i - m)
    r = tl.zeros([BLOCK_V], tl.float32)  # per lane: #{z_i >= z_y}
    zsum = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum_i z'_i (HAS_MEAN)
    sum_e2 = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum_{i != y} exp(2 (z'_i - m)) (HAS_SUM_P2)
    ties = tl.zeros([BLOCK_V], tl.float32)  # per lane: #{i > y : z_i = z_y} (HAS_TOP1)
    # the full tiles but the target's, mask-free
    for k in range(0, n_full - has_t_y):
        start = (k + (k >= t_y).to(tl.int32)) * BLOCK_V
        after = (start > y).to(tl.float32)
        m, u, a, r, zsum, sum_e2, ties = _tile(base, start, cols, y, zy_raw, v_live, after, m, u, a, r, zsum, sum_e2,
                                               ties, softcap, inv_temperature, False, HAS_SOFTCAP, HAS_TEMPERATURE,
                                               HAS_MEAN, HAS_SUM_P2, HAS_TOP1)
    if has_t_y > 0:  # the target's tile, once
        m, u, a, r, zsum, sum_e2, ties = _tile(base, t_y * BLOCK_V, cols, y, zy_raw, v_live, 0.0, m, u, a, r, zsum,
                                               sum_e2, ties, softcap, inv_temperature, True, HAS_SOFTCAP,
                                               HAS_TEMPERATURE, HAS_MEAN, HAS_SUM_P2, HAS_TOP1)
    if n_full * BLOCK_V < v_live:  # the ragged tail
        m, u, a, r, zsum, sum_e2, ties = _tile(base, n_full * BLOCK_V, cols, y, zy_raw, v_live, 0.0, m, u, a, r, zsum,
                                               sum_e2, ties, softcap, inv_temperature, True, HAS_SOFTCAP,
                                               HAS_TEMPERATURE, HAS_MEAN, HAS_SUM_P2, HAS_TOP1)
    u = tl.sum(u, axis=0)
    a = tl.sum(a, axis=0) * LN2
    r = tl.sum(r.to(tl.int32), axis=0)
    zsum = tl.sum(zsum, axis=0)
    sum_e2 = tl.sum(sum_e2, axis=0)
    ties = tl.sum(ties.to(tl.int32), axis=0)

    if PARTIAL:  # the raw accumulators, merged across shards by the caller (slots: _PARTIAL_SLOTS)
        tl.store(max_ptr + row, tl.where(keep, m, 0.0))
        tl.store(lse_ptr + row, tl.where(keep, u, 0.0))
        tl.store(ent_ptr + row, tl.where(keep, a, 0.0))
        tl.store(rank_ptr + row, tl.where(keep, r, 0))
        if HAS_MEAN:
            tl.store(mean_ptr + row, tl.where(keep, zsum, 0.0))
        if HAS_SUM_P2:
            tl.store(sum_p2_ptr + row, tl.where(keep, sum_e2, 0.0))
        if HAS_TOP1:
            tl.store(top1_ptr + row, tl.where(keep, ties, 0))
    else:
        d = m - zy  # >= 0; NaN for a NaN row
        far = ~(d < FAR)
        e_y = tl.exp(-d)
        s = u + e_y
        ratio = u * tl.exp(tl.where(far, 0.0, d))  # (1 - p_t) / p_t
        nll = tl.where(far, d + tl.log(s), log1p(ratio))
        q = tl.where(far, -expm1(-nll), ratio / (1.0 + ratio))
        log_s = tl.where(far, tl.log(s), nll - d)
        lse = m + log_s
        a += tl.where(e_y > 0, -d * e_y, 0.0)
        ent = log_s - a / s
        tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))
        tl.store(logp_ptr + row, tl.where(keep, -nll, 0.0))
        tl.store(zy_ptr + row, tl.where(keep, zy, 0.0))
        tl.store(max_ptr + row, tl.where(keep, m, 0.0))
        tl.store(ent_ptr + row, tl.where(keep, ent, 0.0))
        tl.store(rank_ptr + row, tl.where(keep, r, 0))
        if HAS_MEAN:
            tl.store(mean_ptr + row, tl.where(keep, zsum / V, 0.0))
        if HAS_SUM_P2:  # p_t^2 (1 + sum_{i != y} (p_i / p_t)^2) near the max, sum e^2 / s^2 far from it
            near = d < NEAR
            log_sum_p2 = tl.where(near, log1p(sum_e2 * tl.exp(2.0 * tl.where(near, d, 0.0))) - 2.0 * nll,
                                  tl.log(sum_e2 + e_y * e_y) - 2.0 * log_s)
            tl.store(sum_p2_ptr + row, tl.where(keep, log_sum_p2, 0.0))
        if HAS_TOP1:  # no column before y reaches z_y, none after it exceeds z_y; False for a NaN row
            tl.store(top1_ptr + row, (keep & (r - ties == 1) & (lse == lse)).to(tl.int8))
        if HAS_TERMS:
            value, w, beta = FORMULA(-nll, q, ent, tl.exp(-log_s), zy, m, r, P0, P1, S0, S1, S2, S3)
            if HAS_SCALE:
                c = tl.load(scale_ptr + row).to(tl.float32)
                value, w, beta = value * c, w * c, beta * c
            tl.store(value_ptr + row, tl.where(keep, value, 0.0))
            tl.store(w_ptr + row, tl.where(keep, w, 0.0))
            tl.store(beta_ptr + row, tl.where(keep, beta, 0.0))


_row_stats_autotuned = triton.autotune(configs=autotune_configs(), key=["V", "FORMULA"])(_row_stats_kernel)

#: The kernel's output pointers, in its signature's order, named as ``reference.stats.ROW_STATS``.
STAT_SLOTS = ("lse", "logp_t", "target_logit", "max_logit", "entropy", "rank", "logit_mean", "log_sum_p2", "is_top1")
#: The optional statistics and the accumulator each needs (``reference.stats.ACCUMULATORS``).
OPTIONAL = {"logit_mean": "zsum", "log_sum_p2": "sum_e2", "is_top1": "ties"}
#: The slot the partial pass stores each accumulator in (that of the statistic it becomes).
PARTIAL_SLOTS = {"m": "max_logit", "u": "lse", "a": "entropy", "r": "rank", "zsum": "logit_mean",
                 "sum_e2": "log_sum_p2", "ties": "is_top1"}
#: The slots' dtypes where not float32 (the counts are stored as int32, the flag as int8).
_SLOT_DTYPES = {"rank": torch.int32, "is_top1": torch.int8}


def row_stats(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, softcap=None, temperature=1.0,
              extra=frozenset(), formula=None, formula_args=((0.0, 0.0), (None,) * 4), scale=None,
              partial_target_logit=None):
    """Launch one program per row of ``[B, T, V]`` logits (last stride 1) with ``[B*T]`` int64
    targets. ``softcap``/``temperature``: the logit transform; ``extra``: the optional
    statistics to compute too (names of :data:`OPTIONAL`).

    Returns ``({name: [B*T]}, terms)``: the statistics named as ``reference.stats.ROW_STATS``
    (float32; ``rank`` int64, ``is_top1`` bool) and, with ``formula`` (a Triton formula of
    ``weightings.py``; ``formula_args = ((P0, P1), (S0, S1, S2, S3))``), the float32
    ``(value, w, beta)`` times ``scale`` ``[B*T]`` if given, else None.

    ``partial_target_logit`` (float32 ``[B*T]``, the global untransformed target logit): a
    vocabulary shard's pass (``target`` holds shard-local indices: negative where the target
    precedes the shard, ``>= V`` where it follows it). Returns the raw accumulators
    ``{name: [B*T]}`` of ``reference.partial_row_stats`` instead (float32, ``r`` and ``ties``
    int64; no formula).
    """
    extra = frozenset(extra)
    if not extra <= set(OPTIONAL):
        raise ValueError(f"extra: unknown optional statistics {sorted(extra - set(OPTIONAL))}; "
                         f"expected some of {sorted(OPTIONAL)}")
    n = logits.shape[0] * logits.shape[1]

    def buf(slot):
        return torch.empty(n, dtype=_SLOT_DTYPES.get(slot, torch.float32), device=logits.device)

    if partial_target_logit is not None:
        optional = {OPTIONAL[k] for k in extra}
        names = [k for k in PARTIAL_SLOTS if k in optional or k not in OPTIONAL.values()]
        acc = {k: torch.empty(n, dtype=torch.int32 if k in ("r", "ties") else torch.float32, device=logits.device)
               for k in names}
        _launch(logits, target, {PARTIAL_SLOTS[k]: t for k, t in acc.items()}, (None,) * 3, None,
                partial_target_logit.float().contiguous(), ignore_index, softcap, temperature, (0.0, 0.0), None,
                (None,) * 4)
        return {k: t.long() if k in ("r", "ties") else t for k, t in acc.items()}

    names = [k for k in STAT_SLOTS if k not in OPTIONAL or k in extra]
    stats = {k: buf(k) for k in names}
    terms = tuple(buf("value") for _ in range(3)) if formula is not None else (None,) * 3
    (p0, p1), switches = formula_args
    _launch(logits, target, stats, terms, scale, None, ignore_index, softcap, temperature, (p0, p1), formula,
            switches)
    stats["rank"] = stats["rank"].long()
    if "is_top1" in stats:
        stats["is_top1"] = stats["is_top1"].view(torch.bool)
    return stats, (terms if formula is not None else None)


#: ptxas's register cap for the launches with one accumulator more than the default pass (CUDA
#: only; ROCm's Triton rejects the keyword). Left to itself, ptxas holds the pass with ``sum z'``
#: (label smoothing) to 168 registers and spills 8 bytes (float32, soft-cap, temperature,
#: V = 50257, sm_90/sm_100, Triton 3.9); allowed 255 it takes 172-192 and spills none.
MAXNREG = 255


def launch_config(v_size: int, slots) -> dict:
    """The fixed launch for the output ``slots`` asked for, by the number of per-lane
    accumulators (``[BLOCK_V]`` float32 each) the pass carries: the default three (``u, a, r``)
    at 4 warps; one more at 4 warps with :data:`MAXNREG`; five or six (several optional
    statistics) spread over 8 warps, 8 elements per thread and accumulator instead of 16 (at 4
    warps they take up to 252 of a thread's 255 registers; at 8, at most 124). Measured with
    ``bench.gpu_compile`` for sm_80, sm_90 and sm_100: no stack at V = 2112 or 50257."""
    accumulators = 3 + sum(slots.get(k) is not None for k in OPTIONAL)
    if accumulators >= 5:
        return fixed_config(v_size, full_tile_warps=8)
    config = fixed_config(v_size)
    if accumulators == 4 and torch.version.hip is None:
        config["maxnreg"] = MAXNREG
    return config


def _launch(logits, target, slots, terms, scale, zy_in, ignore_index, softcap, temperature, formula_params, formula,
            switches):
    """One launch of the statistics kernel over ``[B, T, V]`` logits: ``slots``, the output
    buffers by slot name (an absent slot is None: its switch is off)."""
    v_size = logits.shape[-1]
    n = logits.shape[0] * logits.shape[1]
    if n == 0:
        return
    args = (logits, target, *(slots.get(k) for k in STAT_SLOTS), *terms, scale, zy_in,
            1.0 if softcap is None else float(softcap), 1.0 / temperature, *(float(p) for p in formula_params),
            *row_offsets(logits.shape, logits.stride()), v_size, ignore_index)
    kw = dict(HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0, FORMULA=formula,
              S0=switches[0], S1=switches[1], S2=switches[2], S3=switches[3])
    if AUTOTUNE:
        _row_stats_autotuned[(n,)](*args, **kw)
    else:
        _row_stats_kernel[(n,)](*args, **kw, **launch_config(v_size, slots))
