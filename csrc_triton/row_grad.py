"""The shared gradient, second streaming pass over each row.

``dz_i = gw_t * (p_i - 1[i = y]) + gb_t * p_i * (log p_i + H_t)`` with ``p_i = exp(z_i - lse_t)``,
``gw = g * w`` and ``gb = g * beta`` (``HAS_BETA`` only for entropy terms). Written in the
output's dtype; the output may be the logits themselves (``inplace_backward``): each
element is read before it is overwritten by the same program. Ignored rows get zeros
without reading the logits.
"""

import triton
import triton.language as tl

from .config import AUTOTUNE, autotune_configs, cast_rne, fixed_config, row_offsets


@triton.heuristics({"HAS_BETA": lambda args: args["gb_ptr"] is not None})
@triton.jit
def _row_grad_kernel(
    logits_ptr, target_ptr, lse_ptr, ent_ptr, gw_ptr, gb_ptr, grad_ptr,
    T, stride_b, stride_t, gstride_b, gstride_t, V, ignore_index,
    BLOCK_V: tl.constexpr, HAS_BETA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    gbase = grad_ptr + (row // T) * gstride_b + (row % T) * gstride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    lse = tl.load(lse_ptr + row)
    gw = tl.load(gw_ptr + row)
    if HAS_BETA:
        gb = tl.load(gb_ptr + row)
        ent = tl.load(ent_ptr + row)
    v_live = tl.where(keep, V, 0)  # ignored rows load nothing, store zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < v_live, other=0.0).to(tl.float32)
        logp = z - lse
        p = tl.exp(logp)
        d = gw * (p - tl.where(cols == y, 1.0, 0.0))
        if HAS_BETA:
            d += gb * tl.where(p > 0, p * (logp + ent), 0.0)
        d = tl.where(keep, d, 0.0)
        tl.store(gbase + cols, cast_rne(d, grad_ptr.dtype.element_ty), mask=cols < V)


_row_grad_autotuned = triton.autotune(
    configs=autotune_configs(), key=["V", "HAS_BETA"], restore_value=["grad_ptr"]
)(_row_grad_kernel)


def row_grad(logits, target, lse, entropy, gw, gb, ignore_index, out):
    """Write the gradient of ``[B, T, V]`` logits into ``out`` (``[B, T, V]``, last stride 1;
    may alias ``logits``). ``lse, entropy, gw`` float32 ``[B*T]``; ``gb`` the same or None."""
    b_size, t_size, v_size = logits.shape
    n = b_size * t_size
    if n == 0:
        return out
    t, sb, st = row_offsets(logits.shape, logits.stride())
    _, gsb, gst = row_offsets(out.shape, out.stride())
    args = (logits, target, lse, entropy, gw, gb, out, t, sb, st, gsb, gst, v_size, ignore_index)
    if AUTOTUNE:
        _row_grad_autotuned[(n,)](*args)
    else:
        _row_grad_kernel[(n,)](*args, **fixed_config(v_size, full_tile_warps=16))
    return out
