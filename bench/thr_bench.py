"""Token Hidden Reward: time and memory of the streaming implementations against the naive
materialised one.

The quantity (one group of ``N`` response tokens, half of them from correct responses, so
``|O| = N/2`` observed rows and ``|U| = N`` updating rows; ``D`` = 0 means no hidden factor):

    out[u] = sum_o <e_o - π_o, e_u - π_u> · (h_o · h_u)

Implementations:

* ``naive``: ``π = softmax(z)`` and ``e - π`` materialised (``N × V`` float32 each), then two
  matmuls: what one writes first.
* ``torch-stream``: ``ranktuner_kernels.reference.thr.thr_pair_sums`` (vocabulary chunks of
  8192; the CPU fallback).
* ``triton`` / ``triton-tf32`` (GPU only): the kernel ``ranktuner_kernels.kernels.thr``.
* ``torch-linear`` (the cases marked ``head``): ``reference.thr.linear_thr_sums`` from the hidden
  states ``[N, D]`` and a head ``[V, D]`` (``logits = h Wᵀ``, which the other rows get
  materialised as their input), never forming the logits; its time includes its lse pass.

Time: median of ``--reps`` runs after a warm-up (CUDA events on the GPU). Memory: peak bytes
above the inputs: ``torch.cuda.max_memory_allocated`` on the GPU; on the CPU the rise of the
process's peak RSS (``ru_maxrss``), each case measured in a fresh subprocess.

    python -m bench.thr_bench                 # CPU, small sizes (~1 minute)
    python -m bench.thr_bench --device cuda   # GPU sizes (N up to 8192, V up to 152064)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from ranktuner_kernels.reference import thr as ref

#: ``(N, V, D, head)``: ``head`` makes the logits ``h Wᵀ`` of hidden states and a head (and adds torch-linear)
CPU_CASES = [(256, 8192, 64, False), (512, 8192, 64, False), (512, 32768, 64, False), (1024, 32768, 0, False),
             (1024, 32768, 256, False), (1024, 32768, 256, True), (2048, 32768, 256, True)]
GPU_CASES = [(1024, 32768, 1024, False), (4096, 32768, 1024, False), (4096, 152064, 3584, False),
             (8192, 152064, 3584, False), (8192, 152064, 0, False), (8192, 152064, 3584, True)]


def make_inputs(n, v, d, device, seed=0, head=False):
    """The pair-sum arguments; with ``head`` the logits are ``h Wᵀ`` (hidden states pulled towards
    their token's head row) and the head ``W [V, D]`` is appended."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, v, (n,), generator=g, device=device)
    if head:
        weight = torch.randn(v, d, generator=g, device=device).mul_(3 / d**0.5)
        hidden = torch.randn(n, d, generator=g, device=device).div_(d**0.5)
        hidden += torch.rand(n, 1, generator=g, device=device) * 2 * weight[tokens] / d**0.5
        logits = hidden @ weight.T
    else:
        logits = torch.randn(n, v, generator=g, device=device).mul_(2)  # in place: no transient copy (CPU peak RSS)
        logits[torch.arange(n, device=device), tokens] += torch.rand(n, generator=g, device=device) * 10 - 2
        hidden = torch.randn(n, d, generator=g, device=device).div_(max(d, 1) ** 0.5) if d else None
    u_rows = torch.arange(n, device=device)
    o_rows = torch.arange(0, n, 2, device=device)  # every other token "correct"
    zeros_u = torch.zeros(n, dtype=torch.long, device=device)
    zeros_o = torch.zeros(o_rows.numel(), dtype=torch.long, device=device)
    w = torch.ones(o_rows.numel(), device=device)
    return (logits, tokens, u_rows, zeros_u, o_rows, zeros_o, w, hidden) + ((weight,) if head else ())


def naive(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden):
    """The obvious version, everything materialised (single group)."""
    p = torch.softmax(logits.float(), -1)  # N x V
    err = -p
    err[torch.arange(p.shape[0], device=p.device), tokens] += 1.0  # e - π, in place: one N x V buffer
    s = err[o_rows] @ err[u_rows].T  # |O| x |U|
    if hidden is not None:
        s = s * (hidden[o_rows] @ hidden[u_rows].T)
    return (o_weight[:, None] * s).sum(0)


def linear(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, weight):
    """``reference.thr.linear_thr_sums`` on the hidden states and the head (single group; the
    logits are not read)."""
    w_all = torch.zeros(hidden.shape[0], dtype=o_weight.dtype, device=hidden.device)
    w_all[o_rows] = o_weight
    group = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return ref.linear_thr_sums(hidden, weight, None, tokens, group, w_all)[u_rows]


def impls(device, head=False):
    out = {"naive": lambda *a: naive(*a[:8]), "torch-stream": lambda *a: ref.thr_pair_sums(*a[:8])}
    if device == "cuda":
        from ranktuner_kernels.kernels.thr import thr_pair_sums as k

        out["triton"] = lambda *a: k(*a[:8], precision="ieee")
        out["triton-tf32"] = lambda *a: k(*a[:8], precision="tf32")
    if head:
        out["torch-linear"] = lambda *a: linear(*a)
    return out


def time_fn(fn, args, device, reps):
    fn(*args)  # warm-up (compiles the kernel)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_cpu_child(name, n, v, d, head, reps):
    """Run in a fresh process: inputs, then the peak-RSS rise of one run, then the timing."""
    torch.set_num_threads(int(os.environ.get("THR_BENCH_THREADS", "1")))
    args = make_inputs(n, v, d, "cpu", head=head)
    fn = impls("cpu", head)[name]
    run_args = (None, *args[1:]) if name == "torch-linear" else args  # torch-linear reads no logits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = fn(*run_args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = time_fn(fn, run_args, "cpu", reps)
    want = naive(*args[:8]).double()
    err = float((out.double() - want).abs().max() / want.abs().max())
    return {"ms": ms, "peak_extra_mib": (peak - before) / 1024, "rel_err_vs_naive": err}


def run(device, cases, reps):
    rows = []
    for n, v, d, head in cases:
        names = list(impls(device, head))
        for name in names:
            if device == "cpu":
                cmd = [sys.executable, "-m", "bench.thr_bench", "--child", name, str(n), str(v), str(d), str(int(head)),
                       str(reps)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                r = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                args = make_inputs(n, v, d, "cuda", head=head)
                fn = impls("cuda", head)[name]
                try:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = fn(*args)
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() - base
                    ms = time_fn(fn, args, "cuda", reps)
                    want = naive(*args[:8]).double() if name != "naive" else out.double()
                    err = float((out.double() - want).abs().max() / want.abs().max())
                    r = {"ms": ms, "peak_extra_mib": peak / 2**20, "rel_err_vs_naive": err}
                except torch.cuda.OutOfMemoryError:
                    r = {"ms": float("nan"), "peak_extra_mib": float("nan"), "rel_err_vs_naive": float("nan"), "oom": True}
                del args
                torch.cuda.empty_cache()
            r.update(n=n, v=v, d=d, head=head, impl=name, nv_float32_mib=n * v * 4 / 2**20)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def table(rows):
    lines = ["| N | V | D | logits | impl | ms | peak extra MiB | N×V float32 MiB | rel. err vs naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['v']} | {r['d'] or '-'} | {'h Wᵀ' if r.get('head') else 'random'} | "
                     f"{r['impl']} | {r['ms']:.1f} | "
                     f"{r['peak_extra_mib']:.1f} | {r['nv_float32_mib']:.0f} | {r['rel_err_vs_naive']:.1e} |")
    return "\n".join(lines)


def environment(device):
    env = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        import triton

        env["gpu"] = torch.cuda.get_device_name()
        env["triton"] = triton.__version__
    else:
        import platform

        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = int(os.environ.get("THR_BENCH_THREADS", "1"))
    return env


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        name, n, v, d, head, reps = argv[1], *map(int, argv[2:7])
        print(json.dumps(measure_cpu_child(name, n, v, d, bool(head), reps)))
        return None
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.device == "cpu" else 10)
    cases = CPU_CASES if args.device == "cpu" else GPU_CASES
    rows = run(args.device, cases, reps)
    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
