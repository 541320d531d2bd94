"""The suite's float32 error model (``docs/testing.md``, "Tolerances").

Two float32 computations of the same value that round in a different order (our fused loss and a
model's own ``lm_head`` + ``F.cross_entropy``, a vocabulary shard merge and the whole row, our
head and TRL's) cannot be compared with a fixed tolerance that holds on every CPU: another CPU's
vectorised ``exp``, BLAS blocking or thread count moves both by a few units in the last place, and
a fixed ``rtol`` only records what one machine printed. Comparing the two with each other does
not help either: ``|got - ref| <= |got - truth| + |ref - truth|``, so any tolerance stated as a
multiple of the larger error passes whatever ``got`` is.

What the tests claim instead: **ours is no less accurate than the implementation it replaces**.
Both are measured against the same computation in float64 (``truth``), and

    ||got - truth|| <= K * max(||ref - truth||, FLOOR_ULPS * eps32 * ||truth||)

with ``||.||`` the Frobenius norm over the tensor (a scalar's absolute value). ``K`` allows the
two orders of rounding to differ by a small factor (a sum's error is a random walk whose size
varies from order to order); the floor keeps a reference that happens to be exact (a tiny model's
integer-valued count, a loss that rounds exactly) from demanding exactness of ours. A real bug
(a dropped coefficient, a wrong shift, a missing term) is an error of the size of the value
itself, ``~1 / eps32 = 8e6`` times the floor.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
#: ours may carry this many times the reference's float32 error
K = 4.0
#: the smallest error either side is held to, in units of eps32 times the value's norm
FLOOR_ULPS = 16.0


def _norm(x) -> float:
    """The Frobenius norm, NaN entries (ignored positions, matched by :func:`error`) left out."""
    if isinstance(x, torch.Tensor):
        return float(x.detach().double().nan_to_num(0.0, 0.0, 0.0).norm())
    return abs(float(x))


def error(x, truth) -> float:
    """``||x - truth||`` in float64 (tensors of the same shape, or numbers)."""
    if isinstance(x, torch.Tensor) or isinstance(truth, torch.Tensor):
        x = torch.as_tensor(x).detach().double().cpu()
        truth = torch.as_tensor(truth).detach().double().cpu()
        if torch.isnan(truth).any() or torch.isnan(x).any():
            same = torch.equal(torch.isnan(x), torch.isnan(truth))
            return math.inf if not same else error(x.nan_to_num(0.0), truth.nan_to_num(0.0))
        return float((x - truth).norm())
    return abs(float(x) - float(truth))


def allowed(ref, truth, k: float = K, floor_ulps: float = FLOOR_ULPS) -> float:
    """The error ours may have: ``k`` times the reference's, or the floor, whichever is larger."""
    return k * max(error(ref, truth), floor_ulps * EPS32 * _norm(truth))


def assert_no_less_accurate(got, ref, truth, *, k: float = K, floor_ulps: float = FLOOR_ULPS, what: str = ""):
    """``got`` (ours, float32) is within ``k`` times ``ref``'s float32 error of ``truth`` (float64)."""
    if isinstance(truth, torch.Tensor) and isinstance(got, torch.Tensor):
        assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    err, limit = error(got, truth), allowed(ref, truth, k, floor_ulps)
    assert err <= limit, (f"{what}: error {err:.3g} against float64, the reference's {error(ref, truth):.3g} "
                          f"(allowed {limit:.3g} = {k:g} x max(its error, {floor_ulps:g} ulps of the value))")


def assert_dicts_no_less_accurate(got: dict, ref: dict, truth: dict, *, k: float = K,
                                  floor_ulps: float = FLOOR_ULPS, what: str = ""):
    """:func:`assert_no_less_accurate` for every key (e.g. each parameter's gradient); the keys must agree."""
    assert got.keys() == ref.keys() == truth.keys() and got, (what, sorted(got), sorted(ref), sorted(truth))
    for name in truth:
        assert_no_less_accurate(got[name], ref[name], truth[name], k=k, floor_ulps=floor_ulps,
                                what=f"{what} {name}".strip())
