"""Launch configuration shared by the row kernels: a fixed tuned default, autotuning opt-in."""

import os

import triton
import triton.language as tl

#: Set ``RANKTUNER_AUTOTUNE=1`` to autotune the block size and warps per vocabulary size.
AUTOTUNE = os.environ.get("RANKTUNER_AUTOTUNE", "0") == "1"

#: Under Triton's CPU interpreter (decided when the kernels are compiled, like the decorator).
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

#: Default vocabulary tile; rows narrower than this use the next power of two.
BLOCK_V = 2048


def fixed_config(v_size: int, full_tile_warps: int = 4) -> dict:
    """The default launch: tile ``min(BLOCK_V, next_pow2(V))``; ``full_tile_warps`` warps for
    full tiles. Tuned on an H100 at V = 152064 (bf16) with ``RANKTUNER_AUTOTUNE=1``: the
    statistics kernel chose 2048 x 4 warps, the gradient kernel 2048 x 16 warps."""
    block = min(BLOCK_V, triton.next_power_of_2(max(v_size, 1)))
    return {"BLOCK_V": block, "num_warps": full_tile_warps if block >= BLOCK_V else 4}


def autotune_configs():
    return [
        triton.Config({"BLOCK_V": b}, num_warps=w)
        for b in (1024, 2048, 4096, 8192)
        for w in (4, 8, 16)
    ]


def row_offsets(shape, strides):
    """``(T, stride_b, stride_t)`` so that row ``r`` of ``[B, T, V]`` starts at
    ``(r // T) * stride_b + (r % T) * stride_t`` (last stride must be 1)."""
    return shape[1], strides[0], strides[1]


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x`` (float32) to ``dtype``, rounding to nearest even. For bfloat16 the rounding is
    done on the bits: Triton's CPU interpreter truncates float32 -> bfloat16 casts, the GPU
    rounds to nearest; this way both give the same bits (NaN stays NaN, inf stays inf). On the
    GPU it is the native conversion (round to nearest even), one instruction per pair."""
    if dtype == tl.bfloat16 and INTERPRETING:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(dtype)
    else:
        return x.to(dtype)
