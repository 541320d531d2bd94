"""Elementwise float32 helpers with the accuracy the statistics need, written with ``tl.exp``
and ``tl.log`` only (the same code under the CPU interpreter and on the GPU)."""

import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """``exp(x) - 1``, accurate near 0 (a series below ``|x| = 1e-2``)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x / 24.0)))
    return tl.where(tl.abs(x) < 1e-2, series, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """``log(1 + x)`` for ``x >= 0``, accurate near 0: ``log(u) x / (u - 1)`` with
    ``u = 1 + x`` rounded (Goldberg's correction), ``x`` itself where ``u`` rounds to 1."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def tanh(x):
    """``tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|))`` with the sign of ``x``."""
    e = expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def power(base, expo):
    """``base ** expo`` for ``base >= 0`` (``0 ** 0 = 1``, ``0 ** e = 0`` for ``e > 0``)."""
    return tl.where(base > 0, tl.exp2(expo * tl.log2(tl.where(base > 0, base, 1.0))), tl.where(expo == 0, 1.0, 0.0))


@triton.jit
def transform(z, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """``z' = c tanh(z / c) / T`` (each part only where switched on)."""
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    if HAS_TEMPERATURE:
        z = z * inv_temperature
    return z
