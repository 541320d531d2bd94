"""pytest-benchmark microbenchmarks of every public operation and weighting.

    pytest bench/ --benchmark-only                      # CPU: the reference fallback
    pytest bench/ --benchmark-only --benchmark-save=x   # then: pytest-benchmark compare

On a GPU the timed callable ends with ``torch.cuda.synchronize()``, warm-up rounds are
excluded, and each round takes the next of several input sets so that repeated rounds do
not find their inputs in L2. Peak memory above the inputs goes into ``extra_info``.
"""

import itertools

import pytest
import torch

import ranktuner_kernels as rk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
N, D, V = (8192, 4096, 128256) if CUDA else (256, 128, 8192)
B = 8  # sequences (TALR's median is over them)
ROTATE = 3 if CUDA else 1
WEIGHTINGS = sorted(rk.weightings.WEIGHTINGS)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _logits_sets():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = []
    for _ in range(ROTATE):
        z = torch.randn(N, V, generator=g, device=DEVICE).mul_(2).to(DTYPE).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g, device=DEVICE)
        with torch.no_grad():
            z[torch.arange(N), y] += 6  # most targets likely
        out.append((z, y))
    return out


def _linear_sets():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    w = (torch.randn(V, D, generator=g, device=DEVICE) / D**0.5).to(DTYPE).requires_grad_()
    out = []
    for _ in range(ROTATE):
        y = torch.randint(0, V, (N,), generator=g, device=DEVICE)
        h = (torch.randn(N, D, generator=g, device=DEVICE) + 4 * w.detach()[y].float()).to(DTYPE).requires_grad_()
        out.append((h, w, y))
    return out


@pytest.fixture(scope="module")
def logits_sets():
    return _logits_sets()


@pytest.fixture(scope="module")
def linear_sets():
    return _linear_sets()


def run(benchmark, fn, sets, params_of):
    cycle = itertools.cycle(sets)

    def setup():
        args = next(cycle)
        for p in params_of(args):
            p.grad = None
        _sync()
        return args, {}

    def timed(*args):
        fn(*args)
        _sync()

    benchmark.pedantic(timed, setup=setup, rounds=10 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
    if CUDA:
        args = sets[0]
        for p in params_of(args):
            p.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        _sync()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", N=N, V=V, dtype=str(DTYPE))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cross_entropy_fwd_bwd(benchmark, logits_sets, weighting):
    run(benchmark, lambda z, y: rk.cross_entropy(z.view(B, -1, V), y.view(B, -1), weighting=weighting).backward(),
        logits_sets, lambda a: a[:1])


@pytest.mark.parametrize("weighting", ["sft", "ranktuner", "talr"])
def test_linear_cross_entropy_fwd_bwd(benchmark, linear_sets, weighting):
    run(benchmark, lambda h, w, y: rk.linear_cross_entropy(h.view(B, -1, D), w, y.view(B, -1), weighting=weighting).backward(),
        linear_sets, lambda a: a[:2])
    benchmark.extra_info["D"] = D


def test_token_stats(benchmark, logits_sets):
    run(benchmark, lambda z, y: rk.token_stats(z.detach(), y), logits_sets, lambda a: [])


def test_naive_ranktuner_fwd_bwd(benchmark, logits_sets):
    """The materialising loss a user writes today, for comparison with the chunked path."""

    def naive(z, y):
        logp = torch.log_softmax(z.float(), -1)
        p = logp.exp()
        lp = logp.gather(1, y[:, None])[:, 0]
        h_bits = -(p * logp).sum(-1) / 0.6931471805599453
        rank = (z >= z.gather(1, y[:, None])).sum(-1).float()
        s = torch.where(h_bits >= 2, 2**h_bits / 4 + 1, 2 - p.max(-1).values)
        k = torch.log2(torch.maximum(rank, s) + 1) ** -2
        w = (lp.exp() * torch.clamp(lp.exp() * s, min=1e-6) ** -k).detach()
        (w * -lp).mean().backward()

    run(benchmark, naive, logits_sets, lambda a: a[:1])
