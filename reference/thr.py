"""Token Hidden Reward (THR) inner products, pure torch (mapped to ``ranktuner_kernels.reference.thr``).

For token rows ``o`` ("observed") and ``u`` ("updating") of a ``[N, V]`` logits matrix with
sampled tokens ``y`` and ``π_r = softmax(z_r)``, the prediction-error inner product is

    S[o, u] = <e_{y_o} - π_o, e_{y_u} - π_u>
            = 1[y_o = y_u] - π_u(y_o) - π_o(y_u) + <π_o, π_u>

optionally times the hidden-state inner product ``h_o · h_u`` (THR paper eq. 15-16; the
product of the two is the first-order change of ``log π(y_o)`` when one gradient step is
taken on ``log π(y_u)`` through a shared read-out layer). Both functions here compute the
grouped, weighted sums

    out[j] = sum_{i : group_o[i] = group_u[j]} w[i] · S[o_rows[i], u_rows[j]] (· h_{o_rows[i]} · h_{u_rows[j]})

* :func:`thr_pair_sums_naive` materialises ``π`` (``N × V``) and ``S`` (``|O| × |U|`` per
  group): the small-size oracle the kernels are tested against, float64 on float64 input.
* :func:`thr_pair_sums` streams over vocabulary chunks and accumulates the probability Gram
  matrix per group, never holding more than ``(|O_g| + |U_g|) × chunk`` probabilities: the CPU
  fallback, same math as the Triton kernel.

Plain torch; this module imports nothing from the public package.
"""

from __future__ import annotations

import torch

__all__ = ["thr_pair_sums", "thr_pair_sums_naive", "thr_compute_dtype", "row_lse_entropy", "DEFAULT_CHUNK"]

#: Vocabulary columns per chunk in :func:`thr_pair_sums` (and rows per chunk for lse).
DEFAULT_CHUNK = 8192


def thr_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_lse_entropy(logits: torch.Tensor, rows: torch.Tensor | None = None, chunk_rows: int = 256,
                    entropy: bool = True):
    """``(lse, entropy)`` of each row of ``[N, V]`` logits (or of ``rows`` only), in the compute
    dtype, over row chunks (``-inf`` logits are masked entries; entropy in nats; None with
    ``entropy=False``)."""
    dt = thr_compute_dtype(logits.dtype)
    idx = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    lse = torch.empty(idx.numel(), dtype=dt, device=logits.device)
    ent = torch.empty_like(lse) if entropy else None
    for s in range(0, idx.numel(), chunk_rows):
        z = logits[idx[s:s + chunk_rows]].to(dt)
        l = torch.logsumexp(z, dim=-1)
        lse[s:s + chunk_rows] = l
        if entropy:
            p = torch.exp(z - l[:, None])
            ent[s:s + chunk_rows] = l - torch.where(p > 0, p * z, torch.zeros_like(p)).sum(-1)
    return lse, ent


def _check(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden):
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if tokens.shape != (n,):
        raise ValueError(f"tokens: expected shape ({n},), got {tuple(tokens.shape)}")
    if u_rows.shape != u_group.shape or u_rows.dim() != 1:
        raise ValueError("u_rows and u_group: expected matching 1-D shapes")
    if not (o_rows.shape == o_group.shape == o_weight.shape) or o_rows.dim() != 1:
        raise ValueError("o_rows, o_group and o_weight: expected matching 1-D shapes")
    if hidden is not None and (hidden.dim() != 2 or hidden.shape[0] != n):
        raise ValueError(f"hidden: expected [N, D] with N = {n}, got shape {tuple(hidden.shape)}")


def thr_pair_sums_naive(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden=None):
    """Materialised oracle of the grouped sums (module docstring). Returns ``[len(u_rows)]``
    in the compute dtype (float64 for float64 logits, float32 otherwise)."""
    _check(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden)
    dt = thr_compute_dtype(logits.dtype)
    v = logits.shape[1]
    probs = torch.softmax(logits.to(dt), dim=-1)  # N x V, materialised
    err = torch.nn.functional.one_hot(tokens.long(), v).to(dt) - probs  # e_y - π
    s_all = err[o_rows] @ err[u_rows].T  # |O| x |U|
    if hidden is not None:
        hd = hidden.to(dt)
        s_all = s_all * (hd[o_rows] @ hd[u_rows].T)
    same_group = o_group[:, None] == u_group[None, :]
    s_all = torch.where(same_group, s_all, torch.zeros_like(s_all))
    return (o_weight.to(dt)[:, None] * s_all).sum(0)


def thr_pair_sums(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden=None, *,
                  lse=None, chunk: int = DEFAULT_CHUNK):
    """Streaming torch version of the grouped sums: per group, the Gram matrix ``<π_o, π_u>``
    is accumulated over vocabulary chunks of ``chunk`` columns, ``π_u(y_o)`` and ``π_o(y_u)``
    are gathered logits, so neither ``π`` nor ``e - π`` is ever ``N × V``. ``lse``: optional
    per-row log-sum-exp of all ``N`` rows (computed here otherwise). Returns ``[len(u_rows)]``
    in the compute dtype."""
    _check(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden)
    dt = thr_compute_dtype(logits.dtype)
    dev = logits.device
    v = logits.shape[1]
    out = torch.zeros(u_rows.numel(), dtype=dt, device=dev)
    if u_rows.numel() == 0 or o_rows.numel() == 0:
        return out
    tokens = tokens.long()
    if lse is None:
        needed = torch.unique(torch.cat([u_rows, o_rows]))
        lse = torch.zeros(logits.shape[0], dtype=dt, device=dev)
        lse[needed] = row_lse_entropy(logits, needed, entropy=False)[0]
    groups = torch.unique(torch.cat([u_group, o_group]))
    for g in groups.tolist():
        uj = torch.nonzero(u_group == g).flatten()
        oi = torch.nonzero(o_group == g).flatten()
        if uj.numel() == 0 or oi.numel() == 0:
            continue
        ur, orow = u_rows[uj], o_rows[oi]
        w = o_weight[oi].to(dt)
        lse_u, lse_o = lse[ur].to(dt), lse[orow].to(dt)
        gram = torch.zeros(oi.numel(), uj.numel(), dtype=dt, device=dev)
        for c in range(0, v, chunk):
            p_o = logits[orow, c:c + chunk].to(dt).sub_(lse_o[:, None]).exp_()  # a copy: in place is safe
            p_u = logits[ur, c:c + chunk].to(dt).sub_(lse_u[:, None]).exp_()
            gram.addmm_(p_o, p_u.T)
        y_o, y_u = tokens[orow], tokens[ur]
        pu_yo = torch.exp(logits[ur[None, :], y_o[:, None]].to(dt) - lse_u[None, :])  # π_u(y_o), |O| x |U|
        po_yu = torch.exp(logits[orow[:, None], y_u[None, :]].to(dt) - lse_o[:, None])  # π_o(y_u)
        s = (y_o[:, None] == y_u[None, :]).to(dt) - pu_yo - po_yu + gram
        if hidden is not None:
            s = s * (hidden[orow].to(dt) @ hidden[ur].to(dt).T)
        out[uj] = (w[:, None] * s).sum(0)
    return out
