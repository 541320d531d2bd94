"""The one gradient, second streaming pass over each row (SPEC, "One mechanism"):

    dz_i = J_i * (ga p_i - gy 1[i = y] - gc + gb p_i (log p_i + H))

with ``p_i = exp(z'_i - lse)``, ``z' = c tanh(z / c) / T`` and ``J = dz'/dz``; the target's
element is ``(ga - gy) p_t - gy (1 - p_t) - gc + ...`` with ``1 - p_t = -expm1(log p_t)``, so a
confident token keeps its gradient. ``gy``, ``gc``, ``gb`` are optional (``HAS_GY``: ``gy``
differs from ``ga``; ``HAS_GC``: label smoothing; ``HAS_BETA``: entropy terms). Written in
the output's dtype; the output may be the logits themselves (``inplace_backward``): each
element is read before it is overwritten by the same program. Ignored rows get zeros
without reading the logits.
"""

import triton
import triton.language as tl

from .config import AUTOTUNE, autotune_configs, cast_rne, fixed_config, row_offsets
from .fmath import expm1, tanh


@triton.heuristics({"HAS_GY": lambda args: args["gy_ptr"] is not None,
                    "HAS_GC": lambda args: args["gc_ptr"] is not None,
                    "HAS_BETA": lambda args: args["gb_ptr"] is not None})
@triton.jit
def _row_grad_kernel(
    logits_ptr, target_ptr, lse_ptr, logp_ptr, ent_ptr, ga_ptr, gy_ptr, gc_ptr, gb_ptr, grad_ptr,
    softcap, inv_temperature,
    T, stride_b, stride_t, gstride_b, gstride_t, V, ignore_index,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    HAS_GY: tl.constexpr, HAS_GC: tl.constexpr, HAS_BETA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    gbase = grad_ptr + (row // T) * gstride_b + (row % T) * gstride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    lse = tl.load(lse_ptr + row)
    logp_t = tl.load(logp_ptr + row)
    ga = tl.load(ga_ptr + row)
    gy = ga
    if HAS_GY:
        gy = tl.load(gy_ptr + row)
    gc = 0.0
    if HAS_GC:
        gc = tl.load(gc_ptr + row)
    p_t = tl.exp(logp_t)
    d_y = (ga - gy) * p_t + gy * expm1(logp_t)  # ga p_t - gy, without cancellation
    if HAS_BETA:
        gb = tl.load(gb_ptr + row)
        ent = tl.load(ent_ptr + row)
        d_y += gb * tl.where(p_t > 0, p_t * (logp_t + ent), 0.0)
    v_live = tl.where(keep, V, 0)  # ignored rows load nothing, store zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < v_live, other=0.0).to(tl.float32)
        zt = z
        if HAS_SOFTCAP:
            t = tanh(z / softcap)
            zt = softcap * t
        if HAS_TEMPERATURE:
            zt = zt * inv_temperature
        logp = zt - lse
        p = tl.exp(logp)
        d = ga * p
        if HAS_BETA:
            d += gb * tl.where(p > 0, p * (logp + ent), 0.0)
        d = tl.where(cols == y, d_y, d) - gc
        if HAS_SOFTCAP:
            d = d * (1.0 - t * t)
        if HAS_TEMPERATURE:
            d = d * inv_temperature
        d = tl.where(keep, d, 0.0)
        tl.store(gbase + cols, cast_rne(d, grad_ptr.dtype.element_ty), mask=cols < V)


_row_grad_autotuned = triton.autotune(
    configs=autotune_configs(), key=["V", "HAS_GY", "HAS_GC", "HAS_BETA"], restore_value=["grad_ptr"]
)(_row_grad_kernel)


def row_grad(logits, target, lse, logp_t, entropy, coefs, ignore_index, out, softcap=None, temperature=1.0):
    """Write the gradient of ``[B, T, V]`` logits into ``out`` (``[B, T, V]``, last stride 1;
    may alias ``logits``). ``lse, logp_t, entropy`` float32 ``[B*T]``; ``coefs`` a
    ``GradCoefs`` of float32 ``[B*T]`` tensors (``gy``, ``gc``, ``gb`` may be None)."""
    b_size, t_size, v_size = logits.shape
    n = b_size * t_size
    if n == 0:
        return out
    t, sb, st = row_offsets(logits.shape, logits.stride())
    _, gsb, gst = row_offsets(out.shape, out.stride())
    args = (logits, target, lse, logp_t, entropy, *coefs, out,
            1.0 if softcap is None else float(softcap), 1.0 / temperature,
            t, sb, st, gsb, gst, v_size, ignore_index)
    kw = dict(HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0)
    if AUTOTUNE:
        _row_grad_autotuned[(n,)](*args, **kw)
    else:
        _row_grad_kernel[(n,)](*args, **kw, **fixed_config(v_size, full_tile_warps=16))
    return out
