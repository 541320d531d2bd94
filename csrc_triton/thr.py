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
  group and loops over that group's observed rows in ``BLOCK_O`` tiles. Since
  ``S[o, u] = <e_{y_o} - π_o, e_{y_u} - π_u>`` (``e_y`` the one-hot row of the token), the
  whole of ``S`` is one Gram product: for each tile pair the kernel streams the vocabulary in
  ``BLOCK_V`` tiles, forms ``q = e_y - exp(z - lse)`` for both row tiles in registers and
  accumulates ``tl.dot(q_u, q_oᵀ)`` (no gathers of ``z`` at the other rows' tokens, no
  ``BLOCK_U × BLOCK_O`` pointer tiles); the hidden Gram ``h_u · h_o`` is another ``tl.dot``
  over ``BLOCK_D`` tiles. The ``BLOCK_U × BLOCK_O`` tile of ``S`` is weighted and reduced over
  ``o`` in registers, so nothing of size ``N × V`` or ``N × N`` is written. Deterministic (no
  atomics).

The wrapper hands the kernel, per listed row in group order, the row index (int32), its lse
and its token (int32); row offsets into the logits are int64; logits may be ``[N, V]`` or
``[B, T, V]`` with any row strides (last stride 1). Row tiles past a group's end repeat its
last row (no row masks; those entries are dropped). Accumulation is float32; ``precision``
picks ``tl.dot``'s input precision for the float32 products (``"ieee"``, default, or
``"tf32"``: faster on tensor cores, ~1e-3 relative error in ``S``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_stats import row_stats

__all__ = ["thr_pair_sums", "row_lse_entropy", "PRECISIONS"]

PRECISIONS = ("ieee", "tf32")

#: The GPU launch: 64-row tiles of updating and observed rows, 32-wide vocabulary and hidden
#: tiles, 16 warps, no software pipelining (``num_stages=1``) and ``maxnreg=128`` (CUDA only),
#: the hardware's cap at 16 warps: without it ptxas fits some variants into 64 registers (two
#: blocks per SM) by spilling 8-24 bytes of loop invariants.
#:
#: Why 32 columns: when a row's start is not 16-element aligned (a vocabulary or row stride that
#: is not a multiple of 16, e.g. GPT-2's 50,257), Triton cannot vectorize the logits loads and
#: lays a tile out one element per thread with a warp along 32 columns; at 64 columns the 16 warps
#: split as 8 x 2 and every thread holds 8 rows of each tile, each row with its 64-bit pointer,
#: lse and token, beside the tf32 MMA's register operand (64 x 64 float32 per warpgroup). That
#: spilled 24-192 bytes on sm_90 with Triton 3.9 (16-128 with 3.6). At 32 columns a warp is one
#: row, a thread holds 4 rows and half the MMA operand. The tile pointers are formed inside the
#: loop from the row pointers (not carried as ``[rows, BLOCK_V]`` pointer tiles). Compiled for
#: sm_80, sm_90 and sm_100 at vocabularies 2,112 (aligned) and 4,100 / 50,257 (not), every variant
#: (float32/bf16/f16 logits, with and without hidden states, contiguous or strided, ieee and tf32)
#: keeps 0 stack bytes with Triton 3.9 (72-128 registers) and 3.6 (76-124), and so does gfx942
#: with ``GPU_LAUNCH_ROCM`` (96-168 VGPRs). Aligned rows cost ~8% more loop instructions per
#: element than at 64 columns (sm_90, tf32: 132 per 8 elements vs 245 per 16). The kernel before
#: the one-Gram form (gathers of ``z`` at the other rows' tokens, in-kernel int64 row division)
#: needed 108-128 registers and 0-24 stack bytes on the NVIDIA targets; 4 warps with 3 stages
#: spilled 16-904 bytes per thread.
GPU_LAUNCH = dict(block_u=64, block_o=64, block_v=32, block_d=32, num_warps=16, num_stages=1, maxnreg=128)
#: On ROCm: the same 512 threads per program as 8 wavefronts of 64 (up to 256 VGPRs each; at
#: 16 wavefronts the cap is 128 and gfx942 spilled 16-116 bytes); ``maxnreg`` is CUDA's.
GPU_LAUNCH_ROCM = dict(GPU_LAUNCH, num_warps=8, maxnreg=None)
#: Under the CPU interpreter: smaller tiles (speed only; the interpreter ignores warps and stages).
INTERPRETER_LAUNCH = dict(block_u=32, block_o=32, block_v=128, block_d=64, num_warps=4, num_stages=1, maxnreg=None)


def _launch() -> dict:
    if _interpreting():
        return INTERPRETER_LAUNCH
    return GPU_LAUNCH_ROCM if torch.version.hip is not None else GPU_LAUNCH


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
def _e_minus_p(ptrs, y_off, lse, cols, n_cols):
    """``e_y - π`` on one vocabulary tile of a row tile: float32 ``[rows, BLOCK_V]`` from the
    logits at ``ptrs``; ``y_off``: each row's token minus the tile's first column; the columns
    from ``n_cols`` on (past the vocabulary) read as ``-inf``: 0."""
    z = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=float("-inf"))
    p = tl.exp(z.to(tl.float32) - lse[:, None])
    return tl.where(cols[None, :] == y_off[:, None], 1.0, 0.0) - p


