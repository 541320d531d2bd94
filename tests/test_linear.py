"""Fused linear path against the reference on materialised logits: values and all three
gradients, every weighting, dtype, bias or not, ignore_index, reduction, chunking."""

import pytest
import torch

import ranktuner_kernels as rk
from helpers import DEVICE, NAMES, loss_and_grads, rel_err

IMPLS = ["reference", "triton"]


def make_head(n_shape, d, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n_shape, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, n_shape, generator=g)
    target.view(-1)[::5] = -100
    # make a spread of p_t: pull each hidden state towards its target's row of W
    h = h + 0.5 * w[target.clamp_min(0)] * torch.rand(*n_shape, 1, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(h), cast(w), cast(b), target.to(DEVICE)


def check_linear(weighting, n_shape, d, v, dtype, bias, reduction, impl, chunk_size=None, seed=0, **kw):
    h, w, b, target = make_head(n_shape, d, v, dtype, bias, seed)
    weighting = rk.TALR(tau=1.5) if weighting == "talr" and len(n_shape) == 1 else weighting
    opts = dict(weighting=weighting, reduction=reduction, **kw)

    def fused(*p):
        return rk.linear_cross_entropy(p[0], p[1], target, linear_bias=p[2] if bias else None,
                                       chunk_size=chunk_size, impl=impl, **opts)

    def materialised(*p):
        logits = p[0] @ p[1].T + (p[2] if bias else 0)
        return rk.cross_entropy(logits, target, impl="reference", **opts)

    params = [t for t in (h, w, b) if t is not None]
    leaf = lambda ts, dt=None: [t.detach().to(dt or t.dtype).requires_grad_() for t in ts]  # noqa: E731
    f_loss, f_grads = loss_and_grads(fused, leaf(params))
    r_loss, r_grads = loss_and_grads(materialised, leaf(params, torch.float64))  # exact
    t_loss, t_grads = loss_and_grads(materialised, leaf(params))  # torch in this dtype
    assert f_loss.dtype == torch.float32 and f_loss.shape == r_loss.shape  # losses come back in float32
    assert rel_err(f_loss, r_loss) <= 3 * rel_err(t_loss, r_loss) + 1e-5
    for fg, rg, tg, p in zip(f_grads, r_grads, t_grads, params):
        assert fg.dtype == p.dtype and fg.shape == p.shape
        assert rel_err(fg, rg) <= 3 * rel_err(tg, rg) + 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_every_weighting(name, dtype, bias, reduction):
    check_linear(name, (2, 5), 16, 300, dtype, bias, reduction, "triton", chunk_size=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 64])
def test_chunking_and_flat_input(chunk_size, impl):
    check_linear("ranktuner", (11,), 24, 257, torch.float32, True, "mean", impl, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_reference_is_exact(reduction):
    """Loss and all three gradients (a random upstream gradient) of the fused path in float64
    equal those of the materialised logits to 1e-12."""
    h, w, b, target = make_head((3, 4), 8, 50, torch.float64, True)
    leaf = lambda: [t.detach().clone().requires_grad_() for t in (h, w, b)]  # noqa: E731
    for name in NAMES:
        got, got_grads = loss_and_grads(lambda hh, ww, bb: rk.linear_cross_entropy(
            hh, ww, target, linear_bias=bb, weighting=name, reduction=reduction, chunk_size=5), leaf())
        want, want_grads = loss_and_grads(lambda hh, ww, bb: rk.cross_entropy(
            hh @ ww.T + bb, target, weighting=name, reduction=reduction), leaf())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, wg in zip(got_grads, want_grads):
            torch.testing.assert_close(g, wg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_stats_and_num_items(impl):
    g = torch.Generator().manual_seed(3)
    kw = dict(token_weight=torch.rand(2, 5, generator=g).to(DEVICE),
              sequence_weight=torch.rand(2, generator=g).to(DEVICE) + 0.5, num_items_in_batch=13)
    check_linear("entropy_reg", (2, 5), 16, 300, torch.float32, True, "mean", impl, chunk_size=4, **kw)
    h, w, b, target = make_head((2, 5), 16, 300, torch.float32, False)
    _, st = rk.linear_cross_entropy(h, w, target, return_stats=True, impl=impl)
    st_ref = rk.token_stats(h @ w.T, target)
    assert torch.equal(st["rank"], st_ref["rank"]) and st["p_t"].shape == target.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_only_some_parameters_need_grad(impl):
    h, w, b, target = make_head((7,), 16, 100, torch.float32, True)
    h.requires_grad_()
    loss = rk.linear_cross_entropy(h, w, target, linear_bias=b, impl=impl, chunk_size=3)
    loss.backward()
    ref = h.detach().clone().requires_grad_()
    rk.cross_entropy(ref @ w.T + b, target).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda h, w, y: rk.linear_cross_entropy(h, w[:, :-1], y), ValueError, "linear_weight"),
        (lambda h, w, y: rk.linear_cross_entropy(h, w.double(), y), TypeError, "linear_weight"),
        (lambda h, w, y: rk.linear_cross_entropy(h, w, y, linear_bias=torch.zeros(3)), ValueError, "linear_bias"),
        (lambda h, w, y: rk.linear_cross_entropy(h, w, y[:-1]), ValueError, "target"),
        (lambda h, w, y: rk.linear_cross_entropy(h, w, y + 1000), ValueError, "target"),
        (lambda h, w, y: rk.linear_cross_entropy(h, w, y, chunk_size=0), ValueError, "chunk_size"),
        (lambda h, w, y: rk.linear_cross_entropy(h.long(), w, y), TypeError, "input"),
    ],
)
def test_bad_input(call, exc, name):
    h, w, _, y = make_head((4,), 8, 20, torch.float32, False)
    with pytest.raises(exc, match=name):
        call(h, w, y)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sft", "ranktuner", "talr", "eaft"])
