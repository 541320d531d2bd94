"""Vocabulary-parallel ``rk.cross_entropy`` / ``rk.linear_cross_entropy`` (``process_group=``)
with an ``ignore_index`` other than -100: -1 and -2 (each is the other's shard-local "another
shard owns this target" sentinel in ``_distributed.local_target``), an id above the vocabulary,
and 0 and 5, which are also shard-local column indices.

Fast, in this process (gloo groups made on a ``HashStore``, ``vocab_offset`` / ``vocab_size``
given; ``torch.distributed`` stays uninitialised):

* one shard ``[lo, hi)`` on a one-rank group (its all-reduces are the identity), both
  implementations, against the unsharded call on the whole row with every column outside the
  shard at ``-inf`` (the same softmax, so the same loss and gradients);
* two uneven shards on a two-rank group, one thread per rank (the reference implementation:
  Triton's interpreter is not thread-safe), with targets on both shards, so that each shard
  sees targets another shard owns (the sentinel), against the unsharded call.

Slow: two gloo processes (``tests/distributed_cases.py``), both implementations.

``0`` and ``5`` are also shard-local column indices: a target ``y = lo + ignore_index`` owned by
the shard at offset ``lo`` has the local index ``ignore_index``. The shard's passes therefore skip
a value no column has (``_distributed.local_ignore_index``); before that, the shard dropped that
target's row (wrong loss and gradients) and passed every other test of the suite.
"""

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

import ranktuner_kernels as rk

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

V, LO, HI = 41, 13, 29
IGNORE_INDICES = [-100, -1, -2, 10**6, 0, 5]


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group (no default group: ``torch.distributed`` stays uninitialised)."""
    return dist.ProcessGroupGloo(dist.HashStore(), 0, 1)


@pytest.fixture(scope="module")
def two_ranks():
    """A two-rank gloo group in this process: ``[group of rank 0, group of rank 1]``."""
    store = dist.HashStore()
    return on_ranks(lambda rank: dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60)))


def on_ranks(fn, world=2):
    """``[fn(0), ..., fn(world - 1)]``, each on its own thread (the collectives pair up across
    them); an exception on any rank is raised here."""
    out, errors = [None] * world, []

    def run(rank):
        try:
            out[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return out


def batch(ignore_index, seed=0):
    """``[2, 3]`` targets inside the shard: one ignored, and ``LO + ignore_index`` where that is a
    shard column (its local index is then ``ignore_index``)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(LO, HI, (2, 3), generator=g)
    target[0, 1] = ignore_index
    target[1, 2] = LO + (ignore_index if 0 <= ignore_index < HI - LO else 3)
    return target


def masked(logits):
    """``[..., HI - LO]`` shard logits as the whole ``[..., V]`` row, ``-inf`` outside the shard."""
    full = logits.new_full((*logits.shape[:-1], V), float("-inf"))
    return torch.cat([full[..., :LO], logits, full[..., HI:]], -1)


def errors_within(name, got, single, exact, tol=2e-5):
    """The sharded result errs against the float64 one at most twice as much as the unsharded
    call in the same dtype does, plus ``tol`` (``tests/distributed_cases.py``'s measure)."""
    def err(x):
        return float((x.double() - exact).norm() / exact.norm().clamp_min(1e-30))

    assert err(got) <= 2 * err(single) + tol, f"{name}: error {err(got):.3g} vs unsharded {err(single):.3g}"


def run(fn, leaves, g_seed=1):
    """``fn(*leaves)`` and the leaves' gradients for a random upstream gradient."""
    loss = fn(*leaves)
    g = torch.Generator().manual_seed(g_seed)
    (loss * (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)).sum().backward()
    return [loss.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("weighting, reduction", [("ranktuner", "mean"), ("eaft", "none")])
def test_logits_shard_with_ignore_index(one_rank, weighting, reduction, impl, ignore_index):
    target = batch(ignore_index)
    g = torch.Generator().manual_seed(2)
    shard64 = torch.randn(2, 3, HI - LO, generator=g, dtype=torch.float64) * 4
    kw = dict(weighting=weighting, reduction=reduction, ignore_index=ignore_index)

    def leaf(t):
        return t.clone().requires_grad_()

    got = run(lambda x: rk.cross_entropy(x, target, process_group=one_rank, vocab_offset=LO, vocab_size=V, impl=impl,
                                         **kw), [leaf(shard64.float())])
    single = run(lambda x: rk.cross_entropy(masked(x), target, impl=impl, **kw), [leaf(shard64.float())])
    exact = run(lambda x: rk.cross_entropy(masked(x), target, impl="reference", **kw), [leaf(shard64)])
    assert torch.isfinite(exact[0]).all() and (exact[1] != 0).any()
    for name, a, b, c in zip(("loss", "grad"), got, single, exact):
        errors_within(name, a, b, c)


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_shard_with_ignore_index(one_rank, impl, ignore_index):
    """The fused path on the head's rows ``[LO, HI)`` (and bias): loss, ``dh``, ``dW``, ``db``."""
    target = batch(ignore_index)
    g = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(HI - LO, 8, generator=g,
               dtype=torch.float64) * 1.5, torch.randn(HI - LO, generator=g, dtype=torch.float64))
    kw = dict(weighting="ranktuner", ignore_index=ignore_index)

    def leaves(dtype):
        return [t.to(dtype).clone().requires_grad_() for t in (h, w, b)]

    got = run(lambda h_, w_, b_: rk.linear_cross_entropy(h_, w_, target, linear_bias=b_, process_group=one_rank,
                                                         vocab_offset=LO, vocab_size=V, impl=impl, **kw),
              leaves(torch.float32))
    single = run(lambda h_, w_, b_: rk.cross_entropy(masked(torch.nn.functional.linear(h_, w_, b_)), target, impl=impl,
                                                     **kw), leaves(torch.float32))
    exact = run(lambda h_, w_, b_: rk.cross_entropy(masked(torch.nn.functional.linear(h_, w_, b_)), target,
                                                    impl="reference", **kw), leaves(torch.float64))
    for name, a, s, e in zip(("loss", "dh", "dW", "db"), got, single, exact):
        errors_within(name, a, s, e)


