"""The one gradient, second streaming pass over each row (SPEC, "One mechanism"):

    dz_i = J_i * (c_p p_i - c_onehot 1[i = y] - c_uniform + c_entropy p_i (log p_i + H))

with the per-token coefficients of ``GradCoefs`` (``p``, ``onehot``, ``uniform``, ``entropy``),
``p_i = exp(z'_i - lse)``, ``z' = c tanh(z / c) / T`` and ``J = dz'/dz``; the target's element
is ``(c_p - c_onehot) p_t - c_onehot (1 - p_t) - c_uniform + ...`` with
``1 - p_t = -expm1(log p_t)``, so a confident token keeps its gradient. The last three are
optional (``HAS_ONEHOT``: ``c_onehot`` differs from ``c_p``; ``HAS_UNIFORM``: label smoothing;
``HAS_ENTROPY``: entropy terms). Written in
the output's dtype; the output may be the logits themselves (``inplace_backward``): each
element is read before it is overwritten by the same program. Full tiles run without masks
or a compare with the target; the target's element is stored once after the sweep (behind
a block barrier, from its logit read before the sweep). Ignored rows get zeros without
reading the logits.
"""

import triton
import triton.language as tl

from .config import AUTOTUNE, autotune_configs, cast_rne, fixed_config, row_offsets
from .fmath import expm1, tanh


#: ``log2 e``: ``exp(x) = exp2(x log2 e)`` (the GPU's exponential is a base-2 instruction).
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _elem_grad(z, lse2, lse, c_p, c_entropy, c_uniform, ent, softcap, inv_temperature,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, HAS_UNIFORM: tl.constexpr,
               HAS_ENTROPY: tl.constexpr):
    """The non-target elements' ``dz`` of one tile (``lse2 = lse log2 e``)."""
    zt = z
    if HAS_SOFTCAP:
        th = tanh(z / softcap)
        zt = softcap * th
    if HAS_TEMPERATURE:
        zt = zt * inv_temperature
    p = tl.exp2(zt * LOG2E - lse2)  # exp(z' - lse) with one FMA before the exponential
    d = c_p * p
    if HAS_ENTROPY:
        d += c_entropy * tl.where(p > 0, p * (zt - lse + ent), 0.0)
    if HAS_UNIFORM:
        d = d - c_uniform
    if HAS_SOFTCAP:
        d = d * (1.0 - th * th)
    if HAS_TEMPERATURE:
        d = d * inv_temperature
    return d


@triton.heuristics({"HAS_ONEHOT": lambda args: args["c_onehot_ptr"] is not None,
                    "HAS_UNIFORM": lambda args: args["c_uniform_ptr"] is not None,
                    "HAS_ENTROPY": lambda args: args["c_entropy_ptr"] is not None})
