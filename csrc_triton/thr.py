"""Token Hidden Reward (THR) inner products without the ``N × V`` probabilities (mapped to
``ranktuner_kernels.kernels.thr``).

Same contract as ``reference/thr.py``: for observed rows ``o`` and updating rows ``u`` of the
logits (``π = softmax(z)``, sampled tokens ``y``),

    out[j] = sum_{i : group_o[i] = group_u[j]} w[i] · S[o_i, u_j] (· h_{o_i} · h_{u_j})
    S[o, u] = 1[y_o = y_u] - π_u(y_o) - π_o(y_u) + <π_o, π_u>

The per-row ``lse`` (and the entropy THR's advantage rule reads) come from the statistics
kernel of ``row_stats.py`` (:func:`row_lse_entropy`). The kernel here:

* ``_thr_pair_kernel``: like a (varlen) attention kernel whose "sequence" axis is the
  vocabulary. Rows are sorted by group; each program owns ``BLOCK_U`` updating rows of one
  group and loops over that group's observed rows in ``BLOCK_O`` tiles. For each tile pair it
  streams the vocabulary in ``BLOCK_V`` tiles, forms ``p = exp(z - lse)`` for both row tiles in
  registers and accumulates the probability Gram tile ``tl.dot(p_o, p_uᵀ)``; ``π_u(y_o)`` and
  ``π_o(y_u)`` are gathered logits (a ``BLOCK_O × BLOCK_U`` gather of ``z`` at the other rows'
  tokens), the hidden Gram ``h_o · h_u`` another ``tl.dot`` over ``BLOCK_D`` tiles. The
  ``BLOCK_O × BLOCK_U`` tile of ``S`` is weighted and reduced over ``o`` in registers, so
  nothing of size ``N × V`` or ``N × N`` is written. Deterministic (no atomics).

Row offsets are int64; logits may be ``[N, V]`` or ``[B, T, V]`` with any row strides (last
stride 1). Accumulation is float32; ``precision`` picks ``tl.dot``'s input precision for the
float32 products (``"ieee"``, default, or ``"tf32"``: faster on tensor cores, ~1e-3 relative
error in the Gram terms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_stats import row_stats

__all__ = ["thr_pair_sums", "row_lse_entropy", "PRECISIONS"]

PRECISIONS = ("ieee", "tf32")

#: The GPU launch: 64-row tiles of updating and observed rows, 64-wide vocabulary and hidden
#: tiles, 16 warps and no software pipelining (``num_stages=1``). Compiled with Triton 3.9 this
#: holds the two ``64 x 64`` float32 Gram tiles in registers on sm_90 and sm_100 (0-8 stack
#: bytes on sm_80; ``bench/results/kernels.md``); 4 warps with 3 stages spilled 16-904 bytes
#: per thread, 8 warps still 168-264 on sm_80.
GPU_LAUNCH = dict(block_u=64, block_o=64, block_v=64, block_d=64, num_warps=16, num_stages=1)
#: Under the CPU interpreter: smaller tiles (speed only; the interpreter ignores warps and stages).
INTERPRETER_LAUNCH = dict(block_u=32, block_o=32, block_v=128, block_d=64, num_warps=4, num_stages=1)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _row_geometry(logits: torch.Tensor):
    """``(T, stride_b, stride_t, V)`` so that row ``r`` starts at ``(r // T)·stride_b + (r % T)·stride_t``."""
    if logits.stride(-1) != 1:
        raise ValueError("logits: the last stride must be 1")
    if logits.dim() == 2:
        return max(logits.shape[0], 1), 0, logits.stride(0), logits.shape[1]
    if logits.dim() == 3:
        return max(logits.shape[1], 1), logits.stride(0), logits.stride(1), logits.shape[2]
    raise ValueError(f"logits: expected [N, V] or [B, T, V], got shape {tuple(logits.shape)}")


@triton.jit
def _thr_pair_kernel(
    logits_ptr, T, stride_b, stride_t, V,
    lse_ptr, tok_ptr,
    hid_ptr, stride_hn, stride_hd, D,
    u_rows_ptr, o_rows_ptr, o_w_ptr, table_ptr, out_ptr,
    BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HIDDEN: tl.constexpr, PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    u_start = tl.load(table_ptr + blk * 4 + 0)
    u_cnt = tl.load(table_ptr + blk * 4 + 1)
    o_start = tl.load(table_ptr + blk * 4 + 2)
    o_cnt = tl.load(table_ptr + blk * 4 + 3)

    ju = tl.arange(0, BLOCK_U)
    u_live = ju < u_cnt
    u_row = tl.load(u_rows_ptr + u_start + ju, mask=u_live, other=0).to(tl.int64)
    u_base = (u_row // T) * stride_b + (u_row % T) * stride_t
    lse_u = tl.load(lse_ptr + u_row, mask=u_live, other=0.0)
    y_u = tl.load(tok_ptr + u_row, mask=u_live, other=0).to(tl.int64)

    acc = tl.zeros([BLOCK_U], dtype=tl.float32)
    for o0 in range(0, o_cnt, BLOCK_O):
        io = o0 + tl.arange(0, BLOCK_O)
        o_live = io < o_cnt
        o_row = tl.load(o_rows_ptr + o_start + io, mask=o_live, other=0).to(tl.int64)
        o_base = (o_row // T) * stride_b + (o_row % T) * stride_t
        lse_o = tl.load(lse_ptr + o_row, mask=o_live, other=0.0)
        y_o = tl.load(tok_ptr + o_row, mask=o_live, other=0).to(tl.int64)
        w_o = tl.load(o_w_ptr + o_start + io, mask=o_live, other=0.0)
        pair_live = o_live[:, None] & u_live[None, :]

        # <π_o, π_u>: stream the vocabulary, probabilities only ever in registers
        gram = tl.zeros([BLOCK_O, BLOCK_U], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_live = cols < V
            z_o = tl.load(logits_ptr + o_base[:, None] + cols[None, :],
                          mask=o_live[:, None] & col_live[None, :], other=float("-inf")).to(tl.float32)
            z_u = tl.load(logits_ptr + u_base[:, None] + cols[None, :],
                          mask=u_live[:, None] & col_live[None, :], other=float("-inf")).to(tl.float32)
            p_o = tl.exp(z_o - lse_o[:, None])
            p_u = tl.exp(z_u - lse_u[:, None])
            gram += tl.dot(p_o, tl.trans(p_u), input_precision=PRECISION)

        # π_u(y_o) and π_o(y_u): gathered logits of each row at the other rows' tokens
        z_u_yo = tl.load(logits_ptr + u_base[None, :] + y_o[:, None], mask=pair_live, other=float("-inf"))
        z_o_yu = tl.load(logits_ptr + o_base[:, None] + y_u[None, :], mask=pair_live, other=float("-inf"))
        pu_yo = tl.exp(z_u_yo.to(tl.float32) - lse_u[None, :])
        po_yu = tl.exp(z_o_yu.to(tl.float32) - lse_o[:, None])
        same = tl.where(y_o[:, None] == y_u[None, :], 1.0, 0.0)
        s = same - pu_yo - po_yu + gram

        if HAS_HIDDEN:
            hh = tl.zeros([BLOCK_O, BLOCK_U], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dc = d0 + tl.arange(0, BLOCK_D)
                d_live = dc < D
                h_o = tl.load(hid_ptr + o_row[:, None] * stride_hn + dc[None, :] * stride_hd,
                              mask=o_live[:, None] & d_live[None, :], other=0.0).to(tl.float32)
                h_u = tl.load(hid_ptr + u_row[:, None] * stride_hn + dc[None, :] * stride_hd,
                              mask=u_live[:, None] & d_live[None, :], other=0.0).to(tl.float32)
                hh += tl.dot(h_o, tl.trans(h_u), input_precision=PRECISION)
            s = s * hh

        s = tl.where(pair_live, s, 0.0)
        acc += tl.sum(s * w_o[:, None], axis=0)
    tl.store(out_ptr + u_start + ju, acc, mask=u_live)


def _blocks(group_u_sorted, group_o_sorted, block_u):
    """``int32 [n_blocks, 4]`` table ``(u_start, u_count, o_start, o_count)``: every group's
    updating rows cut into ``block_u`` tiles, each paired with that group's observed range."""
    dev = group_u_sorted.device
    gu, cu = torch.unique_consecutive(group_u_sorted, return_counts=True)
    u_off = torch.cumsum(cu, 0) - cu
    o_lo = torch.searchsorted(group_o_sorted, gu, right=False)
    o_hi = torch.searchsorted(group_o_sorted, gu, right=True)
    nb = (cu + block_u - 1) // block_u
    g_of_blk = torch.repeat_interleave(torch.arange(gu.numel(), device=dev), nb)
    first_blk = torch.cumsum(nb, 0) - nb
    k = torch.arange(g_of_blk.numel(), device=dev) - first_blk[g_of_blk]
    u_start = u_off[g_of_blk] + k * block_u
    u_cnt = torch.minimum(cu[g_of_blk] - k * block_u, torch.full_like(k, block_u))
    table = torch.stack([u_start, u_cnt, o_lo[g_of_blk], (o_hi - o_lo)[g_of_blk]], dim=1)
    return table.to(torch.int32).contiguous()


def row_lse_entropy(logits: torch.Tensor, rows: torch.Tensor | None = None):
    """float32 ``(lse, entropy)`` of length ``N`` for ``[N, V]`` / ``[B, T, V]`` logits, from the
    statistics kernel (``row_stats.py``); only the listed ``rows`` (int64) are computed, the
    others hold zeros (they are passed as ignored: nothing of them is read)."""
    _row_geometry(logits)
    rows3 = logits if logits.dim() == 3 else logits.unsqueeze(0)
    n = rows3.shape[0] * rows3.shape[1]
    target = torch.full((n,), -1, dtype=torch.int64, device=logits.device)
    target[slice(None) if rows is None else rows.to(device=logits.device, dtype=torch.int64)] = 0
    if rows3.shape[-1] == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=logits.device)
        return zeros, zeros.clone()
    stats, _ = row_stats(rows3, target, ignore_index=-1)
    return stats[0], stats[4]


def thr_pair_sums(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden=None, *,
                  lse=None, precision: str = "ieee", block_u: int | None = None, block_o: int | None = None,
                  block_v: int | None = None, block_d: int | None = None):
    """float32 ``[len(u_rows)]`` grouped sums (module docstring) on CUDA tensors (or CPU ones
    under ``TRITON_INTERPRET=1``).

    ``logits``: ``[N, V]`` or ``[B, T, V]`` (float32 / bfloat16 / float16, last stride 1; rows
    numbered ``b·T + t``); ``tokens``: ``[N]`` ints in ``[0, V)``; ``hidden``: ``[N, D]`` or None;
    ``u_rows``/``o_rows``: int64 row indices with int ``u_group``/``o_group`` and float
    ``o_weight``; ``lse``: float32 ``[N]`` valid at every listed row (computed if None).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    t, sb, st, v = _row_geometry(logits)
    dev = logits.device
    out = torch.zeros(u_rows.numel(), dtype=torch.float32, device=dev)
    if u_rows.numel() == 0 or o_rows.numel() == 0:
        return out
    u_rows = u_rows.to(dev, torch.int64)
    o_rows = o_rows.to(dev, torch.int64)
    if lse is None:
        lse, _ = row_lse_entropy(logits, torch.unique(torch.cat([u_rows, o_rows])))
    lse = lse.to(dev, torch.float32).contiguous()
    tok = tokens.to(dev, torch.int64).contiguous()

    u_group, u_order = torch.sort(u_group.to(dev, torch.int64), stable=True)
    o_group, o_order = torch.sort(o_group.to(dev, torch.int64), stable=True)
    u_sorted = u_rows[u_order].contiguous()
    o_sorted = o_rows[o_order].contiguous()
    w_sorted = o_weight.to(dev, torch.float32)[o_order].contiguous()

    launch = INTERPRETER_LAUNCH if _interpreting() else GPU_LAUNCH
    bu = block_u or launch["block_u"]
    bo = block_o or launch["block_o"]
    bv = block_v or launch["block_v"]
    bd = block_d or launch["block_d"]
    table = _blocks(u_group, o_group, bu)
    out_sorted = torch.zeros_like(out)
    if hidden is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: expected [N, D], got shape {tuple(hidden.shape)}")
        hid, shn, shd, d = hidden, hidden.stride(0), hidden.stride(1), hidden.shape[1]
    else:
        hid, shn, shd, d = lse, 0, 0, 0  # never read
    _thr_pair_kernel[(table.shape[0],)](
        logits, t, sb, st, v, lse, tok, hid, shn, shd, d,
        u_sorted, o_sorted, w_sorted, table, out_sorted,
        BLOCK_U=bu, BLOCK_O=bo, BLOCK_V=bv, BLOCK_D=bd,
        HAS_HIDDEN=hidden is not None, PRECISION=precision,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    out[u_order] = out_sorted
    return out
