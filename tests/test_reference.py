"""The reference against SPEC.md written out naively in float64 (tests/spec_formulas.py)."""

import math

import pytest
import torch

import ranktuner_kernels as rk
from ranktuner_kernels.reference import RowStats
from helpers import CONFIGS, cid, loss_and_grads, make_batch
from spec_formulas import spec_loss


def check_reference_matches_spec(obj, reduction, weights):
    """The reference's loss and gradient against SPEC's float64 oracle (``spec_formulas``)."""
    logits, target = make_batch(4, 6, 37, torch.float64, "cpu", seed=3)
    target[3] = -100  # a whole sequence ignored: TALR leaves it out of the median
    kw = {}
    if weights:
        g = torch.Generator().manual_seed(5)
        kw = dict(token_weight=torch.rand(4, 6, generator=g, dtype=torch.float64),
                  sequence_weight=torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
    x = logits.clone().requires_grad_()
    ref, (g_ref,) = loss_and_grads(lambda z: rk.cross_entropy(z, target, weighting=obj, reduction=reduction, impl="reference", **kw), [x])
    spec, (g_spec,) = loss_and_grads(lambda z: spec_loss(z, target, obj, reduction=reduction, **kw), [x])
    torch.testing.assert_close(ref, spec, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_ref, g_spec, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("obj", CONFIGS, ids=cid)
def test_reference_matches_spec(obj, reduction, weights):
    check_reference_matches_spec(obj, reduction, weights)


@pytest.mark.parametrize("name", sorted(rk.weightings.WEIGHTINGS))
def test_names_resolve_to_defaults(name):
    logits, target = make_batch(2, 5, 19, torch.float64, "cpu")
    by_name = rk.cross_entropy(logits, target, weighting=name, impl="reference")
    by_obj = rk.cross_entropy(logits, target, weighting=rk.weightings.WEIGHTINGS[name](), impl="reference")
    assert torch.equal(by_name, by_obj)


def test_num_items_in_batch_divides_the_sum():
    logits, target = make_batch(2, 5, 19, torch.float64, "cpu")
    total = rk.cross_entropy(logits, target, reduction="sum", weighting="ranktuner", impl="reference")
    for n in (7, torch.tensor(7)):
        got = rk.cross_entropy(logits, target, reduction="mean", num_items_in_batch=n, weighting="ranktuner", impl="reference")
        torch.testing.assert_close(got, total / 7)
    spec = spec_loss(logits, target, rk.RankTuner(), num_items=7)
    torch.testing.assert_close(got, spec)


def test_paper_k_values():
    """SPEC's numbers: K(1) = 0.5, K(2) ~ 0.265, K(5) ~ 0.125, K(10) ~ 0.076 for the CMVT form."""
    rt = rk.RankTuner(k="cmvt", xi="max")
    for xi, expected in ((1, 0.5), (2, 0.265), (5, 0.125), (10, 0.076)):
        # a stats row with rank xi and s(H) < xi, so xi = max(R, s) = R
        zero = torch.zeros(1, dtype=torch.float64)  # lse = max = 0: p_max = 1 -> s = 1
        stats = RowStats(lse=zero, logp_t=zero, target_logit=zero, max_logit=zero, entropy=zero,
                         rank=torch.tensor([xi]))
        _, xi_t, k = rt.relative_scale_terms(stats)
        assert float(xi_t) == xi
        assert abs(float(k) - expected) < 5e-4, (xi, float(k))


# ---- properties that hold for every distribution ----------------------------------------


def _random_rows(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, v, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("seed", range(3))
def test_rank_at_most_inverse_p(seed):
    logits, target = _random_rows(500, 50, seed)
    st = rk.token_stats(logits, target, impl="reference")
    assert torch.all(st["rank"] * st["p_t"] <= 1 + 1e-12)
    assert torch.all(st["rank"] >= 1)


@pytest.mark.parametrize("seed", range(3))
def test_expected_rank_at_least_s_of_h(seed):
    logits, target = _random_rows(500, 50, seed)
    st = rk.token_stats(logits, target, impl="reference")
    p_sorted = torch.softmax(logits, -1).sort(-1, descending=True).values
    expected_rank = (p_sorted * torch.arange(1, 51, dtype=torch.float64)).sum(-1)
    h_bits = st["entropy_bits"]
    s = torch.where(h_bits >= 2, 2**h_bits / 4 + 1, 2 - st["p_max"])
    assert torch.all(expected_rank >= s - 1e-9)


def test_scale_is_one_where_p_times_s_is_one():
    """Bisect the target probability of a (target, uniform rest) row until p_t * s(H) = 1
    (with V = 9 the root lies near p_t = 0.35, H = 2.8 bits: inside the 2^H/4 + 1 branch)."""
    v = 9

    def row(p):
        probs = torch.full((1, v), (1 - p) / (v - 1), dtype=torch.float64)
        probs[0, 0] = p
        return probs.log(), torch.zeros(1, dtype=torch.long)

    def excess(p):
        st = rk.token_stats(*row(p), impl="reference")
        h = float(st["entropy_bits"])
        s = 2**h / 4 + 1 if h >= 2 else 2 - float(st["p_max"])
        return float(st["p_t"]) * s - 1

    lo, hi = 0.3, 0.4
    assert excess(lo) < 0 < excess(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    assert abs(excess(lo)) < 1e-12
    logits, target = row(lo)
    _, st = rk.cross_entropy(logits, target, weighting=rk.RankTuner(w0="one"), return_stats=True, impl="reference")
    assert abs(float(st["weight"]) - 1) < 1e-9
    assert abs(math.log(float(st["p_t"])) - float(st["logp_t"])) < 1e-12


@pytest.mark.parametrize("obj", [rk.RankTuner(xi="log"), rk.RankTuner(xi="log", ablation="no_prob"),
                                 rk.RankTuner(xi="log", ablation="no_entropy")], ids=cid)
def test_log_mean_on_near_certain_targets(obj):
    """Realistic magnitudes: logits around 20 and targets the model is sure of (rank 1, ``p_max``
    ~ 1 - 1e-5, so ``s(H)`` ~ ``R`` and the logarithmic mean takes its arithmetic limit, the
    ``close`` branch) against SPEC's oracle. The ablations expose ``K``: without them the
    weight ``(p_t s)^K`` is ~1 whatever ``K``."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 37, generator=g, dtype=torch.float64) * 2 + 20
    target = torch.randint(0, 37, (2, 5), generator=g)
    logits.scatter_add_(2, target[..., None], torch.full((2, 5, 1), 25.0, dtype=torch.float64))
    target[0, 1] = -100
    st = rk.token_stats(logits, target, impl="reference")
    keep = target != -100
    s = 2 - st["p_max"][keep].double()
    assert (st["rank"][keep] == 1).all() and ((s.log()).abs() < 1e-4).all()  # every kept token: the close branch
    x = logits.clone().requires_grad_()
    ref, (g_ref,) = loss_and_grads(lambda z: rk.cross_entropy(z, target, weighting=obj, reduction="none",
                                                              impl="reference"), [x])
    spec, (g_spec,) = loss_and_grads(lambda z: spec_loss(z, target, obj, reduction="none"), [x])
    torch.testing.assert_close(ref, spec, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_ref, g_spec, rtol=1e-9, atol=1e-14)