@triton.jit
def _row_grad_kernel(
    logits_ptr, target_ptr, lse_ptr, logp_ptr, ent_ptr, c_p_ptr, c_onehot_ptr, c_uniform_ptr, c_entropy_ptr,
    grad_ptr, softcap, inv_temperature,
    T, stride_b, stride_t, gstride_b, gstride_t, V, ignore_index,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    HAS_ONEHOT: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    gbase = grad_ptr + (row // T) * gstride_b + (row % T) * gstride_t
    y = tl.load(target_ptr + row)
    keep = y != ignore_index
    in_row = keep & (y >= 0) & (y < V)
    lse = tl.load(lse_ptr + row)
    logp_t = tl.load(logp_ptr + row)
    c_p = tl.load(c_p_ptr + row)
    c_onehot = c_p
    if HAS_ONEHOT:
        c_onehot = tl.load(c_onehot_ptr + row)
    c_uniform = 0.0
    if HAS_UNIFORM:
        c_uniform = tl.load(c_uniform_ptr + row)
    c_entropy = 0.0
    ent = 0.0
    p_t = tl.exp(logp_t)
    d_y = (c_p - c_onehot) * p_t + c_onehot * expm1(logp_t)  # c_p p_t - c_onehot, without cancellation
    if HAS_ENTROPY:
        c_entropy = tl.load(c_entropy_ptr + row)
        ent = tl.load(ent_ptr + row)
        d_y += c_entropy * tl.where(p_t > 0, p_t * (logp_t + ent), 0.0)
    # the target's element, from its logit read before any store (the output may be the logits)
    d_y = d_y - c_uniform
    if HAS_SOFTCAP:
        z_y = tl.load(base + tl.where(in_row, y, 0)).to(tl.float32)
        th_y = tanh(z_y / softcap)
        d_y = d_y * (1.0 - th_y * th_y)
    if HAS_TEMPERATURE:
        d_y = d_y * inv_temperature
    lse2 = lse * LOG2E
    cols = tl.arange(0, BLOCK_V)
    out_ty = grad_ptr.dtype.element_ty
    n_full = (V // BLOCK_V) * BLOCK_V
    if keep:
        for start in range(0, n_full, BLOCK_V):  # full tiles: no mask, no compare with the target
            z = tl.load(base + start + cols).to(tl.float32)
            d = _elem_grad(z, lse2, lse, c_p, c_entropy, c_uniform, ent, softcap, inv_temperature,
                           HAS_SOFTCAP, HAS_TEMPERATURE, HAS_UNIFORM, HAS_ENTROPY)
            tl.store(gbase + start + cols, cast_rne(d, out_ty))
        if n_full < V:  # the ragged tail
            mask = n_full + cols < V
            z = tl.load(base + n_full + cols, mask=mask, other=0.0).to(tl.float32)
            d = _elem_grad(z, lse2, lse, c_p, c_entropy, c_uniform, ent, softcap, inv_temperature,
                           HAS_SOFTCAP, HAS_TEMPERATURE, HAS_UNIFORM, HAS_ENTROPY)
            tl.store(gbase + n_full + cols, cast_rne(d, out_ty), mask=mask)
        if in_row:  # the target's element, once, after every thread's store of its tile
            tl.debug_barrier()
            tl.store(gbase + y, cast_rne(d_y, out_ty))
    else:  # ignored rows: zeros, without reading the logits
        for start in range(0, V, BLOCK_V):
            tl.store(gbase + start + cols, tl.zeros([BLOCK_V], out_ty), mask=start + cols < V)


_row_grad_autotuned = triton.autotune(
    configs=autotune_configs(), key=["V", "HAS_ONEHOT", "HAS_UNIFORM", "HAS_ENTROPY"], restore_value=["grad_ptr"]
)(_row_grad_kernel)


def row_grad(logits, target, lse, logp_t, entropy, coefs, ignore_index, out, softcap=None, temperature=1.0):
    """Write the gradient of ``[B, T, V]`` logits into ``out`` (``[B, T, V]``, last stride 1;
    may alias ``logits``). ``lse, logp_t, entropy`` float32 ``[B*T]``; ``coefs`` a
    ``GradCoefs`` of float32 ``[B*T]`` tensors, read by name (``onehot``, ``uniform``,
    ``entropy`` may be None)."""
    b_size, t_size, v_size = logits.shape
    n = b_size * t_size
    if n == 0:
        return out
    t, sb, st = row_offsets(logits.shape, logits.stride())
    _, gsb, gst = row_offsets(out.shape, out.stride())
    args = (logits, target, lse, logp_t, entropy, coefs.p, coefs.onehot, coefs.uniform, coefs.entropy, out,
            1.0 if softcap is None else float(softcap), 1.0 / temperature,
            t, sb, st, gsb, gst, v_size, ignore_index)
    kw = dict(HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0)
    if AUTOTUNE:
        _row_grad_autotuned[(n,)](*args, **kw)
    else:
        _row_grad_kernel[(n,)](*args, **kw, **fixed_config(v_size, full_tile_warps=16))
    return out