SIZES = (21, 16)  # two uneven shards of V2 = 37 columns


def two_shard_batch(ignore_index, seed=0):
    """``[2, 4]`` targets over the whole vocabulary (both shards own some), one ignored, and
    ``21 + ignore_index`` where that is a column of the second shard."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, sum(SIZES), (2, 4), generator=g)
    target[0, 0], target[0, 1], target[1, 0] = 3, ignore_index, SIZES[0] + 2  # one on each shard
    if 0 <= ignore_index < SIZES[1]:
        target[1, 3] = SIZES[0] + ignore_index
    return target


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("path, weighting, reduction", [("logits", "ranktuner", "mean"), ("logits", "eaft", "none"),
                                                        ("logits", "talr", "sum"), ("linear", "ranktuner", "mean")])
def test_two_shards_with_ignore_index(two_ranks, path, weighting, reduction, ignore_index):
    """Two shards of 21 and 16 columns: the loss on every rank and the gradients (the shards'
    ``dz`` or ``dW`` / ``db`` side by side; ``dh``, summed over the group, on every rank)."""
    target = two_shard_batch(ignore_index)
    v = sum(SIZES)
    bounds = [(0, SIZES[0]), (SIZES[0], v)]
    g = torch.Generator().manual_seed(4)
    kw = dict(weighting=weighting, reduction=reduction, ignore_index=ignore_index, impl="reference")
    if path == "logits":
        full = [torch.randn(2, 4, v, generator=g, dtype=torch.float64) * 4]

        def loss(tensors, **more):
            return rk.cross_entropy(tensors[0], target, **kw, **more)

        def shard(tensors, lo, hi):
            return [tensors[0][..., lo:hi]]
    else:
        full = [torch.randn(2, 4, 8, generator=g, dtype=torch.float64), torch.randn(v, 8, generator=g,
                dtype=torch.float64) * 1.5, torch.randn(v, generator=g, dtype=torch.float64)]

        def loss(tensors, **more):
            h, w, b = tensors
            return rk.linear_cross_entropy(h, w, target, linear_bias=b, **kw, **more)

        def shard(tensors, lo, hi):
            return [tensors[0], tensors[1][lo:hi], tensors[2][lo:hi]]

    def leaves(tensors, dtype):
        return [t.to(dtype).clone().requires_grad_() for t in tensors]

    def on_rank(rank):
        lo, hi = bounds[rank]
        return run(lambda *ts: loss(ts, process_group=two_ranks[rank], vocab_offset=lo, vocab_size=v),
                   leaves(shard(full, lo, hi), torch.float32))

    ranks = on_ranks(on_rank)
    single = run(lambda *ts: loss(ts), leaves(full, torch.float32))
    exact = run(lambda *ts: loss(ts), leaves(full, torch.float64))
    assert torch.isfinite(exact[0]).all()
    for rank in ranks:
        errors_within("loss", rank[0], single[0], exact[0])
    if path == "logits":
        errors_within("grad", torch.cat([r[1] for r in ranks], -1), single[1], exact[1])
    else:
        for rank in ranks:
            errors_within("dh", rank[1], single[1], exact[1])
        for i, name in ((2, "dW"), (3, "db")):
            errors_within(name, torch.cat([r[i] for r in ranks], 0), single[i], exact[i])


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["ignore2", "ignore2-collide"])
def test_two_ranks_with_ignore_index(suite, tmp_path):
    """Two gloo ranks (uneven shards of 21 and 16 columns), both paths and implementations:
    loss, statistics and gradients against the unsharded call (``distributed_cases``)."""
    import distributed_cases

    distributed_cases.run_suite(suite, 2, str(tmp_path))


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_local_ignore_index_is_no_column(ignore_index):
    """The shard-local ignore value is negative whatever the shard's size (no local column can
    equal it), and a negative ``ignore_index`` is kept as it is."""
    from ranktuner_kernels._distributed import local_ignore_index

    local = local_ignore_index(ignore_index)
    assert local < 0
    assert ignore_index >= 0 or local == ignore_index


def test_target_fingerprint_sees_every_position():
    """The fingerprint that the ranks of a group all-gather to check they hold the same targets
    (``_distributed._checksum``, when ``vocab_offset`` / ``vocab_size`` are not given) changes
    with a change of any one target, the first included."""
    from ranktuner_kernels._distributed import _checksum

    target = two_shard_batch(-100).view(-1)
    for pos in range(target.numel()):
        other = target.clone()
        other[pos] += 1
        assert _checksum(other) != _checksum(target), pos


def test_two_linear_shards_in_bf16(two_ranks):
    """16-bit hidden states and head on two shards: each rank accumulates its part of ``dh`` in
    float32, chunk by chunk (``chunk_size=3``: three chunks of its 8 rows), before the group's sum and
    the one rounding: loss, ``dh`` (every rank), ``dW`` and ``db`` err against float64 at most
    twice as much as the unsharded bf16 call."""
    target = two_shard_batch(-100)
    v = sum(SIZES)
    bounds = [(0, SIZES[0]), (SIZES[0], v)]
    g = torch.Generator().manual_seed(6)
    full = [torch.randn(2, 4, 8, generator=g, dtype=torch.float64), torch.randn(v, 8, generator=g,
            dtype=torch.float64) * 1.5, torch.randn(v, generator=g, dtype=torch.float64)]

    def loss(tensors, **more):
        h, w, b = tensors
        return rk.linear_cross_entropy(h, w, target, linear_bias=b, impl="reference", **more)

    def leaves(tensors, dtype):
        return [t.to(dtype).clone().requires_grad_() for t in tensors]

    def on_rank(rank):
        lo, hi = bounds[rank]
        shard = [full[0], full[1][lo:hi], full[2][lo:hi]]
        return run(lambda *ts: loss(ts, process_group=two_ranks[rank], vocab_offset=lo, vocab_size=v, chunk_size=3),
                   leaves(shard, torch.bfloat16))

    ranks = on_ranks(on_rank)
    single = run(lambda *ts: loss(ts), leaves(full, torch.bfloat16))
    exact = run(lambda *ts: loss(ts), leaves(full, torch.float64))
    for rank in ranks:
        assert rank[1].dtype == torch.bfloat16
        errors_within("loss", rank[0], single[0], exact[0])
        errors_within("dh", rank[1], single[1], exact[1])
    for i, name in ((2, "dW"), (3, "db")):
        errors_within(name, torch.cat([r[i] for r in ranks], 0), single[i], exact[i])


@pytest.mark.filterwarnings("error:An output with one or more elements was resized")
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_shard_in_bf16(one_rank, impl):
    """A 16-bit fused call on a shard accumulates ``dh`` in float32 (a shard's partial sum),
    chunk by chunk (``chunk_size=2``: three chunks, each written into its own rows: torch's
    resizing of a mis-sized ``out=`` view, a warning here, would hide a wrong slice): loss, ``dh``,
    ``dW``, ``db`` err against float64 at most twice as much as the unsharded bf16 call."""
    target = batch(-100)
    g = torch.Generator().manual_seed(5)
    h, w, b = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(HI - LO, 8, generator=g,
               dtype=torch.float64) * 1.5, torch.randn(HI - LO, generator=g, dtype=torch.float64))

    def leaves(dtype):
        return [t.to(dtype).clone().requires_grad_() for t in (h, w, b)]

    got = run(lambda h_, w_, b_: rk.linear_cross_entropy(h_, w_, target, linear_bias=b_, process_group=one_rank,
                                                         vocab_offset=LO, vocab_size=V, impl=impl, chunk_size=2),
              leaves(torch.bfloat16))
    single = run(lambda h_, w_, b_: rk.cross_entropy(masked(torch.nn.functional.linear(h_, w_, b_)), target, impl=impl),
                 leaves(torch.bfloat16))
    exact = run(lambda h_, w_, b_: rk.cross_entropy(masked(torch.nn.functional.linear(h_, w_, b_)), target,
                                                    impl="reference"), leaves(torch.float64))
    assert got[1].dtype == torch.bfloat16
    for name, a, s, e in zip(("loss", "dh", "dW", "db"), got, single, exact):
        errors_within(name, a, s, e)
