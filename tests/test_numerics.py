"""Numerics at the magnitudes real models produce: confident tokens at logits of 20-40, the
s(H) branch at exactly 2 bits, vocabularies spanning several kernel tiles with the max found
late, and a 150k vocabulary."""

import math

import pytest
import torch
import torch.nn.functional as F

import ranktuner_kernels as rk
from helpers import DEVICE, NAMES

IMPLS = ["reference", "triton"]


def confident_rows(v=2048, n=48, seed=0):
    """Rows of an LLM head late in fine-tuning: logits ~ N(20, 4) with the target's logit raised
    so that p_t runs from 0.997 to 0.999999 (log-spaced 1 - p_t), float64 and exact."""
    g = torch.Generator().manual_seed(seed)
    z = 20 + 4 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    rest = torch.logsumexp(z.scatter(1, y[:, None], -math.inf), -1)
    q = torch.logspace(math.log10(3e-3), -6, n, dtype=torch.float64)  # 1 - p_t
    z[torch.arange(n), y] = rest + torch.log((1 - q) / q)  # p_t / (1 - p_t) = e^{z_y - rest}
    return z, y, q


@pytest.mark.parametrize("impl", IMPLS)
def test_confident_tokens_keep_their_loss_and_gradient(impl):
    """float32 NLL and target gradient within 1e-5 relative of float64 across the range,
    where F.cross_entropy itself loses up to ~1e-1 (it is measured too, as the baseline)."""
    z, y, q = confident_rows()
    x = z.float().to(DEVICE).requires_grad_()
    loss = rk.cross_entropy(x, y.to(DEVICE), impl=impl, reduction="none")
    loss.sum().backward()
    want_nll = -torch.log1p(-q)
    got_grad_y = x.grad.double().cpu()[torch.arange(len(y)), y]
    err_nll = ((loss.double().cpu() - want_nll) / want_nll).abs()
    err_grad = ((got_grad_y + q) / q).abs()  # d loss / d z_y = p_t - 1 = -q
    assert err_nll.max() <= 1e-5 and err_grad.max() <= 1e-5, (float(err_nll.max()), float(err_grad.max()))
    torch_nll = F.cross_entropy(z.float(), y, reduction="none").double()
    torch_err = ((torch_nll - want_nll) / want_nll).abs().max()
    assert torch_err > 10 * err_nll.max()  # the baseline really is hard: torch loses digits here


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_confident_tokens_every_weighting(name, impl):
    """Every weighting's value, weight and gradient on confident rows, float32 vs float64."""
    z, y, _ = confident_rows(v=512, n=24, seed=1)
    w = rk.TALR(tau=0.5) if name == "talr" else name
    y = y.to(DEVICE)
    x32, x64 = z.float().to(DEVICE).requires_grad_(), z.to(DEVICE).requires_grad_()
    l32, s32 = rk.cross_entropy(x32, y, weighting=w, impl=impl, reduction="none", return_stats=True)
    l64, s64 = rk.cross_entropy(x64, y, weighting=w, impl="reference", reduction="none", return_stats=True)
    l32.sum().backward()
    l64.sum().backward()
    torch.testing.assert_close(l32.double(), l64, rtol=2e-5, atol=1e-12)
    torch.testing.assert_close(s32["weight"].double(), s64["weight"], rtol=2e-5, atol=1e-12)
    idx = torch.arange(len(y), device=DEVICE)
    torch.testing.assert_close(x32.grad.double()[idx, y], x64.grad[idx, y], rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_s_of_h_branch_at_two_bits(impl):
    """Rows just below and just above H = 2 bits take the two branches of s(H)."""
    v = 64
    rows, targets = [], []
    for h_bits in (2 - 1e-3, 2 + 1e-3, 1.5, 2.5):
        # a (target p, uniform rest) row; bisect p for the wanted entropy
        lo, hi = 1 / v, 1 - 1e-9
        for _ in range(200):
            p = (lo + hi) / 2
            r = (1 - p) / (v - 1)
            h = -(p * math.log2(p) + (v - 1) * r * math.log2(r))
            lo, hi = (p, hi) if h > h_bits else (lo, p)
        probs = torch.full((v,), (1 - p) / (v - 1), dtype=torch.float64)
        probs[3] = p
        rows.append(probs.log())
        targets.append(3)
    z = torch.stack(rows).float().to(DEVICE)
    y = torch.tensor(targets, device=DEVICE)
    st = rk.token_stats(z, y, impl=impl)
    _, out = rk.cross_entropy(z, y, weighting=rk.RankTuner(w0="one", clamp_min=None), impl=impl,
                              reduction="none", return_stats=True)
    hb, pmax, pt = (st[k].double().cpu() for k in ("entropy_bits", "p_max", "p_t"))
    assert hb[0] < 2 <= hb[1]
    s = torch.where(hb >= 2, 2**hb / 4 + 1, 2 - pmax)  # SPEC
    k = torch.log2(torch.maximum(torch.ones_like(s), s) + 1) ** -2  # rank 1: xi = max(1, s)
    want = (pt * s) ** -k
    torch.testing.assert_close(out["weight"].double().cpu(), want, rtol=2e-5, atol=0)
    assert abs(float(s[1] - s[0])) > 0.01  # the branches really differ there (3.0 vs 2 - p_max)


@pytest.mark.parametrize("v", [2049, 4097, 6150])
@pytest.mark.parametrize("impl", IMPLS)
def test_several_tiles_and_a_late_max(v, impl):
    """Vocabularies of 2, 3 and 4 kernel tiles (BLOCK_V = 2048); in some rows the max sits in the
    last tile, in others the running max rises in every tile."""
    g = torch.Generator().manual_seed(v)
    z = torch.randn(4, v, generator=g, dtype=torch.float64)
    z[0, -1] = 30.0  # the max in the last element
    z[1] = torch.linspace(-5, 25, v, dtype=torch.float64)  # the max moves up at every tile
    z[2, :] = -3.0
    z[2, v // 2 + 7] = 12.0
    y = torch.tensor([v - 1, 5, v // 2 + 7, 17])
    x32 = z.float().to(DEVICE).requires_grad_()
    x64 = z.to(DEVICE).requires_grad_()
    l32, s32 = rk.cross_entropy(x32, y.to(DEVICE), weighting="ranktuner", impl=impl, reduction="none",
                                return_stats=True)
    l64, s64 = rk.cross_entropy(x64, y.to(DEVICE), weighting="ranktuner", impl="reference", reduction="none",
                                return_stats=True)
    l32.sum().backward()
    l64.sum().backward()
    for key in ("lse", "logp_t", "entropy", "p_max", "weight"):
        torch.testing.assert_close(s32[key].double(), s64[key], rtol=2e-5, atol=0)  # relative: row 0 is confident (H ~ 1e-8, log p_t ~ -3e-10)
    assert torch.equal(s32["rank"], s64["rank"])
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_llm_vocabulary_at_llm_magnitudes(impl):
    """V = 152064 (Qwen2.5), logits ~ N(0, 3) plus a target boost up to 30: a few rows."""
    v = 152064
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, v, generator=g) * 3
    y = torch.randint(0, v, (3,), generator=g)
    z[torch.arange(3), y] += torch.tensor([5.0, 20.0, 30.0])
    x = z.clone().to(DEVICE).requires_grad_()
    loss = rk.cross_entropy(x, y.to(DEVICE), weighting="ranktuner", impl=impl, reduction="sum")
    loss.backward()
    x64 = z.double().requires_grad_()
    want = rk.cross_entropy(x64, y, weighting="ranktuner", impl="reference", reduction="sum")
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-9)
