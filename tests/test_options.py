"""The peers' options (softcap, temperature, label smoothing, z-loss) on every weighting, both
implementations and both paths, against the float64 autograd oracle of SPEC
(``spec_formulas.py``) and against the peers' own definitions; and the returned ``lse`` and
``accuracy``."""

import pytest
import torch
import torch.nn.functional as F

import ranktuner_kernels as rk
from helpers import DEVICE, NAMES, loss_and_grads, make_batch, rel_err
from spec_formulas import spec_loss

IMPLS = ["reference", "triton"]
OPTION_SETS = {
    "softcap": dict(softcap=4.0),
    "temperature": dict(temperature=0.7),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.01),
    "all": dict(softcap=6.0, temperature=1.3, label_smoothing=0.2, z_loss=0.003),
}


def _weighting(name):
    return rk.TALR(tau=1.5) if name == "talr" else rk.weightings.resolve(name)


def check_against_oracle(name, opts, impl, path, reduction="mean", dtype=torch.float32):
    """Loss and gradients of ``rk`` (logits or fused-linear path) vs the float64 oracle."""
    weighting = _weighting(name)
    g = torch.Generator().manual_seed(len(name))
    if path == "logits":
        z, y = make_batch(2, 3, 97, torch.float64, DEVICE)
        params = [z]

        def ours(x):
            return rk.cross_entropy(x, y, weighting=weighting, reduction=reduction, impl=impl, **opts)

        def oracle(x):
            return spec_loss(x, y, weighting, reduction=reduction, **opts)
    else:
        h = torch.randn(2, 4, 16, generator=g, dtype=torch.float64).to(DEVICE)
        w = (torch.randn(61, 16, generator=g, dtype=torch.float64) / 2).to(DEVICE)
        y = torch.randint(0, 61, (2, 4), generator=g).to(DEVICE)
        y[0, 1] = -100
        params = [h, w]

        def ours(hh, ww):
            return rk.linear_cross_entropy(hh, ww, y, weighting=weighting, reduction=reduction, impl=impl,
                                           chunk_size=3, **opts)

        def oracle(hh, ww):
            return spec_loss(hh @ ww.T, y, weighting, reduction=reduction, **opts)

    leaf = lambda dt: [p.detach().to(dt).requires_grad_() for p in params]  # noqa: E731
    want, want_grads = loss_and_grads(oracle, leaf(torch.float64))
    got, got_grads = loss_and_grads(ours, leaf(dtype))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    assert rel_err(got, want) <= tol, (rel_err(got, want), tol)
    for gg, wg in zip(got_grads, want_grads):
        assert rel_err(gg, wg) <= 10 * tol, (rel_err(gg, wg), tol)


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_options_on_logits(name, impl, opts):
    check_against_oracle(name, opts, impl, "logits", dtype=torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["sft", "ranktuner", "entropy_reg", "focal", "talr", "eaft"])
def test_options_reference_float64_exact(name, reduction):
    check_against_oracle(name, OPTION_SETS["all"], "reference", "logits", reduction, torch.float64)


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["sft", "ranktuner", "entropy_reg", "alpha_power", "talr"])
def test_options_on_fused_linear(name, impl, opts):
    check_against_oracle(name, opts, impl, "linear", dtype=torch.float32)


# ---- the peers' own definitions -------------------------------------------------------


def _plain(z, y, impl, reduction, **opts):
    return rk.cross_entropy(z, y, impl=impl, reduction=reduction, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_label_smoothing_is_torchs(eps, impl, reduction):
    z, y = make_batch(3, 5, 40, torch.float32, DEVICE)
    x1, x2 = z.clone().requires_grad_(), z.double().requires_grad_()
    ours, (g1,) = loss_and_grads(lambda x: _plain(x, y, impl, reduction, label_smoothing=eps), [x1])
    want, (g2,) = loss_and_grads(lambda x: F.cross_entropy(x.flatten(0, 1), y.flatten(), label_smoothing=eps,
                                                           reduction=reduction).reshape(ours.shape), [x2])
    torch.testing.assert_close(ours.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_softcap_temperature_are_the_peers(impl):
    """Liger's z-loss (``CE + lam lse^2`` per kept token, averaged like the CE), its soft-cap
    (CE of ``c tanh(z / c)``) and an RL framework's temperature (CE of ``z / T``)."""
    z, y = make_batch(2, 6, 50, torch.float32, DEVICE)
    z = z * 3
    zd, keep = z.double(), (y != -100).flatten()
    flat, yf = zd.flatten(0, 1), y.flatten()
    lam, c, t = 1e-3, 8.0, 0.6
    lse = torch.logsumexp(flat, -1)
    ce = F.cross_entropy(flat, yf, reduction="none")
    want_z = ((ce + lam * lse**2) * keep).sum() / keep.sum()
    torch.testing.assert_close(_plain(z, y, impl, "mean", z_loss=lam).double(), want_z, rtol=2e-6, atol=0)
    want_c = F.cross_entropy(c * torch.tanh(flat / c), yf)
    torch.testing.assert_close(_plain(z, y, impl, "mean", softcap=c).double(), want_c, rtol=2e-6, atol=0)
    want_t = F.cross_entropy(flat / t, yf)
    torch.testing.assert_close(_plain(z, y, impl, "mean", temperature=t).double(), want_t, rtol=2e-6, atol=0)
    _, st = rk.cross_entropy(z, y, impl=impl, z_loss=lam, softcap=c, return_stats=True)
    capped = c * torch.tanh(zd / c)
    torch.testing.assert_close(st["lse"][y != -100].double(), torch.logsumexp(capped, -1)[y != -100], rtol=1e-6, atol=0)
    torch.testing.assert_close(st["z_loss"].double(), torch.where(y != -100, lam * torch.logsumexp(capped, -1) ** 2, 0),
                               rtol=1e-5, atol=0)
    assert torch.equal(st["accuracy"], (y != -100) & (z.argmax(-1) == y))


@pytest.mark.parametrize(
    "opts, exc, name",
    [
        (dict(softcap=0.0), ValueError, "softcap"), (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"), (dict(temperature=0), ValueError, "temperature"),
        (dict(temperature="1"), ValueError, "temperature"), (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"), (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(z_loss=float("nan")), ValueError, "z_loss"),
    ],
)
def test_bad_options_raise_naming_them(opts, exc, name):
    z, y = make_batch(1, 3, 10, torch.float32, DEVICE)
    with pytest.raises(exc, match=name):
        rk.cross_entropy(z, y, **opts)
    with pytest.raises(exc, match=name):
        rk.linear_cross_entropy(torch.randn(3, 4, device=DEVICE), torch.randn(10, 4, device=DEVICE), y[0], **opts)


def test_options_off_are_exactly_off():
    """Default options give bit-identical results to the explicit neutral values."""
    z, y = make_batch(2, 3, 40, torch.float32, DEVICE)
    for impl in IMPLS:
        a = rk.cross_entropy(z, y, weighting="ranktuner", impl=impl)
        b = rk.cross_entropy(z, y, weighting="ranktuner", impl=impl, softcap=None, temperature=1.0,
                             label_smoothing=0.0, z_loss=0.0)
        assert torch.equal(a, b)
