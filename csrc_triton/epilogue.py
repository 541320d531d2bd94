"""Per-token objective epilogues, evaluated in registers at the end of the statistics pass.

Each takes the row statistics (float32 scalars: ``logp = z_y - lse``, entropy ``H`` in nats,
``p_max``, ``z_y``, ``m = max z``, ``rank``) and returns ``(value, w, beta)`` as in SPEC.md.
Objective ids and option codes come from ``Objective.kernel_spec()``; the math mirrors
``ranktuner_kernels.objectives`` (the reference), against which the tests compare it.
"""

import triton
import triton.language as tl

from ranktuner_kernels.objectives import KERNEL_OBJECTIVES

# objective ids (STATS_ONLY: the epilogue runs in torch), shared with Objective.kernel_spec()
STATS_ONLY, SFT, DFT, RANKTUNER, OVERTONE, ALPHA_POWER, THRESHOLD, ENTROPY_REG, FOCAL = (
    tl.constexpr(KERNEL_OBJECTIVES.index(name))
    for name in ("stats_only", "sft", "dft", "ranktuner", "overtone", "alpha_power", "threshold", "entropy_reg", "focal")
)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _expm1_neg(x):
    """``1 - exp(x)`` for ``x <= 0``, accurate near 0 (series below |x| = 1e-2)."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x / 24.0)))
    return tl.where(x > -1e-2, series, 1.0 - tl.exp(x))


@triton.jit
def _pow(base, expo):
    """``base ** expo`` for ``base >= 0`` (``0 ** 0 = 1``, ``0 ** e = 0`` for ``e > 0``)."""
    return tl.where(base > 0, tl.exp2(expo * tl.log2(tl.where(base > 0, base, 1.0))), tl.where(expo == 0, 1.0, 0.0))


@triton.jit
def _ranktuner(logp, ent, p_max, rank, log_clamp, OPT: tl.constexpr):
    # OPT bits: 0 w0="one" | 1-2 xi (max, arith, geo, log) | 3 k="cmvt" | 4-5 ablation (None, no_prob, no_entropy) | 6 clamp
    h_bits = ent / LN2
    s = tl.where(h_bits >= 2, tl.exp2(h_bits) * 0.25 + 1.0, 2.0 - p_max)
    r = rank.to(tl.float32)
    if ((OPT >> 1) & 3) == 0:
        xi = tl.maximum(r, s)
    elif ((OPT >> 1) & 3) == 1:
        xi = (r + s) * 0.5
    elif ((OPT >> 1) & 3) == 2:
        xi = tl.sqrt(r * s)
    else:
        dlog = tl.log(r) - tl.log(s)
        close = tl.abs(dlog) < 1e-4
        xi = tl.where(close, (r + s) * 0.5, (r - s) / tl.where(close, 1.0, dlog))
    lg = tl.log2(xi + 1.0)
    k = 1.0 / (lg * lg)
    if ((OPT >> 3) & 1) == 1:
        k = k * xi / (xi + 1.0)
    if ((OPT >> 4) & 3) == 0:
        log_base = logp + tl.log(s)
        if ((OPT >> 6) & 1) == 1:
            log_base = tl.maximum(log_base, log_clamp)
    elif ((OPT >> 4) & 3) == 1:
        log_base = tl.log(s)
    else:
        log_base = logp
    log_scale = -k * log_base
    if (OPT & 1) == 0:
        log_scale += logp
    return tl.exp(log_scale)


@triton.jit
def token_terms(logp, ent, p_max, zy, m, rank, P0, P1, OBJECTIVE: tl.constexpr, OPT: tl.constexpr):
    """``(value, w, beta)`` of one token; ``P0``, ``P1``: the objective's float options."""
    nll = -logp
    beta = 0.0
    if OBJECTIVE == SFT:
        w = 1.0
        value = nll
    elif OBJECTIVE == DFT:
        w = tl.exp(logp)
        value = w * nll
    elif OBJECTIVE == RANKTUNER:
        w = _ranktuner(logp, ent, p_max, rank, P0, OPT)
        value = w * nll
    elif OBJECTIVE == OVERTONE:
        w = tl.where(zy >= m, P0, 1.0)
        value = w * nll
    elif OBJECTIVE == ALPHA_POWER:
        w = tl.exp(P0 * logp)
        value = (1.0 - w) / P0
    elif OBJECTIVE == THRESHOLD:
        p = tl.exp(logp)
        w = tl.where((p >= P0) & (p <= P1), 1.0, 0.0)
        value = w * nll
    elif OBJECTIVE == ENTROPY_REG:
        w = 1.0
        value = nll - P0 * ent
        beta = P0
    else:  # FOCAL, gamma = P0
        p = tl.exp(logp)
        q = _expm1_neg(logp)
        value = -_pow(q, P0) * logp
        w = tl.where(q > 0, _pow(q, P0 - 1.0) * (q - P0 * p * logp), tl.where(P0 == 0, 1.0, 0.0))
    return value, w, beta
