"""Behaviour of the public API on both implementations: bad input, NaN, ignored tokens,
strides, determinism, in-place backward, modules, torch.compile."""

import math

import pytest
import torch

import ranktuner_kernels as rk
from error_model import assert_no_less_accurate
from helpers import DEVICE, NAMES, loss_and_grads, make_batch

IMPLS = ["reference", "triton"]


# ---- bad input raises, naming the argument ----------------------------------------------

BAD_CALLS = [
    (lambda z, y: rk.cross_entropy(z, y[:, :-1]), ValueError, "target"),
    (lambda z, y: rk.cross_entropy(z, y.float()), TypeError, "target"),
    (lambda z, y: rk.cross_entropy(z, y.bool()), TypeError, "target"),
    (lambda z, y: rk.cross_entropy(z, torch.full_like(y, 9)), ValueError, "target"),
    (lambda z, y: rk.cross_entropy(z, torch.full_like(y, -1)), ValueError, "target"),
    (lambda z, y: rk.cross_entropy(z.int(), y), TypeError, "input"),
    (lambda z, y: rk.cross_entropy(z[0, 0, 0], y[0, 0]), ValueError, "input"),
    (lambda z, y: rk.cross_entropy(z.tolist(), y), TypeError, "input"),
    (lambda z, y: rk.cross_entropy(z, y, weighting="nope"), ValueError, "weighting"),
    (lambda z, y: rk.cross_entropy(z, y, weighting=3), TypeError, "weighting"),
    (lambda z, y: rk.cross_entropy(z, y, reduction="avg"), ValueError, "reduction"),
    (lambda z, y: rk.cross_entropy(z, y, impl="cuda"), ValueError, "impl"),
    (lambda z, y: rk.cross_entropy(z, y, token_weight=torch.ones(3)), ValueError, "token_weight"),
    (lambda z, y: rk.cross_entropy(z, y, sequence_weight=torch.ones(5)), ValueError, "sequence_weight"),
    (lambda z, y: rk.cross_entropy(z[0], y[0], sequence_weight=torch.ones(1)), ValueError, "sequence_weight"),
    (lambda z, y: rk.cross_entropy(z, y, num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (lambda z, y: rk.cross_entropy(z, y, num_items_in_batch="3"), TypeError, "num_items_in_batch"),
    (lambda z, y: rk.cross_entropy(z, y, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda z, y: rk.cross_entropy(z[0], y[0], weighting="talr"), ValueError, "TALR"),
    (lambda z, y: rk.cross_entropy(z, y, impl="triton") if z.dtype == torch.float64 else None, TypeError, "dtype"),
]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_raises(case):
    fn, exc, name = BAD_CALLS[case]
    z, y = make_batch(2, 3, 9, torch.float64, "cpu")
    with pytest.raises(exc, match=name):
        fn(z, y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rk.RankTuner(w0="two"), lambda: rk.RankTuner(xi="median"), lambda: rk.RankTuner(k="exact"),
        lambda: rk.RankTuner(ablation="no_rank"), lambda: rk.RankTuner(clamp_min=0.0),
        lambda: rk.AlphaPower(0.0), lambda: rk.AlphaPower(-1.0), lambda: rk.Threshold(0.6, 0.4),
        lambda: rk.Threshold(-0.1, 0.5), lambda: rk.EAFT(k=0), lambda: rk.EAFT(alpha=0), lambda: rk.EAFT(norm=-1.0),
        lambda: rk.TALR(tau=0.0), lambda: rk.TALR(w_min=2.0), lambda: rk.Focal(-1.0), lambda: rk.OverTone(lam=-0.1),
        lambda: rk.EntropyReg(float("nan")),
    ],
)
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.skipif(DEVICE != "cuda", reason="needs two devices")
def test_mixed_devices_raise():
    z, y = make_batch(2, 3, 9, torch.float32, "cuda")
    with pytest.raises(ValueError, match="target"):
        rk.cross_entropy(z, y.cpu())
    with pytest.raises(ValueError, match="token_weight"):
        rk.cross_entropy(z, y, token_weight=torch.ones(2, 3))


# ---- NaN, inf and ignored tokens -----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_kept_row_gives_nan(name, impl, bad):
    z, y = make_batch(2, 3, 33, torch.float32, DEVICE)
    z[0, 2, 5] = bad
    loss = rk.cross_entropy(z, y, weighting=name, impl=impl)
    assert math.isnan(float(loss))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_an_ignored_row_is_not_read(impl):
    z, y = make_batch(2, 3, 33, torch.float32, DEVICE)
    z[0, 1] = float("nan")  # make_batch ignores token (0, 1)
    x = z.clone().requires_grad_()
    loss = rk.cross_entropy(x, y, weighting="ranktuner", impl=impl)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert torch.all(x.grad[0, 1] == 0) and not x.grad.isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_logits_are_masked_vocabulary(impl):
    """As in F.cross_entropy, -inf marks a token with probability 0."""
    z, y = make_batch(1, 4, 33, torch.float32, DEVICE, ignore=False)
    z[..., 20:] = float("-inf")
    y = y % 20
    x = z.clone().requires_grad_()
    loss = rk.cross_entropy(x, y, weighting="sft", impl=impl)
    loss.backward()
    want = torch.nn.functional.cross_entropy(z[0, :, :20].double(), y[0])
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(x.grad[..., 20:] == 0)
    st = rk.token_stats(z, y, impl=impl)
    assert torch.isfinite(st["entropy"]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_gives_zero_loss_and_gradient(name, reduction, impl):
    z, _ = make_batch(2, 3, 17, torch.float32, DEVICE)
    y = torch.full((2, 3), -100, device=DEVICE)
    x = z.clone().requires_grad_()
    name = rk.TALR(tau=1.0) if name == "talr" else name
    loss = rk.cross_entropy(x, y, weighting=name, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index(impl):
    """``ignore_index=7`` drops exactly the targets equal to 7, loss and gradient, as -100 does."""
    z, y = make_batch(2, 3, 17, torch.float32, DEVICE)
    y[0, 2] = y[1, 0] = 7  # real class ids, dropped by the custom ignore_index
    y_custom = torch.where(y == -100, 7, y)
    y_default = torch.where(y == 7, -100, y)
    dropped = y_custom == 7
    assert 3 <= int(dropped.sum()) < y.numel()
    for reduction in ("mean", "sum", "none"):
        a, (ga,) = loss_and_grads(lambda x: rk.cross_entropy(x, y_default, impl=impl, reduction=reduction),
                                  [z.clone().requires_grad_()])
        b, (gb,) = loss_and_grads(lambda x: rk.cross_entropy(x, y_custom, impl=impl, reduction=reduction,
                                                             ignore_index=7), [z.clone().requires_grad_()])
        # exact: the kept tokens' values and gradients, and the sums over them, are the same operations
        assert torch.equal(b, a) and torch.equal(gb, ga), reduction
        assert torch.all(gb[dropped] == 0) and torch.all(gb[~dropped].abs().sum(-1) > 0)


# ---- strides, determinism, the caller's tensors --------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_logits(impl):
    full, y = make_batch(2, 5, 40, torch.float32, DEVICE)
    shifted = full[:, :-1]  # logits[:, :-1]: rows not uniformly strided
    assert not shifted.is_contiguous()
    x1 = full.clone().requires_grad_()
    x2 = shifted.contiguous().requires_grad_()
    l1, (g1,) = loss_and_grads(lambda x: rk.cross_entropy(x[:, :-1], y[:, 1:], impl=impl), [x1])
    l2, (g2,) = loss_and_grads(lambda x: rk.cross_entropy(x, y[:, 1:], impl=impl), [x2])
    assert torch.equal(l1, l2)
    assert torch.equal(g1[:, :-1], g2) and torch.all(g1[:, -1] == 0)
    # a transposed vocabulary dimension (last stride != 1) is copied, still right
    xt = full.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(rk.cross_entropy(xt, y, impl=impl), rk.cross_entropy(full, y, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["ranktuner", "talr", "eaft", "entropy_reg"])
def test_repeated_calls_are_bitwise_identical(name, impl):
    z, y = make_batch(2, 3, 300, torch.bfloat16, DEVICE)
    runs = [loss_and_grads(lambda x: rk.cross_entropy(x, y, weighting=name, impl=impl), [z.clone().requires_grad_()]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1][0], runs[1][1][0])


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_modified_unless_inplace(impl):
    z, y = make_batch(2, 3, 50, torch.float32, DEVICE)
    tw = torch.rand(2, 3, device=DEVICE)
    x = z.clone().requires_grad_()
    saved = (x.detach().clone(), y.clone(), tw.clone())
    loss = rk.cross_entropy(x, y, token_weight=tw, impl=impl)
    loss.backward()
    assert torch.equal(x.detach(), saved[0]) and torch.equal(y, saved[1]) and torch.equal(tw, saved[2])
    # inplace_backward: same gradient, written over the logits' memory
    x2 = z.clone().requires_grad_()
    loss2 = rk.cross_entropy(x2, y, token_weight=tw, impl=impl, inplace_backward=True)
    loss2.backward()
    assert torch.equal(x2.grad, x.grad)
    assert torch.equal(x2.detach(), x.grad)  # the logits now hold their gradient


# ---- stats, modules, compile -------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_return_stats_matches_token_stats(impl):
    z, y = make_batch(2, 3, 50, torch.float32, DEVICE)
    loss, st = rk.cross_entropy(z, y, impl=impl, return_stats=True)
    st2 = rk.token_stats(z, y, impl=impl)
    assert set(st) == set(st2) | {"weight"}
    for k in st2:
        assert st[k].shape == y.shape
        assert torch.equal(st[k], st2[k]) or torch.allclose(st[k], st2[k], equal_nan=True, rtol=0, atol=0)
    p = torch.softmax(z.double(), -1)
    keep = y != -100
    torch.testing.assert_close(st["p_t"][keep].double(), p.gather(2, y.clamp_min(0)[..., None])[..., 0][keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["p_max"][keep].double(), p.max(-1).values[keep], rtol=1e-5, atol=1e-7)
    assert torch.equal(st["accuracy"], keep & (z.argmax(-1) == y))
    # ignored positions hold the documented values: NaN statistics, rank 0, not accurate, weight 0
    for k in ("p_t", "logp_t", "entropy", "entropy_bits", "p_max", "lse"):
        assert st[k][~keep].isnan().all() and not st[k][keep].isnan().any(), k
    assert torch.all(st["rank"][~keep] == 0) and torch.all(st["weight"][~keep] == 0)


def test_module_wrappers():
    z, y = make_batch(2, 3, 50, torch.float32, DEVICE)
    loss_fn = rk.TokenReweightedLoss(rk.DFT(), reduction="sum")
    assert torch.equal(loss_fn(z, y), rk.cross_entropy(z, y, weighting="dft", reduction="sum"))
    assert torch.equal(loss_fn(z, y, reduction="none"), rk.cross_entropy(z, y, weighting="dft", reduction="none"))
    head = torch.nn.Linear(8, 50, device=DEVICE)
    h = torch.randn(2, 3, 8, device=DEVICE)
    lin = rk.LinearTokenReweightedLoss.from_linear(head, "sft")
    loss = lin(h, y)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    head64 = torch.nn.Linear(8, 50, dtype=torch.float64, device=DEVICE)
    head64.load_state_dict(head.state_dict())
    want, truth = rk.cross_entropy(head(h), y), rk.cross_entropy(head64(h.double()), y)
    assert_no_less_accurate(loss, want, truth, what="the head's loss")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.long)])
def test_compiled_training_step(backend):
    """A whole training step (embedding, head, loss, backward) under torch.compile equals eager;
    aot_eager traces the same graphs as inductor (its lowering of our ops: tests/test_compile.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)).to(DEVICE)
    tokens = torch.randint(0, 50, (2, 9), device=DEVICE)

    def step(m):
        logits = m(tokens[:, :-1])
        loss = rk.cross_entropy(logits, tokens[:, 1:], weighting="ranktuner")
        loss.backward()
        return loss

    eager = step(model)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, backend=backend)(model)
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [9, -1, 1000])
def test_out_of_range_targets_raise_on_every_path(impl, bad):
    z, y = make_batch(2, 3, 9, torch.float32, DEVICE)
    y[1, 2] = bad
    with pytest.raises(ValueError, match="target: value"):
        rk.cross_entropy(z, y, impl=impl)
    with pytest.raises(ValueError, match="target: value"):
        rk.token_stats(z, y, impl=impl)
    with pytest.raises(ValueError, match="target: value"):
        rk.linear_cross_entropy(torch.randn(2, 3, 4, device=DEVICE), torch.randn(9, 4, device=DEVICE), y, impl=impl)


# ---- inplace_backward: correct, or a clear error, on both implementations -------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_over_logits_saved_by_another_op_raises(impl):
    """tanh saves its output for its backward: overwriting it would give a wrong u.grad."""
    z, y = make_batch(2, 3, 20, torch.float32, DEVICE)
    u = z.clone().requires_grad_()
    loss = rk.cross_entropy(torch.tanh(u), y, impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_twice_raises(impl):
    z, y = make_batch(2, 3, 20, torch.float32, DEVICE)
    x = z.clone().requires_grad_()
    logits = x * 1.0
    loss = rk.cross_entropy(logits, y, impl=impl, inplace_backward=True)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    ref = z.clone().requires_grad_()
    rk.cross_entropy(ref, y, impl=impl).backward()
    torch.testing.assert_close(first, ref.grad)  # the first backward was right


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_on_overlapping_memory_raises(impl):
    b = torch.randn(1, 30, device=DEVICE).requires_grad_()
    y = torch.randint(0, 30, (8,), device=DEVICE)
    with pytest.raises(ValueError, match="input: inplace_backward"):
        rk.cross_entropy(b.expand(8, 30), y, impl=impl, inplace_backward=True)
    loss = rk.cross_entropy(b.expand(8, 30), y, impl=impl)  # without it: fine
    loss.backward()
    ref = b.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref.expand(8, 30), y).backward()
    torch.testing.assert_close(b.grad, ref.grad)


# ---- num_items_in_batch: NaN gives NaN, negative raises, 0 divides by 1 ---------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_num_items_in_batch_nan_negative_and_zero(impl):
    z, y = make_batch(2, 3, 20, torch.float32, DEVICE)
    for nan in (float("nan"), torch.tensor(float("nan"), device=DEVICE)):
        assert math.isnan(float(rk.cross_entropy(z, y, impl=impl, num_items_in_batch=nan)))
        h, w = torch.randn(2, 3, 4, device=DEVICE), torch.randn(20, 4, device=DEVICE)
        assert math.isnan(float(rk.linear_cross_entropy(h, w, y, impl=impl, num_items_in_batch=nan)))
    for neg in (-4, -0.5, torch.tensor(-4, device=DEVICE), torch.tensor(-0.5, device=DEVICE)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            rk.cross_entropy(z, y, impl=impl, num_items_in_batch=neg)
    total = rk.cross_entropy(z, y, impl=impl, reduction="sum")
    for zero in (0, torch.tensor(0, device=DEVICE)):
        assert torch.equal(rk.cross_entropy(z, y, impl=impl, num_items_in_batch=zero), total)


@pytest.mark.parametrize("make", [lambda: rk.RankTuner(clamp_min=True), lambda: rk.TALR(tau=True),
                                  lambda: rk.EAFT(alpha=True), lambda: rk.RankTuner(clamp_min="0.5")])
def test_positive_options_must_be_numbers(make):
    """A bool (an int to Python) or a string is not a positive number."""
    with pytest.raises(ValueError, match="finite number > 0"):
        make()
