"""The one call preparation (``_call``): every entry point fails the same way on a bad
argument, naming it; empty batches; ``inplace_backward`` on views; the vocabulary-parallel
merge, in one process."""

import math

import pytest
import torch

import ranktuner_kernels as rk
from helpers import DEVICE, make_batch
from ranktuner_kernels import _distributed, _inputs, reference
from ranktuner_kernels.reference import Transform
from ranktuner_kernels.rl import aggregate

IMPLS = ["reference", "triton"]


# ---- argument errors: every entry point, a ValueError/TypeError naming the argument ---------


def _head(n=(2, 3), d=4, v=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*n, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype)
    y = torch.randint(0, v, n, generator=g)
    return h, w, y


BAD = [
    # the drifted copies of issue 17
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h, w, y, linear_bias=torch.zeros(3)), ValueError,
     "linear_bias"),
    ("linear_cross_entropy", lambda z, y, h, w: rk.linear_cross_entropy(h, w, y, num_items_in_batch=torch.ones(2)),
     ValueError, "num_items_in_batch"),
    ("cross_entropy", lambda z, y, h, w: rk.cross_entropy(z, y, num_items_in_batch=torch.ones(2)), ValueError,
     "num_items_in_batch"),
    ("linear_cross_entropy", lambda z, y, h, w: rk.linear_cross_entropy(h.to("meta"), w, y), ValueError, "input"),
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h.to("meta"), w, y), ValueError, "input"),
    ("cross_entropy", lambda z, y, h, w: rk.cross_entropy(z.to("meta"), y.to("meta")), ValueError, "input"),
    # the same argument on the other entry points
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h, w[:, :-1], y), ValueError, "linear_weight"),
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h, w.double(), y), TypeError, "linear_weight"),
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h, w, y, acc_policy="fast"), ValueError, "acc_policy"),
    ("linear_logprobs", lambda z, y, h, w: rk.linear_logprobs(h, w, y, chunk_size=0), ValueError, "chunk_size"),
    ("logprobs", lambda z, y, h, w: rk.logprobs(z, y, temperature=0.0), ValueError, "temperature"),
    ("logprobs", lambda z, y, h, w: rk.logprobs(z, y.float()), TypeError, "target"),
    ("logprobs", lambda z, y, h, w: rk.logprobs(z, y, ignore_index=None, impl="gpu"), ValueError, "impl"),
    ("logprobs", lambda z, y, h, w: rk.logprobs(z, y + 100), ValueError, "target"),
    ("token_stats", lambda z, y, h, w: rk.token_stats(z, y, softcap=-1.0), ValueError, "softcap"),
    ("token_stats", lambda z, y, h, w: rk.token_stats(z, y, ignore_index=0.5), TypeError, "ignore_index"),
    ("token_stats", lambda z, y, h, w: rk.token_stats(z, y, vocab_size=9), ValueError, "vocab_size"),
    ("linear_cross_entropy", lambda z, y, h, w: rk.linear_cross_entropy(h, w, y, num_items_in_batch=True), TypeError,
     "num_items_in_batch"),
    ("linear_cross_entropy", lambda z, y, h, w: rk.linear_cross_entropy(h, w, y, vocab_offset=0), ValueError,
     "vocab_offset"),
    ("TokenReweightedLoss", lambda z, y, h, w: rk.TokenReweightedLoss("dft", softcapp=30.0), TypeError, "softcapp"),
    ("LinearTokenReweightedLoss", lambda z, y, h, w: rk.LinearTokenReweightedLoss(w, chunks=3), TypeError, "chunks"),
    ("TokenReweightedLoss", lambda z, y, h, w: rk.TokenReweightedLoss("nope"), ValueError, "weighting"),
    # the hints
    ("cross_entropy", lambda z, y, h, w: rk.cross_entropy(z.movedim(-1, 1), y), ValueError, r"movedim\(1, -1\)"),
    ("cross_entropy", lambda z, y, h, w: rk.cross_entropy(z, y, "ranktuner"), TypeError, "weighting='ranktuner'"),
    ("cross_entropy", lambda z, y, h, w: rk.cross_entropy(z, y, rk.DFT()), TypeError, "keyword-only"),
    ("linear_cross_entropy", lambda z, y, h, w: rk.linear_cross_entropy(h, w, y, weight="dft"), TypeError,
     "keyword-only"),
]


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_names_itself(case):
    _, call, exc, name = BAD[case]
    z, y = make_batch(2, 3, 9, torch.float32, "cpu", ignore=False)
    h, w, _ = _head()
    with pytest.raises(exc, match=name):
        call(z, y, h, w)


