"""Synthetic batches with a realistic spread of ``p_t`` (most targets likely, some hard), for
the demo and the benchmarks. The target's logit gets a boost ``c * U(0, 2)``, with ``c`` found
by bisection so that the mean ``p_t`` of a 512-row sample is ``mean_p`` (about 0.4 in SFT)."""

from __future__ import annotations

import math

import torch


def _bisect(mean_p_of, target, lo=0.0, hi=64.0, steps=30):
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_p_of(mid) < target else (lo, mid)
    return lo


def make_logits(n, v, dtype=torch.bfloat16, device="cpu", mean_p=0.4, seed=0):
    """``[N, V]`` logits (standard normal, then the boost) and ``[N]`` targets."""
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    u = torch.rand(n, generator=g, device=device) * 2
    logits = torch.randn(n, v, generator=g, device=device, dtype=torch.float32)
    rows = torch.arange(n, device=device)

    def mean_p_of(c, k=min(n, 512)):
        z = logits[:k].clone()
        z[rows[:k], y[:k]] += c * u[:k]
        return float(torch.softmax(z, -1).gather(1, y[:k, None]).mean())

    logits[rows, y] += _bisect(mean_p_of, mean_p) * u
    return logits.to(dtype), y


def make_linear_inputs(n, d, v, dtype=torch.bfloat16, device="cpu", mean_p=0.4, seed=0):
    """Hidden states ``[N, D]``, head ``[V, D]`` and targets ``[N]``: ``h = noise + c u W[y]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, d, generator=g, device=device, dtype=torch.float32) / math.sqrt(d)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    noise = torch.randn(n, d, generator=g, device=device)
    direction = w[y] * (torch.rand(n, 1, generator=g, device=device) * 2)

    def mean_p_of(c, k=min(n, 512)):
        return float(torch.softmax((noise[:k] + c * direction[:k]) @ w.T, -1).gather(1, y[:k, None]).mean())

    h = noise + _bisect(mean_p_of, mean_p) * direction
    return h.to(dtype), w.to(dtype), y