def test_gpu_large_head(name):
    check_linear(name, (4, 256), 512, 32000, torch.bfloat16, False, "mean", "triton")


@pytest.mark.gpu
def test_gpu_memory_bound():
    """Peak memory above the inputs stays within the documented formula."""
    from ranktuner_kernels._chunks import CHUNK_BYTES

    n, d, v = 16384, 1024, 65536  # bf16 logits would be 2 GiB
    h, w, _, target = make_head((n,), d, v, torch.bfloat16, False)
    h.requires_grad_(), w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rk.linear_cross_entropy(h, w, target).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = n * d * 2 + v * d * 4 + v * d * 2
    assert peak <= grads + CHUNK_BYTES + (32 << 20), (peak, grads)
    assert peak < n * v * 2  # far below even one bf16 copy of the logits


def test_no_grad_forms_no_gradients(monkeypatch):
    """Under torch.no_grad() the forward computes the loss only (ctx.needs_input_grad still
    reports the inputs' requires_grad there)."""
    from ranktuner_kernels import _chunks

    h, w, b, target = make_head((7,), 16, 100, torch.float32, True)
    h.requires_grad_(), w.requires_grad_()
    calls = []
    monkeypatch.setattr(_chunks.Grads, "add_chunk", lambda *a: calls.append(a))
    with torch.no_grad():
        loss = rk.linear_cross_entropy(h, w, target, linear_bias=b, chunk_size=3)
    assert not calls
    torch.testing.assert_close(loss, rk.cross_entropy(h.detach() @ w.detach().T + b, target))


# ---- weight-gradient accumulation policies and the upstream gradient ----------------------