@triton.jit
def _thr_pair_kernel(
    logits_ptr, T, stride_b, stride_t, V,
    u_rows_ptr, u_lse_ptr, u_tok_ptr,
    o_rows_ptr, o_lse_ptr, o_tok_ptr, o_w_ptr,
    hid_ptr, stride_hn, stride_hd, D,
    table_ptr, out_ptr,
    BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HIDDEN: tl.constexpr, PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    u_start = tl.load(table_ptr + blk * 4 + 0)
    u_cnt = tl.load(table_ptr + blk * 4 + 1)
    o_start = tl.load(table_ptr + blk * 4 + 2)
    o_cnt = tl.load(table_ptr + blk * 4 + 3)

    # The S tile is [BLOCK_U, BLOCK_O]. Rows past a count repeat the last live row (no row
    # masks, finite values): their entries are dropped (o) or not stored (u).
    ju = tl.arange(0, BLOCK_U)
    iu = u_start + tl.minimum(ju, u_cnt - 1)
    u_row = tl.load(u_rows_ptr + iu)
    u_ptr = logits_ptr + (u_row // T).to(tl.int64) * stride_b + (u_row % T).to(tl.int64) * stride_t
    lse_u = tl.load(u_lse_ptr + iu)
    y_u = tl.load(u_tok_ptr + iu)
    cols = tl.arange(0, BLOCK_V)

    acc = tl.zeros([BLOCK_U], dtype=tl.float32)
    for o0 in range(0, o_cnt, BLOCK_O):
        jo = o0 + tl.arange(0, BLOCK_O)
        io = o_start + tl.minimum(jo, o_cnt - 1)
        o_row = tl.load(o_rows_ptr + io)
        o_ptr = logits_ptr + (o_row // T).to(tl.int64) * stride_b + (o_row % T).to(tl.int64) * stride_t
        lse_o = tl.load(o_lse_ptr + io)
        y_o = tl.load(o_tok_ptr + io)

        # S = <e_u - π_u, e_o - π_o> over the vocabulary, streamed in tiles (the probabilities
        # only ever in registers; the tile pointers are formed per iteration from the row
        # pointers, so no [rows, BLOCK_V] pointer tile lives across the loop)
        s = tl.zeros([BLOCK_U, BLOCK_O], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            q_u = _e_minus_p(u_ptr[:, None] + (v0 + cols)[None, :], y_u - v0, lse_u, cols, V - v0)
            q_o = _e_minus_p(o_ptr[:, None] + (v0 + cols)[None, :], y_o - v0, lse_o, cols, V - v0)
            s += tl.dot(q_u, tl.trans(q_o), input_precision=PRECISION)
        if HAS_HIDDEN:
            hu_ptr = hid_ptr + u_row.to(tl.int64) * stride_hn
            ho_ptr = hid_ptr + o_row.to(tl.int64) * stride_hn
            hh = tl.zeros([BLOCK_U, BLOCK_O], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dc = d0 + tl.arange(0, BLOCK_D)
                d_live = (dc < D)[None, :]
                h_u = tl.load(hu_ptr[:, None] + dc[None, :] * stride_hd, mask=d_live, other=0.0).to(tl.float32)
                h_o = tl.load(ho_ptr[:, None] + dc[None, :] * stride_hd, mask=d_live, other=0.0).to(tl.float32)
                hh += tl.dot(h_u, tl.trans(h_o), input_precision=PRECISION)
            s = s * hh

        o_live = jo < o_cnt
        w_o = tl.load(o_w_ptr + o_start + jo, mask=o_live, other=0.0)
        acc += tl.sum(tl.where(o_live[None, :], s, 0.0) * w_o[None, :], axis=1)
    tl.store(out_ptr + u_start + ju, acc, mask=ju < u_cnt)


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
    return stats["lse"], stats["entropy"]


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

    launch = _launch()
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
    # per listed row, in group order: the row (int32: N < 2^31), its lse and token (int32: < V)
    i32 = torch.int32
    _thr_pair_kernel[(table.shape[0],)](
        logits, t, sb, st, v,
        u_sorted.to(i32), lse[u_sorted], tok[u_sorted].to(i32),
        o_sorted.to(i32), lse[o_sorted], tok[o_sorted].to(i32), w_sorted,
        hid, shn, shd, d, table, out_sorted,
        BLOCK_U=bu, BLOCK_O=bo, BLOCK_V=bv, BLOCK_D=bd,
        HAS_HIDDEN=hidden is not None, PRECISION=precision,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
        **({"maxnreg": launch["maxnreg"]} if launch["maxnreg"] else {}),  # ROCm's Triton rejects the keyword
    )
    out[u_order] = out_sorted
    return out