def test_a_class_first_input_that_fits_gets_no_hint():
    """The hint is only given where the target's shape is the class-first reading of the input."""
    z, y = make_batch(2, 3, 9, torch.float32, "cpu")
    with pytest.raises(ValueError) as e:
        rk.cross_entropy(z, y[:, :2])
    assert "movedim" not in str(e.value)


def test_num_items_in_batch_is_one_rule_in_the_losses_and_aggregate():
    """0 divides by 1, NaN gives NaN, a negative number raises, a 2-element tensor raises: the
    losses (both paths) and ``rl.aggregate`` alike."""
    z, y = make_batch(2, 3, 9, torch.float64, "cpu")
    h, w, _ = _head(dtype=torch.float64)
    values, mask = torch.rand(2, 3, dtype=torch.float64), (y != -100)
    calls = {
        "cross_entropy": (lambda n: rk.cross_entropy(z, y, num_items_in_batch=n),
                          rk.cross_entropy(z, y, reduction="sum")),
        "linear_cross_entropy": (lambda n: rk.linear_cross_entropy(h, w, y, num_items_in_batch=n),
                                 rk.linear_cross_entropy(h, w, y, reduction="sum")),
        "aggregate": (lambda n: aggregate(values, mask, "token-mean", num_items_in_batch=n),
                      (values * mask).sum()),
    }
    for name, (fn, total) in calls.items():
        for zero in (0, 0.0, torch.tensor(0)):
            torch.testing.assert_close(fn(zero), total, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(fn(torch.tensor(4.0)), total / 4, msg=name)
        assert math.isnan(float(fn(float("nan")))), name
        for bad, exc in ((-2, ValueError), (torch.ones(2), ValueError), ("4", TypeError), (True, TypeError)):
            with pytest.raises(exc, match="num_items_in_batch"):
                fn(bad)


# ---- empty batches: a zero loss and empty gradients on every path ------------------------


def _empty_cases():
    for shape in [(0, 3), (2, 0), (0,)]:
        for reduction in ("mean", "sum", "none"):
            for name in ("sft", "ranktuner", "talr", "eaft"):
                if name == "talr" and len(shape) != 2:
                    continue
                yield shape, reduction, name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, reduction, name", list(_empty_cases()))
def test_empty_batch_losses(shape, reduction, name, impl):
    v, d = 7, 4
    x = torch.randn(*shape, v, device=DEVICE).requires_grad_()
    h = torch.randn(*shape, d, device=DEVICE).requires_grad_()
    w = torch.randn(v, d, device=DEVICE).requires_grad_()
    y = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    for loss, inputs in ((rk.cross_entropy(x, y, weighting=name, reduction=reduction, impl=impl), [x]),
                         (rk.linear_cross_entropy(h, w, y, weighting=name, reduction=reduction, impl=impl), [h, w])):
        assert loss.dtype == torch.float32 and loss.shape == (shape if reduction == "none" else ())
        assert torch.all(loss == 0)
        loss.sum().backward()
        for t in inputs:
            assert t.grad.shape == t.shape and torch.all(t.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0,)])