@pytest.mark.parametrize("upstream", [1.0, 0.5, 0.37])
@pytest.mark.parametrize("policy", ["compact", "accurate"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_gradients_within_twice_torchs_error(impl, policy, upstream):
    """Every policy, any upstream gradient: dh and dW in bf16 no further from float64 than
    2x torch's own bf16 error (F.linear then F.cross_entropy in bf16)."""
    h, w, _, target = make_head((96,), 32, 300, torch.bfloat16, False, seed=4)
    sets = {}
    for key, dtype in (("ours", torch.bfloat16), ("torch", torch.bfloat16), ("exact", torch.float64)):
        hh, ww = (t.detach().to(dtype).requires_grad_() for t in (h, w))
        if key == "ours":
            loss = rk.linear_cross_entropy(hh, ww, target, acc_policy=policy, chunk_size=8, impl=impl)
        else:
            loss = torch.nn.functional.cross_entropy(hh @ ww.T, target)
        (loss * upstream).backward()
        sets[key] = (hh.grad, ww.grad)
    for i, name in enumerate(("dh", "dW")):
        ours, theirs = rel_err(sets["ours"][i], sets["exact"][i]), rel_err(sets["torch"][i], sets["exact"][i])
        assert sets["ours"][i].dtype == torch.bfloat16
        assert ours <= 2 * theirs, (name, ours, theirs)


def test_upstream_gradient_rule(monkeypatch):
    """Formed in forward for an upstream 1: a power-of-two upstream scales them (exact), any
    other recomputes the chunks in backward with it."""
    from ranktuner_kernels import _chunks

    h, w, _, target = make_head((12,), 8, 40, torch.bfloat16, False)
    calls = []
    real = _chunks.Grads.add_chunk
    monkeypatch.setattr(_chunks.Grads, "add_chunk", lambda self, *a: (calls.append(1), real(self, *a)))
    for upstream, chunks in ((1.0, 3), (4.0, 3), (0.37, 6)):
        calls.clear()
        hh, ww = (t.detach().requires_grad_() for t in (h, w))
        (rk.linear_cross_entropy(hh, ww, target, chunk_size=4) * upstream).backward()
        assert len(calls) == chunks, (upstream, len(calls))


def test_acc_policy_and_chunk_rule():
    from ranktuner_kernels._chunks import CHUNK_BYTES, chunk_rows, resolve_policy

    assert resolve_policy("auto", torch.bfloat16) == "compact"
    assert resolve_policy("accurate", torch.float16) == "accurate"
    assert resolve_policy("accurate", torch.float32) == "compact"  # the same thing in float32
    with pytest.raises(ValueError, match="acc_policy"):
        resolve_policy("balanced", torch.bfloat16)
    v, d = 152064, 3584
    rows = chunk_rows(8192, v, d, 2, None, "cuda", False)
    assert rows * v * 2 <= CHUNK_BYTES["cuda"] and rows >= 600  # above an H100's ridge point (C / 2 FLOP/B)
    assert chunk_rows(8192, v, d, 2, None, "cuda", True) > rows  # up to the accurate cast's V x D
    assert chunk_rows(10, 100, 8, 4, None, "cpu", False) == 10
    assert chunk_rows(1000, 100, 8, 4, 64, "cpu", False) == 64
    h, w, _, target = make_head((6,), 8, 30, torch.float32, False)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2, acc_policy="compact") \
        if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    if opts is not None:
        torch.testing.assert_close(rk.linear_cross_entropy(h, w, target, options=opts),
                                   rk.linear_cross_entropy(h, w, target))


@pytest.mark.parametrize("impl", IMPLS)
def test_power_of_two_upstream_scales_exactly(impl):
    """The gradients formed in forward (``"mean"``, a weighting that is not batch-level) times a
    power-of-two upstream gradient, above or below 1 or negative, are exactly that multiple of
    the gradients for an upstream of 1 (``test_upstream_gradient_rule`` counts the sweeps)."""
    h, w, b, target = make_head((9,), 8, 40, torch.float32, True)

    def grads(upstream):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        loss = rk.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], chunk_size=4, impl=impl)
        (loss * upstream).backward()
        return [t.grad for t in leaves]

    ones = grads(1.0)
    for upstream in (2.0, 4.0, 0.5, -1.0):
        for got, one in zip(grads(upstream), ones):
            assert torch.equal(got, one * upstream), upstream


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_recomputed_backward_with_every_option(reduction):
    """The backward that recomputes the chunks (a random upstream gradient) with label smoothing
    (its uniform term over ``V``, here ``!= D``), z-loss and a non-negative ``ignore_index`` (kept
    targets on both sides of it): the materialised logits' loss and gradients to 1e-12."""
    h, w, b, target = make_head((3, 4), 8, 50, torch.float64, True)
    target = torch.where(target < 0, 7, target)
    target.view(-1)[:2] = torch.tensor([3, 40])
    assert (target < 7).any() and (target > 7).any() and (target == 7).any()
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, ignore_index=7)
    leaf = lambda: [t.detach().clone().requires_grad_() for t in (h, w, b)]  # noqa: E731
    got, got_grads = loss_and_grads(lambda hh, ww, bb: rk.linear_cross_entropy(
        hh, ww, target, linear_bias=bb, chunk_size=5, **opts), leaf())
    want, want_grads = loss_and_grads(lambda hh, ww, bb: rk.cross_entropy(hh @ ww.T + bb, target, **opts), leaf())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg, rtol=1e-12, atol=1e-12)
