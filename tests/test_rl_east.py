"""EAST weights and answer-cluster entropies (ranktuner_kernels.rl.east) against plain formulas."""

import math

import pytest
import torch

from ranktuner_kernels.rl import answer_entropy, east_weights


def naive_weights(h, a):
    """The paper's eq. 6, element by element, for strictly positive entropies."""
    n = len(h)
    denom = sum(x ** a for x in h)
    return [x ** a * n / denom for x in h]


@pytest.mark.parametrize("a", [-3.0, -1.0, -0.5, 0.1, 0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weights_match_formula(a, dtype):
    h = [0.2, 1.3, 0.05, 2.0, 0.7]
    w = east_weights(torch.tensor(h, dtype=dtype), a)
    assert w.dtype == dtype and w.shape == (5,)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(w, torch.tensor(naive_weights(h, a), dtype=dtype), rtol=rtol, atol=0)
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)
    assert (w >= 0).all()


def test_ordering_by_sign_of_a():
    h = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    assert (east_weights(h, 2.0).diff() > 0).all()  # uncertain questions weigh more
    assert (east_weights(h, -1.0).diff() < 0).all()  # inverted
    sharp, soft = east_weights(h, 3.0), east_weights(h, 0.5)
    assert sharp.max() - sharp.min() > soft.max() - soft.min()  # a > 1 enhances, 0 < a < 1 compresses


def test_a_zero_and_base_invariance():
    h = torch.tensor([0.0, 0.3, 1.1])
    assert torch.equal(east_weights(h, 0.0), torch.ones(3))
    h2 = torch.tensor([0.4, 0.3, 1.1], dtype=torch.float64)
    torch.testing.assert_close(east_weights(h2, 1.7), east_weights(h2 / math.log(2), 1.7))  # nats vs bits


def test_zero_entropy_cases():
    h = torch.tensor([0.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    # a > 0: fully confident questions get 0; the rest share N
    w = east_weights(h, 1.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 4 * 0.5 / 1.5, 4 * 1.0 / 1.5, 0.0], dtype=torch.float64))
    # a < 0: limit h -> 0: the zero-entropy questions share N
    torch.testing.assert_close(east_weights(h, -1.0), torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=torch.float64))
    # all zero: uniform for every a
    for a in (-2.0, 0.0, 1.0, 3.0):
        torch.testing.assert_close(east_weights(torch.zeros(3), a), torch.ones(3))
    # eps clamps first: finite and smooth for a < 0
    w = east_weights(h, -1.0, eps=0.1)
    torch.testing.assert_close(w, torch.tensor(naive_weights([0.1, 0.5, 1.0, 0.1], -1.0), dtype=torch.float64))


def test_large_exponents_do_not_overflow():
    h = torch.tensor([1e-30, 1e-20, 1.0], dtype=torch.float32)
    for a in (-3.0, 3.0, 20.0):
        w = east_weights(h, a)
        assert torch.isfinite(w).all() and math.isclose(float(w.sum()), 3.0, rel_tol=1e-5)


def test_dim_and_half_dtypes():
    h = torch.tensor([[0.2, 0.4, 0.8], [1.0, 1.0, 1.0]])
    w = east_weights(h, 1.0, dim=-1)
    torch.testing.assert_close(w.mean(-1), torch.ones(2))
    torch.testing.assert_close(w[1], torch.ones(3))
    wt = east_weights(h.T, 1.0, dim=0)
    torch.testing.assert_close(wt, w.T)
    wb = east_weights(h.bfloat16(), 1.0)
    assert wb.dtype == torch.bfloat16
    assert east_weights(torch.empty(0), 1.0).shape == (0,)


def test_bad_inputs():
    with pytest.raises(ValueError):
        east_weights(torch.tensor([0.5, -0.1]), 1.0)
    with pytest.raises(ValueError):
        east_weights(torch.tensor([0.5, float("nan")]), 1.0)
    with pytest.raises(TypeError):
        east_weights(torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError):
        east_weights(torch.tensor([0.5]), float("inf"))
    with pytest.raises(ValueError):
        east_weights(torch.tensor(0.5), 1.0)


def test_answer_entropy():
    answers = [["7", "7", "7", "7"], ["1", "2", "1", "3"], [], [None, None, "x"], [1, 2, 3, 4]]
    h = answer_entropy(answers, dtype=torch.float64)
    p = [0.5, 0.25, 0.25]
    expect = [0.0, -sum(x * math.log(x) for x in p), 0.0,
              -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)), math.log(4)]
    torch.testing.assert_close(h, torch.tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(answer_entropy(answers, base=2, dtype=torch.float64),
                               torch.tensor(expect, dtype=torch.float64) / math.log(2))
    assert answer_entropy(answers).dtype == torch.float32
    # the two-step EAST pipeline: weights mean 1, the split question weighs most
    w = east_weights(h, 1.0)
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-9) and int(w.argmax()) == 4
    with pytest.raises(TypeError):
        answer_entropy("abc")
    with pytest.raises(ValueError):
        answer_entropy(answers, base=1)


@pytest.mark.parametrize("eps", [-0.5, -1e-6, float("nan"), float("inf")])
def test_bad_eps(eps):
    """``eps`` is a floor on the entropies: a negative or non-finite one is refused."""
    with pytest.raises(ValueError, match="eps"):
        east_weights(torch.tensor([0.5, 1.0]), -1.0, eps=eps)