def test_empty_batch_statistics_and_logprobs(shape, impl):
    v, d = 7, 4
    x = torch.randn(*shape, v, device=DEVICE).requires_grad_()
    h = torch.randn(*shape, d, device=DEVICE).requires_grad_()
    w = torch.randn(v, d, device=DEVICE).requires_grad_()
    y = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    assert all(s.shape == shape for s in rk.token_stats(x, y, impl=impl).values())
    for (logp, ent), inputs in ((rk.logprobs(x, y, impl=impl), [x]), (rk.linear_logprobs(h, w, y, impl=impl), [h, w])):
        assert logp.shape == ent.shape == shape
        (logp.sum() + ent.sum()).backward()
        for t in inputs:
            assert t.grad.shape == t.shape and torch.all(t.grad == 0)


# ---- inplace_backward: every view whose elements do not overlap, and only those ----------


def _brute_force_overlaps(t):
    offsets = torch.zeros(1, dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = (offsets[:, None] + st * torch.arange(n)).reshape(-1)
    return torch.unique(offsets).numel() != offsets.numel()


def test_overlap_check_is_exact_on_small_views():
    """Against enumerating every element's offset: slices, transposes, expansions and random
    ``as_strided`` views, interleaved strides included."""
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(4096)
    x = torch.zeros(4, 5, 6)
    views = [x, x[:, :-1], x[:, ::2], x[1:, :, ::3], x.transpose(0, 2), x.movedim(1, -1), x[:1].expand(3, 5, 6),
             x[:, :1].expand(4, 2, 6), x[..., :0]]
    for _ in range(300):
        dims = int(torch.randint(1, 4, (1,), generator=g))
        shape = torch.randint(1, 5, (dims,), generator=g).tolist()
        stride = torch.randint(0, 7, (dims,), generator=g).tolist()
        views.append(base.as_strided(shape, stride))
    seen = {True: 0, False: 0}
    for v in views:
        want = _brute_force_overlaps(v)
        assert _inputs.overlaps(v) == want, (tuple(v.shape), v.stride())
        seen[want] += 1
    assert seen[True] > 20 and seen[False] > 20
    # beyond the enumeration budget an interleaved view counts as overlapping (refused)
    interleaved = base.as_strided((3, 3), (2, 3))
    assert not _brute_force_overlaps(interleaved) and _inputs.overlaps(interleaved, max_enumerated=4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("view", ["causal_shift", "strided_rows", "sliced_batch", "strided_classes"])
def test_inplace_backward_on_a_view_that_does_not_overlap(view, impl):
    """``rk.cross_entropy(logits[:, :-1], labels[:, 1:], inplace_backward=True)``: the README's
    shift; the gradient is the out-of-place one, written over the view's elements."""
    full, y = make_batch(2, 6, 40, torch.float32, DEVICE)
    pick = {"causal_shift": (lambda t: t[:, :-1], lambda t: t[:, 1:]),
            "strided_rows": (lambda t: t[:, ::2], lambda t: t[:, ::2]),
            "sliced_batch": (lambda t: t[1:], lambda t: t[1:]),
            "strided_classes": (lambda t: t[..., ::2], lambda t: t % 20)}[view]
    z, target = pick[0](full), pick[1](y)
    if view == "strided_classes":
        target = torch.where(y == -100, -100, target)
    base = full.clone().requires_grad_()
    want = rk.cross_entropy(pick[0](base), target, weighting="ranktuner", impl=impl)
    want.backward()
    leaf = full.clone().requires_grad_()
    work = leaf.clone()  # a non-leaf whose memory the backward may overwrite
    got = rk.cross_entropy(pick[0](work), target, weighting="ranktuner", impl=impl, inplace_backward=True)
    got.backward()
    assert torch.equal(got, want)
    torch.testing.assert_close(leaf.grad, base.grad, rtol=0, atol=0)
    if view != "strided_classes":  # unit last stride: written over the view's own memory
        assert torch.equal(pick[0](work.detach()), pick[0](base.grad))


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_refuses_overlapping_views(impl):
    y = torch.randint(0, 5, (4,), device=DEVICE)
    flat = torch.randn(20, device=DEVICE).requires_grad_()
    for view in (flat.as_strided((4, 5), (2, 1)), flat[:5].expand(4, 5)):
        with pytest.raises(ValueError, match="input: inplace_backward"):
            rk.cross_entropy(view, y, impl=impl, inplace_backward=True)


# ---- the vocabulary-parallel merge, in one process ------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tr", [Transform(), Transform(softcap=8.0, temperature=0.7)])
@pytest.mark.parametrize("bounds", [(0, 13, 29, 41), (0, 1, 40, 41), (0, 20, 41)])
def test_vocab_parallel_merge_equals_the_whole_row(bounds, tr, impl):
    """What ``ShardedBackend.row_stats`` computes across ranks, with the collectives done by
    hand: the target logit's MAX, each shard's partial pass, the MAX of the shards' maxima,
    the SUM of their rescaled packets, the final formulas; against the unsharded float64
    statistics, the optional ones included (``is_top1`` counts the ties after the target in
    the shards that follow the owner's). Uneven shards of 1 to 28 columns, a shard of -inf
    logits, an ignored row, ties of the target's logit in shards before and after it."""
    logits, target = make_batch(2, 3, 41, torch.float32, "cpu", seed=5)
    logits[0, 2, 13:29] = float("-inf")
    logits[1, 0] = logits[1, 0].round()  # many ties
    top = float(logits.max()) + 1
    target[1, 1], logits[1, 1, 25], logits[1, 1, 3] = 25, top, top  # the max, tied before: not top-1
    target[1, 2], logits[1, 2, 5], logits[1, 2, 40] = 5, top, top  # the max, tied after: top-1 (first index)
    flat = target.reshape(-1)
    keep = flat != -100
    shards = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    every = frozenset(reference.OPTIONAL_STATS)
    params = rk._params.LossParams(rk.SFT(), rk._dispatch.get_backend(impl, logits), (2, 3), -100, transform=tr,
                                   asked_stats=every)
    locals_, parts = [], []
    for lo, hi in shards:
        shard = _distributed.VocabShard(None, lo, hi - lo, 41, len(shards))
        loc = _distributed.local_target(flat, shard, -100)
        z = logits[..., lo:hi].contiguous()
        locals_.append((z, loc))
        parts.append(reference.target_logit(z, loc, -100))
    zy = torch.stack(parts).amax(0)  # all-reduce MAX
    partial = [params.backend.partial_row_stats(z, loc, zy, params) for z, loc in locals_]
    big_m = torch.stack([p["m"].float() for p in partial]).amax(0)  # all-reduce MAX
    packets = [_distributed.merge_packet(p, big_m) for p in partial]
    names = packets[0][0]
    merged = dict(zip(names, sum(packet for _, packet in packets).unbind(1)), m=big_m)  # all-reduce SUM
    got = reference.finish_row_stats(merged, zy, keep, tr, 41)
    want = reference.row_stats(logits.double(), flat, -100, tr, every)
    assert set(got.present()) == set(reference.STAT_NAMES)
    for name in ("lse", "logp_t", "entropy", "logit_mean", "log_sum_p2", "target_logit", "max_logit", "p_max"):
        a, b = getattr(got, name), getattr(want, name)
        torch.testing.assert_close(a[keep].double(), b[keep], rtol=2e-5, atol=2e-5, msg=name)
    for name in ("rank", "is_top1"):
        assert torch.equal(getattr(got, name)[keep], getattr(want, name)[keep]), name
    assert torch.equal(got.is_top1[keep], (logits.argmax(-1).reshape(-1) == flat)[keep])  # torch's tie rule
    assert got.is_top1[5] and not got.is_top1[4] and got.rank[4] == got.rank[5] == 2
