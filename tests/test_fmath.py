"""The kernels' float32 helpers (``csrc_triton/fmath.py``) against float64, each side of its
hand-over points: ``expm1`` (a series below ``|x| = 1e-2``, ``exp(x) - 1`` above), ``log1p``
(``x`` where ``1 + x`` rounds to 1, Goldberg's correction above), ``tanh`` (through
``expm1(-2|x|)``, so with the same hand-over at ``|x| = 5e-3``) and ``power`` (``0 ** 0``,
``0 ** e``). The ``@triton.jit`` helpers run through a one-line kernel (under the CPU
interpreter without a GPU).

Bounds, as relative errors: the series and the corrected forms are accurate to a few float32
ulps (measured: expm1 1.2e-7, log1p 2.1e-7), so they are held to 1e-6; ``exp(x) - 1`` just
above the hand-over loses ``eps / x`` to cancellation (measured 1.3e-5 at ``x = 1e-2``), so
that side is held to 2e-5 there and to 1e-6 from ``|x| = 0.2`` on."""

import numpy as np
import pytest
import torch

from helpers import DEVICE

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _unary(x_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, FN(x), mask=mask)


@triton.jit
def _binary(x_ptr, y_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    y = tl.load(y_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, FN(x, y), mask=mask)


def apply(fn, *args):
    """``fn`` elementwise on float32 tensors, through the kernel; the result as float64."""
    args = [a.float().contiguous().to(DEVICE) for a in args]
    out = torch.empty_like(args[0])
    kernel = _unary if len(args) == 1 else _binary
    kernel[(triton.cdiv(out.numel(), 1024),)](*args, out, out.numel(), FN=fn, BLOCK=1024)
    return out.double().cpu()


def rel_errors(got, want):
    return (got - want).abs() / want.abs().clamp_min(1e-300)


def magnitudes(lo, hi, n=3000):
    """float32 points spaced evenly in log scale from ``lo`` to ``hi``, both signs."""
    mag = torch.logspace(np.log10(lo), np.log10(hi), n, dtype=torch.float64).float()
    return torch.cat([mag, -mag])


def fmath():
    from ranktuner_kernels.kernels import fmath as module

    return module


def test_expm1_each_side_of_its_hand_over():
    x = magnitudes(1e-9, 30.0)
    got = apply(fmath().expm1, x)
    want = torch.expm1(x.double())
    err = rel_errors(got, want)
    a = x.double().abs()
    series, near, far = a < 1e-2, (a >= 1e-2) & (a < 0.2), a >= 0.2
    assert series.sum() > 1000 and near.sum() > 100
    assert err[series].max() <= 1e-6, float(err[series].max())  # the series, up to the hand-over
    assert err[near].max() <= 2e-5, float(err[near].max())  # exp(x) - 1 just above it
    assert err[far].max() <= 1e-6, float(err[far].max())
    assert float(apply(fmath().expm1, torch.tensor([0.0]))[0]) == 0.0


def test_log1p_each_side_of_its_hand_over():
    x = torch.cat([torch.tensor([0.0, 2.0**-30, 2.0**-24, 2.0**-23, 6e-8, 1.2e-7]), magnitudes(1e-12, 1e6)[:3000]])
    got = apply(fmath().log1p, x)
    want = torch.log1p(x.double())
    assert got[0] == 0.0
    err = rel_errors(got[1:], want[1:])
    assert err.max() <= 1e-6, (float(err.max()), float(x[1:][err.argmax()]))
    rounds_to_one = (1 + x.float()) == 1
    assert rounds_to_one.sum() > 100 and (~rounds_to_one).sum() > 100  # both branches ran


def test_tanh_against_float64():
    x = magnitudes(1e-9, 60.0)
    got = apply(fmath().tanh, x)
    want = torch.tanh(x.double())
    err = rel_errors(got, want)
    a = x.double().abs()
    assert err[a < 5e-3].max() <= 1e-6, float(err[a < 5e-3].max())  # expm1's series
    assert err.max() <= 2e-5, float(err.max())
    assert torch.equal(got[: len(x) // 2], -got[len(x) // 2 :])  # odd, exactly
    assert got[a >= 10].abs().eq(1.0).all()  # saturates to 1 without NaN


def test_power_against_float64():
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.tensor([0.0, 0.0, 0.0, 1.0, 1e-30]), torch.rand(2000, generator=g) * 3])
    expo = torch.cat([torch.tensor([0.0, 2.0, 0.5, 7.0, 0.0]), torch.rand(2000, generator=g) * 6 - 2])
    got = apply(fmath().power, base, expo)
    assert got[:5].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]  # 0 ** 0 = 1, 0 ** e = 0
    b, e = base[5:].double(), expo[5:].double()
    want = b.pow(e)
    # exp2(e log2 b) in float32: the error grows with |e log2 b| (one ulp of the exponent)
    bound = 2e-7 * (1 + (e * torch.log2(b)).abs())
    assert (rel_errors(got[5:], want) <= 4 * bound).all()
