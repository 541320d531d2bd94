"""THR on inputs laid out as callers hand them over: hidden states that are not contiguous and
logits strided along the vocabulary (``stride(-1) != 1``), through every implementation,
against the float64 oracle on the contiguous inputs. The skipped memory of the sliced layouts
holds NaN, so an implementation that reads it (a stride taken as 1, a view taken as
contiguous) shows NaN or a wrong number instead of passing by luck."""

import pytest
import torch

from ranktuner_kernels.rl import thr_guided_advantages, token_hidden_reward
from thr_cases import DEVICE, batch_case, every_other, rel, stored_as

triton = pytest.importorskip("triton")
from ranktuner_kernels.kernels import thr as ker  # noqa: E402

IMPLS = ["triton", "reference", "naive"]
PEAK = 24.0  # logits of about 10-40, near-certain sampled tokens


def hidden_layouts(hidden):
    """``[B, T, D]`` views: ``t_major`` (rows not mergeable: reshape copies), ``d_major`` (the
    ``[B·T, D]`` reshape is a view with strides ``(1, B·T)``), ``every_other`` (stride 2 along D)."""
    return {"t_major": stored_as(hidden, [1, 0, 2]), "d_major": stored_as(hidden, [2, 0, 1]),
            "every_other": every_other(hidden)}


def logits_layouts(logits):
    """``[B, T, V]`` views with ``stride(-1) != 1``: ``every_other`` (2) and ``vocab_major`` (T)."""
    return {"every_other": every_other(logits), "vocab_major": stored_as(logits, [0, 2, 1])}


def case():
    logits, tokens, correct, group, hidden = batch_case(seed=10, peak=PEAK)
    return [x.to(DEVICE) for x in (logits, tokens, correct, group, hidden)]


def oracle(logits, tokens, correct, group, hidden):
    return token_hidden_reward(logits.double().cpu(), tokens.cpu(), correct.cpu(), group.cpu(),
                               hidden=None if hidden is None else hidden.double().cpu(), impl="naive")


@pytest.mark.parametrize("layout", ["t_major", "d_major", "every_other"])
@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_hidden_states(layout, impl):
    logits, tokens, correct, group, hidden = case()
    want = oracle(logits, tokens, correct, group, hidden)
    view = hidden_layouts(hidden)[layout]
    assert not view.is_contiguous() and torch.equal(view, hidden)
    before = view.clone()
    got = token_hidden_reward(logits, tokens, correct, group, hidden=view, impl=impl).cpu()
    assert torch.isfinite(got).all()
    assert rel(got, want) < 2e-5, rel(got, want)
    same = token_hidden_reward(logits, tokens, correct, group, hidden=hidden, impl=impl).cpu()
    torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6 * float(same.abs().max()))
    assert torch.equal(view, before)  # the caller's tensor is left alone


@pytest.mark.parametrize("layout", ["every_other", "vocab_major"])
@pytest.mark.parametrize("impl", IMPLS)
def test_logits_strided_along_vocabulary(layout, impl):
    logits, tokens, correct, group, hidden = case()
    want = oracle(logits, tokens, correct, group, hidden)
    view = logits_layouts(logits)[layout]
    assert view.stride(-1) != 1 and torch.equal(view, logits)
    got = token_hidden_reward(view, tokens, correct, group, hidden=hidden, impl=impl).cpu()
    assert torch.isfinite(got).all()
    assert rel(got, want) < 2e-5, rel(got, want)
    # the one-call rule reads lse and entropy of the strided logits too
    adv = torch.linspace(-1, 1, 6, device=DEVICE)
    out, info = thr_guided_advantages(view, tokens, adv, correct, group, hidden=hidden, p=0.1, impl=impl)
    out_c, info_c = thr_guided_advantages(logits, tokens, adv, correct, group, hidden=hidden, p=0.1, impl=impl)
    for key in ("thr", "entropy"):
        ref = info_c[key].cpu()
        torch.testing.assert_close(info[key].cpu(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    torch.testing.assert_close(out.cpu(), out_c.cpu())


def test_kernel_refuses_a_vocabulary_stride():
    """The kernel reads a row's vocabulary at unit stride; other strides are refused (the
    public functions hand it a contiguous copy), never read as if they were 1."""
    logits, tokens, correct, group, _ = case()
    flat = every_other(logits.reshape(-1, logits.shape[-1]))
    rows = torch.arange(flat.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        ker.thr_pair_sums(flat, tokens.reshape(-1).clamp_min(0), rows, rows * 0, rows, rows * 0,
                          torch.ones(rows.numel(), device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        ker.row_lse_entropy(logits_layouts(logits)["vocab_major"])
