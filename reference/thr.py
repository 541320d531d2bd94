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
* :func:`linear_thr_sums` (with :func:`linear_lse_entropy`): THR's sums from hidden states and
  the read-out head (``z' = c·tanh((h Wᵀ + b)/c)/T``), never forming the ``N × V`` logits nor
  an ``|O| × |U|`` matrix (the sum factorises through the head's gradient; its docstring).

Plain torch; this module imports nothing from the public package.
"""

from __future__ import annotations

import torch

from .stats import Transform
from .transform import apply as apply_transform

__all__ = ["thr_pair_sums", "thr_pair_sums_naive", "thr_compute_dtype", "row_lse_entropy", "DEFAULT_CHUNK",
           "linear_lse_entropy", "linear_thr_sums", "linear_chunk"]

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


# ----------------------------------------------------------------------------- fused-linear form

#: The default vocabulary chunk of the fused-linear form holds at most this many logits.
LINEAR_CHUNK_ELEMENTS = 1 << 25


def linear_chunk(n_rows: int, v: int, chunk: int | None = None) -> int:
    """Vocabulary columns per chunk: ``chunk`` if given, else ``2^25 / n_rows`` (128 MiB of
    float32 logits) clamped to ``[128, 8192]`` and to ``V``."""
    if chunk is None:
        chunk = min(DEFAULT_CHUNK, max(128, LINEAR_CHUNK_ELEMENTS // max(n_rows, 1)))
    return max(1, min(int(chunk), v))


def _head_logits(h, weight, bias, c0, c1, transform: Transform):
    """``z' = transform(h Wᵀ + b)`` on vocabulary columns ``[c0, c1)``: ``[rows, c1 - c0]`` in
    ``h``'s dtype (the compute dtype)."""
    w = weight[c0:c1].to(h.dtype)
    z = torch.mm(h, w.t()) if bias is None else torch.addmm(bias[c0:c1].to(h.dtype), h, w.t())
    return apply_transform(z, transform)


def linear_lse_entropy(hidden, weight, bias=None, *, transform: Transform = Transform(), chunk: int | None = None):
    """``(lse, entropy)`` of every row of ``hidden [N, D]`` through the head ``weight [V, D]``
    (``bias [V]``), the logits streamed in vocabulary chunks: per row a running max ``m``,
    ``s = Σ exp(z - m)`` and ``t = Σ exp(z - m)(z - m)``, rescaled when ``m`` grows; then
    ``lse = m + log s`` and ``entropy = log s - t/s`` (no cancellation of two large numbers for
    near-certain rows). In the compute dtype (float64 for float64 hidden, float32 otherwise)."""
    dt = thr_compute_dtype(hidden.dtype)
    h = hidden.to(dt)
    v = weight.shape[0]
    c = linear_chunk(h.shape[0], v, chunk)
    m = s = t = None
    for c0 in range(0, v, c):
        z = _head_logits(h, weight, bias, c0, min(v, c0 + c), transform)
        z_max = z.max(-1).values
        if m is None:
            m_new, s, t = z_max, torch.zeros_like(z_max), torch.zeros_like(z_max)
        else:
            m_new = torch.maximum(m, z_max)
            alpha = torch.exp(m - m_new)
            t = alpha * (t + (m - m_new) * s)
            s = alpha * s
        zc = z.sub_(m_new[:, None])  # in place: two [rows, chunk] buffers in all
        e = torch.exp(zc)
        s = s + e.sum(-1)
        t = t + zc.mul_(e).sum(-1)
        m = m_new
    log_s = torch.log(s)
    return m + log_s, log_s - t / s


def linear_thr_sums(hidden, weight, bias, tokens, group, o_weight, *, lse=None, transform: Transform = Transform(),
                    hidden_factor: bool = True, chunk: int | None = None):
    """THR's grouped sums for the logits ``z' = transform(h Wᵀ + b)`` of ``hidden [N, D]``
    through the head ``weight [V, D]`` (``bias [V]`` or None), without forming them: every row
    is an updating row, the observed rows are those with ``o_weight != 0``, and

        out[j] = Σ_{i : group[i] = group[j]} o_weight[i] · <q_i, q_j> · (h_i · h_j)

    (the hidden factor only with ``hidden_factor``), ``q_r = e_{y_r} - π_r``, ``π_r =
    softmax(z'_r)``: :func:`thr_pair_sums` with ``u_rows`` all rows and ``o_rows`` the observed.

    The sum factorises through the head's gradient, so no ``|O| × |U|`` matrix is formed:

        Σ_o w_o <q_o, q_u> (h_o · h_u) = Σ_v q_u,v (h_u · M_v),   M = Σ_o w_o q_o h_oᵀ  ([V, D])

    (``M`` is, up to sign, the gradient of ``Σ_o w_o log π(y_o)`` w.r.t. ``W``); without the
    hidden factor ``Σ_o w_o <q_o, q_u> = <q_u, Σ_o w_o q_o>``. Rows are sorted by group, the
    observed first, and the vocabulary is streamed in chunks of ``chunk`` columns
    (:func:`linear_chunk`): per chunk the logits of all rows (``[N, chunk]``, turned into ``q``
    in place) and per group ``M`` on the chunk (``[chunk, D]``) and ``h_u·M`` (``[|U_g|,
    chunk]``). Memory ``O(N·chunk + chunk·D + N·D)``; time the logits
    (``2·N·D·V``) plus ``2·(|O| + N)·D·V`` in matmuls. ``q`` at a row's own token is
    ``-expm1(z'_y - lse)`` (exact for near-certain tokens). ``lse``: ``[N]`` (computed by
    :func:`linear_lse_entropy` if None). Returns ``[N]`` in the compute dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D]: got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    for name, x in (("tokens", tokens), ("group", group), ("o_weight", o_weight)):
        if x.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(x.shape)}")
    dt = thr_compute_dtype(hidden.dtype)
    out = torch.zeros(n, dtype=dt, device=hidden.device)
    if n == 0 or not bool((o_weight != 0).any()):
        return out
    # sort by (group, unobserved): each group a slice [start, end) whose first n_obs rows are observed
    key = group.long() * 2 + (o_weight == 0).long()
    order = torch.sort(key, stable=True).indices
    h = hidden[order].to(dt)
    y = tokens[order].long()
    w = o_weight[order].to(dt)
    wh = w[:, None] * h if hidden_factor else None  # w_o h_o
    lse_s = linear_lse_entropy(h, weight, bias, transform=transform, chunk=chunk)[0] if lse is None \
        else lse[order].to(dt)
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    gid = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    n_obs = torch.zeros_like(counts).scatter_add_(0, gid, (w != 0).long())
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    slices = [(a, a + no, a + k) for a, no, k in zip(starts, n_obs.tolist(), counts.tolist()) if no > 0]
    c = linear_chunk(n, v, chunk)
    rows = torch.arange(n, device=hidden.device)
    acc = torch.zeros_like(out)
    for c0 in range(0, v, c):
        c1 = min(v, c0 + c)
        q = _head_logits(h, weight, bias, c0, c1, transform)  # z', then q in place
        here = (y >= c0) & (y < c1)
        r, col = rows[here], y[here] - c0
        q_y = -torch.expm1(q[r, col] - lse_s[r])  # 1 - π(y), to full precision
        q.sub_(lse_s[:, None]).exp_().neg_()  # -π on the chunk
        q[r, col] = q_y
        for a, b_obs, b in slices:
            if hidden_factor:
                m = q[a:b_obs].t() @ wh[a:b_obs]  # M on the chunk: [chunk, D]
                acc[a:b] += (h[a:b] @ m.t()).mul_(q[a:b]).sum(-1)
            else:
                acc[a:b] += q[a:b] @ (w[a:b_obs] @ q[a:b_obs])
    out[order] = acc
    return out
