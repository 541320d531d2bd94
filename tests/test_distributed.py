"""Vocabulary-parallel and data-parallel losses on torch.distributed (``docs/distributed.md``).

The slow tests spawn gloo process groups on 127.0.0.1 (2 and 4 CPU processes; the kernels
under the Triton interpreter) and run many cases inside one spawn (``distributed_cases.py``):
every objective on both paths and both implementations, float32 and bfloat16, uneven
shards, ignored tokens, every reduction, the options, DDP with uneven token counts, FSDP2
and ColwiseParallel DTensor heads. The fast tests check the shard's partial pass (kernel
against reference) and the argument checks without a process group.
"""

import pytest
import torch
import torch.distributed as dist

import ranktuner_kernels as rk
from ranktuner_kernels import reference
from ranktuner_kernels.reference import Transform
from helpers import make_batch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _run_suite(suite, world, tmp_path):
    import distributed_cases

    distributed_cases.run_suite(suite, world, str(tmp_path))


@pytest.mark.slow
def test_two_ranks(tmp_path):
    """Every objective x paths x implementations, options, DDP, FSDP2, DTensor: 2 gloo ranks."""
    _run_suite("tp2", 2, tmp_path)


@pytest.mark.slow
def test_four_ranks(tmp_path):
    """Four uneven shards (one of 5 columns, below EAFT's k), DTensor and DDP: 4 gloo ranks."""
    _run_suite("tp4", 4, tmp_path)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tr", [Transform(), Transform(6.0, 0.7)], ids=["plain", "cap-temp"])
def test_partial_pass_matches_reference(impl, dtype, tr):
    """A shard's accumulators, the optional ones included: the kernel's against the float64
    reference's; a shard that owns some targets and not others (before and after it), an
    ignored row, a row of -inf logits on the shard."""
    logits, target = make_batch(2, 3, 41, dtype, "cpu", seed=3)
    lo, hi = 10, 29
    shard = logits[..., lo:hi].clone()
    shard[1, 0] = float("-inf")
    flat = target.reshape(-1)
    keep = flat != -100
    owned = keep & (flat >= lo) & (flat < hi)
    local = torch.where(owned, flat - lo, torch.where(keep, torch.where(flat < lo, -1, hi - lo), flat))
    zy = logits.reshape(-1, 41).float()[torch.arange(6), flat.clamp_min(0)]
    every = frozenset(reference.OPTIONAL_STATS)
    want = reference.partial_row_stats(shard.double(), local, zy.double(), -100, tr, every)
    params = rk._params.LossParams(rk.SFT(), rk._dispatch.get_backend(impl, shard), (2, 3), -100, transform=tr,
                                   asked_stats=every)
    got = params.backend.partial_row_stats(shard, local, zy, params)
    assert owned.any() and (keep & ~owned).any()
    assert tuple(got) == tuple(want) == reference.accumulators_for(every)
    for name in ("r", "ties"):
        assert torch.equal(got[name].long(), want[name].long()), name
    if tr.softcap is None:  # under the cap, -inf is -c (SPEC)
        assert got["m"][3] == float("-inf") and got["u"][3] == 0 and got["a"][3] == 0
    for name in ("m", "u", "a", "zsum", "sum_e2"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=2e-5, atol=2e-5, msg=name)


def test_finish_of_a_whole_row_is_the_softmax_statistics():
    """``finish_row_stats`` of one shard holding the whole vocabulary gives the statistics of
    SPEC, written out naively in float64 on the transformed logits."""
    logits, target = make_batch(2, 3, 50, torch.float64, "cpu", seed=2)
    flat = target.reshape(-1)
    keep = flat != -100
    zy = reference.target_logit(logits, flat, -100)
    tr = Transform(5.0, 1.3)
    acc = reference.partial_row_stats(logits, flat, zy, -100, tr, frozenset(reference.OPTIONAL_STATS))
    got = reference.finish_row_stats(acc, zy, keep, tr, 50)
    z = (5.0 * torch.tanh(logits / 5.0) / 1.3).reshape(-1, 50)[keep]
    y = flat[keep]
    logp = torch.log_softmax(z, -1)
    raw = logits.reshape(-1, 50)[keep]
    want = dict(lse=torch.logsumexp(z, -1), logp_t=logp.gather(1, y[:, None])[:, 0], max_logit=z.amax(-1),
                entropy=-(logp.exp() * logp).sum(-1), logit_mean=z.mean(-1),
                log_sum_p2=torch.log((2 * logp).exp().sum(-1)))
    for key, value in want.items():
        torch.testing.assert_close(getattr(got, key)[keep], value, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.rank[keep], (raw >= raw.gather(1, y[:, None])).sum(-1))
    assert torch.equal(got.is_top1[keep], raw.argmax(-1) == y)
    assert torch.all(got.lse[~keep] == 0) and torch.all(got.rank[~keep] == 0)


def test_vocab_arguments_need_a_group():
    logits, target = make_batch(1, 3, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="process_group"):
        rk.cross_entropy(logits, target, vocab_offset=0, vocab_size=10)
    with pytest.raises(ValueError, match="process_group"):
        rk.linear_cross_entropy(torch.randn(1, 3, 4), torch.randn(10, 4), target, vocab_size=10)


def test_head_cross_entropy_of_a_plain_head():
    """Without FSDP or DTensor, ``head_cross_entropy`` is the plain call on the head's parameters."""
    from ranktuner_kernels.distributed import head_cross_entropy

    head = torch.nn.Linear(4, 11)
    h = torch.randn(2, 3, 4)
    y = torch.randint(0, 11, (2, 3))
    got = head_cross_entropy(head, h, y, weighting="ranktuner")
    want = rk.linear_cross_entropy(h, head.weight, y, linear_bias=head.bias, weighting="ranktuner")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
