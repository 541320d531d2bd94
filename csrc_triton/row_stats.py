"""Row statistics in one streaming pass over the vocabulary.

For each row ``z`` (``V`` logits, any float dtype, accumulated in float32) and target ``y``:
online max ``m``, rescaled sum ``s = sum exp(z - m)``, rescaled entropy sum
``a = sum exp(z - m) (z - m)`` and rank count ``r = #{z_i >= z_y}``; then
``lse = m + log s`` and ``H = log s - a / s``. One program per row; ignored rows load
nothing and store zeros. Output: ``lse, z_y, m, H`` float32 ``[N]`` and ``rank`` int32 ``[N]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranktuner_kernels.objectives import RowStats

from .config import AUTOTUNE, autotune_configs, fixed_config, row_offsets


@triton.jit
def _row_stats_kernel(
    logits_ptr, target_ptr,
    lse_ptr, zy_ptr, max_ptr, ent_ptr, rank_ptr,
    T, stride_b, stride_t, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    zy = tl.load(base + tl.where(keep, y, 0)).to(tl.float32)  # column 0 always exists

    v_live = tl.where(keep, V, 0)  # ignored rows load nothing
    m = float("-inf")  # running max
    s = 0.0  # sum exp(z - m)
    a = 0.0  # sum exp(z - m) * (z - m)
    r = 0  # #{z_i >= z_y}
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < v_live
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit yet
        e = tl.exp(z - m_ref)
        alpha = tl.exp(m - m_ref)
        a = (a + tl.where(s > 0, (m - m_ref) * s, 0.0)) * alpha
        a += tl.sum(tl.where(e > 0, e * (z - m_ref), 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        r += tl.sum(((z >= zy) & mask).to(tl.int32), axis=0)
        m = m_new

    s = tl.where(keep, s, 1.0)  # ignored rows: no log(0) / 0 (their outputs are zeroed anyway)
    log_s = tl.log(s)
    tl.store(lse_ptr + row, tl.where(keep, m + log_s, 0.0))
    tl.store(zy_ptr + row, tl.where(keep, zy, 0.0))
    tl.store(max_ptr + row, tl.where(keep, m, 0.0))
    tl.store(ent_ptr + row, tl.where(keep, log_s - a / s, 0.0))
    tl.store(rank_ptr + row, tl.where(keep, r, 0))


_row_stats_autotuned = triton.autotune(configs=autotune_configs(), key=["V"])(_row_stats_kernel)


def row_stats(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, out: RowStats | None = None) -> RowStats:
    """Launch one program per row of ``[B, T, V]`` logits (last stride 1) with ``[B*T]`` int64
    targets. ``out``: optional float32 buffers ``(lse, z_y, max, H)`` and an int32 ``rank``."""
    b_size, t_size, v_size = logits.shape
    n = b_size * t_size
    if out is None:
        f32 = dict(dtype=torch.float32, device=logits.device)
        out = RowStats(*(torch.empty(n, **f32) for _ in range(4)), torch.empty(n, dtype=torch.int32, device=logits.device))
    if n > 0:
        args = (logits, target, *out, *row_offsets(logits.shape, logits.stride()), v_size, ignore_index)
        if AUTOTUNE:
            _row_stats_autotuned[(n,)](*args)
        else:
            _row_stats_kernel[(n,)](*args, **fixed_config(v_size))
    return out._replace(rank=out.rank.long())
