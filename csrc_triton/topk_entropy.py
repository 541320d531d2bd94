"""EAFT's statistic: the entropy of the softmax over each row's ``K`` largest logits, in one
streaming pass with a running top-K (``K <= 64``) instead of ``torch.topk``.

Per row, ``top`` holds the ``K`` largest transformed logits seen so far (``KP`` register slots,
the ones past ``K`` unused) and ``thr`` the smallest of them. Each tile's elements above
``thr`` are candidates; while there is one, the largest replaces the smallest slot and ``thr``
is updated. Elements equal to ``thr`` are not inserted: swapping equal values leaves the
multiset of the top ``K`` values, hence the entropy, unchanged. After the first tile few
elements pass ``thr`` (about ``K ln(V / K)`` insertions per row for logits in random order).
Then ``H = log1p(u) - a / (1 + u)`` over the kept values, with ``u`` the mass besides the
top one (as the statistics kernel does, so a confident row keeps its tiny entropy). A NaN
anywhere in the row gives NaN (``torch.topk`` ranks NaN first); ignored rows store 0.
"""

import torch
import triton
import triton.language as tl

from .config import row_offsets
from .fmath import log1p, transform

#: The largest K done in registers (the caller falls back to ``torch.topk`` above it).
MAX_K = 64
#: ptxas's register cap on CUDA (ROCm's Triton rejects the keyword). Left to itself, Triton 3.6's
#: ptxas holds float16 logits with soft-cap and temperature at 72 registers and spills 8 bytes on
#: sm_80/sm_90; allowed 128 it uses 70-107 and none spills (``bench/results/kernels.md``).
MAXNREG = 128


@triton.jit
def _topk_entropy_kernel(
    logits_ptr, target_ptr, out_ptr, softcap, inv_temperature,
    T, stride_b, stride_t, V, ignore_index,
    K: tl.constexpr, KP: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    v_live = tl.where(keep, V, 0)
    slots = tl.arange(0, KP)
    active = slots < K
    top = tl.full([KP], float("-inf"), tl.float32)
    thr = float("-inf")
    has_nan = 0
    for start in range(0, V, BLOCK_V):
        cols = tl.arange(0, BLOCK_V)
        mask = start + cols < v_live
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = transform(z, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        z = tl.where(mask, z, float("-inf"))
        has_nan += tl.sum((z != z).to(tl.int32), axis=0)
        cand = tl.where(z > thr, z, float("-inf"))
        n_cand = tl.sum((cand > thr).to(tl.int32), axis=0)
        while n_cand > 0:
            best = tl.max(cand, axis=0)
            at = tl.argmax(cand, axis=0)
            slot = tl.argmin(tl.where(active, top, float("inf")), axis=0)
            top = tl.where(slots == slot, best, top)
            thr = tl.min(tl.where(active, top, float("inf")), axis=0)
            cand = tl.where((cols != at) & (cand > thr), cand, float("-inf"))
            n_cand = tl.sum((cand > thr).to(tl.int32), axis=0)

    m = tl.max(tl.where(active, top, float("-inf")), axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(active, tl.exp(top - m_ref), 0.0)
    first = tl.argmax(tl.where(active, top, float("-inf")), axis=0)
    u = tl.sum(tl.where(slots == first, 0.0, e), axis=0)
    a = tl.sum(tl.where(e > 0, e * (top - m_ref), 0.0), axis=0)
    h = log1p(u) - a / (1.0 + u)
    h = tl.where(has_nan > 0, float("nan"), h)
    tl.store(out_ptr + row, tl.where(keep, h, 0.0))


def topk_entropy(logits: torch.Tensor, target: torch.Tensor, k: int, ignore_index: int, softcap=None,
                 temperature=1.0) -> torch.Tensor:
    """``[B*T]`` float32 entropy (nats) of ``softmax(topk(z', min(k, V)))`` of ``[B, T, V]``
    logits (last stride 1); ``1 <= k <= MAX_K``; ignored rows: 0."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: the streaming top-K takes 1 <= k <= {MAX_K}, got {k}")
    b_size, t_size, v_size = logits.shape
    n = b_size * t_size
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    block = min(2048, triton.next_power_of_2(max(v_size, 16)))
    _topk_entropy_kernel[(n,)](
        logits, target, out, 1.0 if softcap is None else float(softcap), 1.0 / temperature,
        *row_offsets(logits.shape, logits.stride()), v_size, ignore_index,
        K=k, KP=max(16, triton.next_power_of_2(k)), BLOCK_V=block,
        HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0, num_warps=4,
        **({} if torch.version.hip is not None else {"maxnreg": MAXNREG}))
    return out
