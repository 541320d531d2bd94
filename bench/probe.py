"""Quick GPU probe: our fused-linear and logits paths at the headline shape, for a few
chunk sizes (``CHUNK_BYTES``), and a kernel-by-kernel profile of one forward+backward.

    python -m bench.probe [CHUNK_MiB ...]        # 0 alone: the logits path only
    RANKTUNER_AUTOTUNE=1 python -m bench.probe 0  # and print the autotuner's choices
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import ranktuner_kernels as rk
import ranktuner_kernels._chunks as lce  # the chunk rule and the GEMM helpers
from bench import common


def kernel_profile(fn, params, title, rows=14):
    for p in params:
        p.grad = None
    fn().backward()
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn().backward()
        torch.cuda.synchronize()
    print(f"--- {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def main():
    n, d, v = 8192, 3584, 152064
    ceil = common.ceilings()
    print({k: round(x / 1e12, 2) if "per_s" in k else round(x, 3) for k, x in ceil.items()})
    h, w, y = common.make_linear_inputs(n, d, v)
    h.requires_grad_(), w.requires_grad_()
    floor = 6 * n * d * v / ceil["matmul_flops_per_s"] * 1e3
    for mib in [m for m in map(int, sys.argv[1:] or ["256", "1024"]) if m > 0]:
        lce.CHUNK_BYTES = {**lce.CHUNK_BYTES, "cuda": mib << 20}
        for name in ("sft", "ranktuner"):
            r = common.measure(lambda: rk.linear_cross_entropy(h, w, y, weighting=name), [h, w], reps=5, warmup=2)
            print(f"linear {name:10s} chunk {mib:5d} MiB: fwd+bwd {r['fwd_bwd_ms']:.1f} ms "
                  f"({r['fwd_bwd_ms'] / floor:.2f} x floor {floor:.1f}), peak extra {r['peak_extra_bytes'] / 2**30:.2f} GiB, "
                  f"grads {r['grad_bytes'] / 2**30:.2f} GiB", flush=True)
        kernel_profile(lambda: rk.linear_cross_entropy(h, w, y, weighting="ranktuner"), [h, w], f"linear ranktuner, chunk {mib} MiB")
    print("addmm out_dtype path:", lce._OUT_DTYPE_MM)
    del h, w
    z, y = common.make_logits(n, v)
    z.requires_grad_()
    floor = 3 * n * v * 2 / ceil["copy_bytes_per_s"] * 1e3
    for name in ("sft", "ranktuner"):
        r = common.measure(lambda: rk.cross_entropy(z, y, weighting=name), [z], reps=10)
        print(f"logits {name}: fwd+bwd {r['fwd_bwd_ms']:.2f} ms ({r['fwd_bwd_ms'] / floor:.2f} x floor {floor:.2f}), "
              f"fwd {r['fwd_nograd_ms']:.2f}, bwd {r['bwd_ms']:.2f}, peak extra {r['peak_extra_bytes'] / 2**30:.2f} GiB")
    kernel_profile(lambda: rk.cross_entropy(z, y, weighting="ranktuner"), [z], "logits ranktuner", rows=4)
    for mod in ("row_stats", "row_grad"):
        tuner = getattr(sys.modules[f"ranktuner_kernels.kernels.{mod}"], f"_{mod}_autotuned")
        print(mod, "autotuned best:", getattr(tuner, "best_config", None), getattr(tuner, "cache", None))


if __name__ == "__main__":
    main()
