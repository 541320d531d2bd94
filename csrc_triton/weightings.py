"""The Triton formula of every row-local weighting, evaluated in registers at the end of the
statistics pass; each is the twin of the ``terms`` method of the config class of the same
name in ``ranktuner_kernels.weightings`` (the tests compare the two).

Every formula has the same signature: the row's statistics as float32 scalars (``logp = log
p_t``, ``q = 1 - p_t`` without cancellation, entropy ``ent`` in nats, ``p_max``, ``zy = z'_y``,
``m = max z'``, ``rank``), the config's two float options ``P0, P1`` and four ``tl.constexpr``
switches, named in each formula's own parameter list (the config's ``kernel_args()`` gives
them in that order). It returns ``(value, w, beta)`` as in SPEC.md.
"""

import triton
import triton.language as tl

from .fmath import expm1, power

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def sft(logp, q, ent, p_max, zy, m, rank, P0, P1, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
        S3: tl.constexpr):
    return -logp, 1.0, 0.0


@triton.jit
def dft(logp, q, ent, p_max, zy, m, rank, P0, P1, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
        S3: tl.constexpr):
    w = tl.exp(logp)
    return -w * logp, w, 0.0


@triton.jit
def ranktuner(logp, q, ent, p_max, zy, m, rank, LOG_CLAMP, P1, W0: tl.constexpr, XI: tl.constexpr,
              K: tl.constexpr, ABLATION: tl.constexpr):
    """``LOG_CLAMP = log(clamp_min)`` (``-inf``: no clamp); the switches are the config's
    ``w0``, ``xi``, ``k`` and ``ablation`` strings."""
    h_bits = ent / LN2
    s = tl.where(h_bits >= 2, tl.exp2(h_bits) * 0.25 + 1.0, 2.0 - p_max)
    r = rank.to(tl.float32)
    if XI == "max":
        xi = tl.maximum(r, s, propagate_nan=tl.PropagateNan.ALL)
    elif XI == "arith":
        xi = (r + s) * 0.5
    elif XI == "geo":
        xi = tl.sqrt(r * s)
    else:  # "log": the logarithmic mean, arithmetic where R ~ s
        dlog = tl.log(r) - tl.log(s)
        close = tl.abs(dlog) < 1e-4
        xi = tl.where(close, (r + s) * 0.5, (r - s) / tl.where(close, 1.0, dlog))
    lg = tl.log2(xi + 1.0)
    k = 1.0 / (lg * lg)
    if K == "cmvt":
        k = k * xi / (xi + 1.0)
    if ABLATION == "no_prob":
        log_base = tl.log(s)
    elif ABLATION == "no_entropy":
        log_base = logp
    else:
        log_base = tl.maximum(logp + tl.log(s), LOG_CLAMP, propagate_nan=tl.PropagateNan.ALL)
    log_scale = -k * log_base
    if W0 == "p":
        log_scale += logp
    w = tl.exp(log_scale)
    return -w * logp, w, 0.0


@triton.jit
def overtone(logp, q, ent, p_max, zy, m, rank, LAM, P1, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
             S3: tl.constexpr):
    w = tl.where(zy >= m, LAM, 1.0)
    return -w * logp, w, 0.0


@triton.jit
def alpha_power(logp, q, ent, p_max, zy, m, rank, ALPHA, P1, S0: tl.constexpr, S1: tl.constexpr,
                S2: tl.constexpr, S3: tl.constexpr):
    w = tl.exp(ALPHA * logp)
    return -expm1(ALPHA * logp) / ALPHA, w, 0.0  # 1 - p^alpha without cancellation


@triton.jit
def threshold(logp, q, ent, p_max, zy, m, rank, LOW, HIGH, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
              S3: tl.constexpr):
    p = tl.exp(logp)
    w = tl.where((p >= LOW) & (p <= HIGH), 1.0, 0.0)
    return -w * logp, w, 0.0


@triton.jit
def entropy_reg(logp, q, ent, p_max, zy, m, rank, ALPHA, P1, S0: tl.constexpr, S1: tl.constexpr,
                S2: tl.constexpr, S3: tl.constexpr):
    return -logp - ALPHA * ent, 1.0, ALPHA


@triton.jit
def focal(logp, q, ent, p_max, zy, m, rank, GAMMA, P1, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
          S3: tl.constexpr):
    p = tl.exp(logp)
    value = -power(q, GAMMA) * logp
    w = tl.where(q > 0, power(q, GAMMA - 1.0) * (q - GAMMA * p * logp), tl.where(GAMMA == 0, 1.0, 0.0))
    return value, w, 0.0
