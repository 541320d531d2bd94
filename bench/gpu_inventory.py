"""The kernel inventory of ``bench.gpu_compile``: which call paths are recorded, for which GPU
targets they are compiled, and which kernels must not spill.

:data:`CALLS` is a plain list of functions, each running some of the library's public call
paths on small CPU tensors with ``impl="triton"``; :func:`exercise` runs every one of them
for each dtype of :data:`DTYPES` while ``bench.gpu_compile`` records every Triton launch. A
kernel or switch reached from these calls is covered without listing it; a new call path (a
new public function, a new option that takes another kernel variant) is one more function
appended to :data:`CALLS`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: target name -> the arguments of Triton's ``GPUTarget`` (backend, arch, warp size)
TARGETS = {
    "sm_80": ("cuda", 80, 32),
    "sm_90": ("cuda", 90, 32),
    "sm_100": ("cuda", 100, 32),
    "gfx942": ("hip", "gfx942", 64),
}
#: Kernels whose hot loop streams one row: they must not spill.
ROW_KERNELS = ("_row_stats_kernel", "_row_grad_kernel", "_topk_entropy_kernel")
#: Kernels that must not spill on the NVIDIA targets (gfx942's stack is reported, not a failure).
NVIDIA_NO_SPILL = ("_thr_pair_kernel",)


def must_not_spill(name: str, target: str) -> bool:
    """Whether stack bytes of kernel ``name`` compiled for ``target`` break the rule."""
    return name in ROW_KERNELS or (name in NVIDIA_NO_SPILL and target.startswith("sm_"))


#: The vocabulary width the launches are recorded at: a full 2048 tile plus a ragged tail, and a
#: multiple of 16 as LLM vocabularies are (Triton specializes the row strides on it: 16-byte loads).
V_RECORD = 2112
#: THR is also recorded at a vocabulary that is not a multiple of 16 (as GPT-2's 50,257 is): rows
#: not 16-element aligned, scalar loads.
V_RAGGED = 4100


@dataclass
class Inputs:
    """The tensors of one dtype the calls share: targets ``y`` ``[b, t]`` (one ignored),
    logits ``z`` ``[b, t, V_RECORD]``, hidden states ``h`` ``[b, t, d]``, head ``w`` ``[V_RECORD, d]``."""

    y: object
    z: object
    h: object
    w: object


def weighting_calls(x: Inputs):
    """``cross_entropy`` and ``linear_cross_entropy`` for every weighting of the registry, both
    option sets (plain; soft-cap, temperature, label smoothing and z-loss), and the in-place
    backward (one weighting suffices for it)."""
    import ranktuner_kernels as rk

    names = sorted(rk.weightings.WEIGHTINGS)
    option_sets = [{}, dict(softcap=6.0, temperature=1.3, label_smoothing=0.1, z_loss=1e-3)]
    for name in names:
        for opts in option_sets:
            weighting = rk.weightings.resolve(name)
            z = x.z.clone().requires_grad_()
            rk.cross_entropy(z, x.y, weighting=weighting, impl="triton", **opts).backward()
            if name == names[0]:  # one weighting suffices for in-place and the linear path's layout
                z = x.z.clone().requires_grad_()
                rk.cross_entropy(z * 1, x.y, weighting=weighting, impl="triton", inplace_backward=True,
                                 **opts).backward()
            h, w = x.h.clone().requires_grad_(), x.w.clone().requires_grad_()
            rk.linear_cross_entropy(h, w, x.y, weighting=weighting, impl="triton", **opts).backward()


def statistics_calls(x: Inputs):
    """``token_stats``, ``logprobs`` and ``linear_logprobs``, plain and with soft-cap and temperature."""
    import ranktuner_kernels as rk

    for opts in ({}, dict(softcap=6.0, temperature=1.3)):
        rk.token_stats(x.z, x.y, impl="triton", **opts)
        rk.logprobs(x.z, x.y, impl="triton", **opts)
        rk.linear_logprobs(x.h, x.w, x.y, impl="triton", **opts)


def thr_calls(x: Inputs):
    """THR's pair sums, without and with hidden states, in both precisions, at its GPU default
    blocks (the interpreter's smaller ones are a CPU speed choice), at :data:`V_RAGGED` first (so
    that the one-per-switch-set lists of the other targets get that case), then at ``V_RECORD``."""
    import torch

    import ranktuner_kernels as rk
    from ranktuner_kernels.kernels import thr as thr_kernels

    b, t, d = x.h.shape
    ragged = torch.randn(b, t, V_RAGGED, generator=torch.Generator().manual_seed(1)).to(x.z.dtype)
    saved = thr_kernels._interpreting
    thr_kernels._interpreting = lambda: False
    try:
        rows = torch.arange(b * t)
        grp = torch.zeros(b * t, dtype=torch.long)
        for z in (ragged, x.z):
            for hidden in (None, x.h.reshape(b * t, d)):
                for precision in ("ieee", "tf32"):
                    rk.rl.thr.thr_pair_sums(z, x.y.clamp_min(0).reshape(-1), rows, grp, rows, grp,
                                            torch.ones(b * t), hidden, impl="triton", precision=precision)
    finally:
        thr_kernels._interpreting = saved


#: The recorded call paths, run in this order for each dtype.
CALLS = [weighting_calls, statistics_calls, thr_calls]
#: The logits' (and hidden states') dtypes, by their ``torch`` names.
DTYPES = ("float32", "bfloat16", "float16")


def exercise():
    """Run every call of :data:`CALLS` on small CPU tensors of each dtype of :data:`DTYPES`."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, t, v, d = 1, 3, V_RECORD, 8
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 1] = -100
    for dtype in (getattr(torch, name) for name in DTYPES):
        z = torch.randn(b, t, v, generator=g).to(dtype)
        h = torch.randn(b, t, d, generator=g).to(dtype)
        w = (torch.randn(v, d, generator=g) / 3).to(dtype)
        for call in CALLS:
            call(Inputs(y, z, h, w))
