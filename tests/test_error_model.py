"""The error model of ``tests/error_model.py`` can fail: it tells a float32 reordering from a bug."""

import pytest
import torch

from error_model import EPS32, assert_dicts_no_less_accurate, assert_no_less_accurate, error


def _sums(seed=0, n=4096):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, generator=g, dtype=torch.float64) * 30
    x32 = x64.float()
    truth = x32.double().sum()  # the float32 inputs summed exactly enough
    forward = x32.sum()
    backward = x32.flip(0).cumsum(0)[-1]  # another order of the same additions
    return forward, backward, truth


def test_a_reordered_float32_sum_passes_both_ways():
    forward, backward, truth = _sums()
    assert error(forward, truth) > 0 or error(backward, truth) > 0  # rounding happened at all
    assert_no_less_accurate(forward, backward, truth, what="forward")
    assert_no_less_accurate(backward, forward, truth, what="backward")


@pytest.mark.parametrize("bug", ["coefficient", "one term dropped", "nan"])
def test_a_bug_fails(bug):
    forward, backward, truth = _sums()
    wrong = {"coefficient": forward * 1.01, "one term dropped": forward - 1.0,
             "nan": forward * float("nan")}[bug]
    with pytest.raises(AssertionError, match="against float64"):
        assert_no_less_accurate(wrong, backward, truth, what=bug)


def test_an_exact_reference_holds_ours_to_the_floor():
    truth = torch.tensor(3.0, dtype=torch.float64)
    assert_no_less_accurate(torch.tensor(3.0) * (1 + EPS32), torch.tensor(3.0), truth)
    with pytest.raises(AssertionError):
        assert_no_less_accurate(torch.tensor(3.0) * (1 + 1e3 * EPS32), torch.tensor(3.0), truth)


def test_nan_at_ignored_positions_keeps_the_floor():
    """Statistics hold NaN where a token is ignored: the floor is the norm of the other entries
    (a NaN norm would make the allowance max(0, nan) = 0 and fail every exact reference)."""
    truth = torch.tensor([3.0, float("nan"), -4.0], dtype=torch.float64)
    ref = truth.float()
    assert_no_less_accurate(ref * (1 + EPS32), ref, truth)
    with pytest.raises(AssertionError, match="against float64"):
        assert_no_less_accurate(ref * (1 + 1e3 * EPS32), ref, truth)
    with pytest.raises(AssertionError, match="against float64"):  # NaN moved: an error, not a skip
        assert_no_less_accurate(ref.nan_to_num(0.0), ref, truth)


def test_dicts_need_the_same_keys_and_check_each():
    t = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    ok = {k: v.float() for k, v in t.items()}
    assert_dicts_no_less_accurate(ok, ok, t)
    with pytest.raises(AssertionError):
        assert_dicts_no_less_accurate({"a": ok["a"]}, ok, t)
    with pytest.raises(AssertionError, match="^b: error"):
        assert_dicts_no_less_accurate({"a": ok["a"], "b": ok["b"] * 2}, ok, t)
