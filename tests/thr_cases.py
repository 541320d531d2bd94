"""Shared THR test inputs (``test_thr*.py``): row-level cases for the pair sums, batch-level
cases for ``token_hidden_reward``, the relative error the float32 checks use, and strided
views of a tensor (same values, other layouts)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows_case(n=40, v=300, d=24, groups=2, seed=0, dtype=torch.float32, peaked=True):
    """Logits with a spread of confidences (some rows peaked on their sampled token), groups of
    rows, an observed subset with random weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, v, (n,), generator=g)
    if peaked:
        boost = torch.rand(n, generator=g, dtype=torch.float64) * 10 - 2
        logits[torch.arange(n), tokens] += boost
        tokens[1::7] = tokens[0]  # repeated tokens: the 1[y_o = y_u] term
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    group = torch.arange(n) * groups // n
    u_rows = torch.randperm(n, generator=g)[: n - 3]
    o_rows = torch.randperm(n, generator=g)[: n // 2]
    o_w = torch.rand(o_rows.numel(), generator=g, dtype=torch.float64) + 0.5
    return (logits.to(dtype), tokens, u_rows, group[u_rows], o_rows, group[o_rows], o_w, hidden.to(dtype))


def batch_case(seed=0, b=6, t=7, v=60, d=12, dtype=torch.float32, peak=0.0):
    """Six responses in two groups (three correct, two padded ends). ``peak > 0``: every other
    position's sampled token gets ``peak`` added to its logit (LLM-like magnitudes: logits of
    20-40 and near-certain tokens)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    tokens = torch.randint(0, v, (b, t), generator=g)
    if peak:
        logits[:, ::2].scatter_add_(-1, tokens[:, ::2, None], torch.full((b, (t + 1) // 2, 1), float(peak)))
        logits = logits + peak / 2
    logits = logits.to(dtype)
    tokens[0, -2:] = -100  # padding
    tokens[4, -1] = -100
    correct = torch.tensor([True, False, True, False, False, True])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    return logits, tokens, correct, group, hidden


def on_dev(*xs):
    return [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in xs]


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def every_other(x):
    """``x`` seen through ``wide[..., ::2]`` of a NaN-filled buffer twice as wide."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def stored_as(x, order):
    """``x`` with the same values, stored with dimension ``order`` outermost-first."""
    inverse = [order.index(i) for i in range(x.dim())]
    return x.permute(*order).contiguous().permute(*inverse)
