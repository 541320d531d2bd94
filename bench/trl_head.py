"""TRL's fused LM head against ours: time, peak memory and near-certain-token precision.

Both compute the per-token log-probabilities and entropies of ``h @ W.T`` (``h`` ``[N, D]``,
``W`` ``[V, D]``, no bias, temperature 1) without materialising the ``[N, V]`` logits, forward
and backward (random upstream gradients on both outputs):

* ``trl``: ``trl.trainer.utils._ChunkedLogProbFunction`` (TRL 1.16's head: ``[4096, 32768]``
  tiles by a matmul, folded by its Triton kernel on CUDA, by torch elsewhere);
* ``ours``: ``ranktuner_kernels.integrations.trl.statistics.head_statistics``, what our
  ``add_fused_lm_head`` calls (``rk.linear_logprobs``).

Time: median of ``--reps`` runs after a warm-up (CUDA events on the GPU). Memory: peak bytes
above the inputs: ``torch.cuda.max_memory_allocated`` on the GPU; on the CPU the rise of the
process's peak RSS (``ru_maxrss``) over one run, each case in a fresh process (on the GPU
the cases share one process). Precision: at
``N_PREC`` rows whose target has ``p = 1 - 1e-10 .. 1 - 1e-6`` (logits of 20-40), the largest
relative error of ``log p``, of the entropy and of the gradient of ``h`` against float64 on the
same inputs, beside what float32 logits allow (``2 max|dz|``, ``dz`` the error of ``h @ W.T`` in
float32: ``1 - p`` moves by ``exp(dz)``).

    python -m bench.trl_head               # CPU (N=512, D=512, one thread; about 4 minutes), to a scratch folder
    python -m bench.trl_head --update      # ... and bench/results/trl_head.{md,json}
    python -m bench.trl_head --device cuda # GPU sizes (N=8192, D=4096, bfloat16)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPLS = ("trl", "ours")
VOCABS = (32768, 151936)
SIZES = {"cpu": dict(n=512, d=512, dtype="float32"), "cuda": dict(n=8192, d=4096, dtype="bfloat16")}
N_PREC = 256
THREADS = int(os.environ.get("TRL_HEAD_THREADS", "1"))


def head(name):
    """``fn(h, W, y) -> (logp, entropy)`` of one implementation."""
    if name == "trl":
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        def fn(h, w, y):
            out = _ChunkedLogProbFunction.apply(h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                ("log_probs", "entropy"))
            return out[0], out[1]
        return fn
    from ranktuner_kernels.integrations.trl.statistics import head_statistics

    def fn(h, w, y):
        out = head_statistics(h, w, None, y, softcap=None, temperature=1.0, wanted=("log_probs", "entropy"))
        return out["log_probs"], out["entropy"]
    return fn


def inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def near_certain(n, d, v, device, seed=1):
    """Rows whose target is near-certain: the target's head row points along the row's hidden
    state, with a logit of ``18.4 + log(V)`` (28.8 to 30.3 here: ``1 - p`` about 1e-8)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    y = torch.randperm(v, generator=g)[:n]
    target = 18.4 + torch.log(torch.tensor(float(v)))
    w[y] = h * (target / (h * h).sum(-1, keepdim=True))
    return h.to(device), w.to(device), y.to(device)


def run_once(fn, h, w, y, g_lp, g_ent):
    h.grad = w.grad = None
    logp, ent = fn(h, w, y)
    torch.autograd.backward([logp, ent], [g_lp.to(logp.dtype), g_ent.to(ent.dtype)])


def timed(fn, args, device, reps):
    run_once(fn, *args)  # warm-up (Triton compiles)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_once(fn, *args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run_once(fn, *args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def precision(name, d, v, device):
    """Largest relative errors of log p, entropy and the gradient of h on near-certain rows."""
    h, w, y = near_certain(N_PREC, d, v, device)
    z = h.double() @ w.double().T
    logp64 = z.log_softmax(-1)
    one_minus_p = -logp64.gather(-1, y[:, None])[:, 0]
    keep = (one_minus_p > 1e-10) & (one_minus_p < 1e-6)
    truth_lp = logp64.gather(-1, y[:, None])[:, 0]
    truth_ent = -(logp64.exp() * logp64).sum(-1)
    # d(sum log p)/dh = W[y] - softmax(z) @ W
    truth_gh = w.double()[y] - logp64.exp() @ w.double()
    hh = h.clone().requires_grad_()
    logp, ent = head(name)(hh, w, y)
    logp.sum().backward()

    def rel(got, want):
        return float(((got.double() - want).abs() / want.abs())[keep].max())

    gh = float(((hh.grad.double() - truth_gh).norm(dim=-1) / truth_gh.norm(dim=-1))[keep].max())
    # what float32 logits allow: 1 - p moves by exp(dz) with dz their error, so log p by ~2 max|dz| relatively
    dz = ((h @ w.T).double() - z).abs().max(-1).values
    return {"rows": int(keep.sum()), "one_minus_p": [float(one_minus_p[keep].min()), float(one_minus_p[keep].max())],
            "rel_err_logp": rel(logp, truth_lp), "rel_err_entropy": rel(ent, truth_ent), "rel_err_grad_h": gh,
            "float32_logits_bound": float(2 * dz[keep].max())}


def measure(name, n, d, v, dtype, device, reps):
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h, w, y = inputs(n, d, v, dt, device)
    g = torch.Generator(device="cpu").manual_seed(2)
    g_lp, g_ent = (torch.rand(n, generator=g).to(device) for _ in range(2))
    args = (h, w, y, g_lp, g_ent)
    fn = head(name)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, *args)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        run_once(fn, *args)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    ms = timed(fn, args, device, reps)
    row = {"impl": name, "n": n, "d": d, "v": v, "dtype": dtype, "ms": ms, "peak_extra_mib": peak,
           "nv_float32_mib": n * v * 4 / 2**20}
    row.update(precision(name, d, v, device))
    return row


def run(device, reps):
    rows = []
    size = SIZES[device]
    for v in VOCABS:
        for name in IMPLS:
            if device == "cuda":  # the peak is the allocator's: one process serves every case
                row = measure(name, size["n"], size["d"], v, size["dtype"], device, reps)
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                continue
            cmd = [sys.executable, "-m", "bench.trl_head", "--child", name, str(size["n"]), str(size["d"]), str(v),
                   size["dtype"], device, str(reps)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{name} V={v} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def environment(device):
    import trl

    env = {"torch": torch.__version__, "trl": trl.__version__, "python": platform.python_version(), "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
        env["threads"] = THREADS
        env["load_average_1m"] = round(os.getloadavg()[0], 2)  # a shared machine: other jobs slow every case
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    return env


def table(rows):
    lines = ["| V | impl | fwd+bwd ms | peak extra MiB | N×V float32 MiB | near-certain rows (1-p) | "
             "rel. err log p | rel. err entropy | rel. err grad h | float32 logits' bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["one_minus_p"]
        lines.append(f"| {r['v']} | {r['impl']} | {r['ms']:.0f} | {r['peak_extra_mib']:.0f} | {r['nv_float32_mib']:.0f} | "
                     f"{r['rows']} ({lo:.1e}..{hi:.1e}) | {r['rel_err_logp']:.1e} | {r['rel_err_entropy']:.1e} | "
                     f"{r['rel_err_grad_h']:.1e} | {r['float32_logits_bound']:.1e} |")
    return "\n".join(lines)


def markdown(env, rows, device):
    size = SIZES[device]
    head_line = ", ".join(f"{k} {v}" for k, v in env.items())
    gpu = ("GPU numbers: waiting for a GPU (`python -m bench.trl_head --device cuda`, in `bench.on_gpu`'s list)."
           if device == "cpu" else "")
    noise = ("On a shared CPU (load average above) the times of one case vary by tens of percent between runs; "
             "the memory and the errors do not.\n\n" if device == "cpu" else "")
    return (f"# TRL's fused LM head against ours\n\n`python -m bench.trl_head{' --device cuda' if device == 'cuda' else ''}"
            f" --update`: {head_line}.\n\nForward and backward of the log-probabilities and entropies of "
            f"N = {size['n']} rows, D = {size['d']}, {size['dtype']} (each case in a fresh process; time: median of "
            f"the runs after a warm-up; memory: peak above the inputs). Precision: {N_PREC} rows with near-certain "
            f"targets (the rows kept have 1 - p in the range shown), largest relative error against float64 on the "
            f"same inputs; the last column is what float32 logits allow (2 max|dz|, dz the error of h @ W.T in "
            f"float32).\n\n{table(rows)}\n\n{noise}{gpu}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        name, n, d, v, dtype, device, reps = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5], argv[6], \
            int(argv[7])
        print(json.dumps(measure(name, n, d, v, dtype, device, reps)))
        return None
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per case (CPU 3, GPU 10)")
    ap.add_argument("--update", action="store_true", help="write bench/results/trl_head.{md,json} (else a scratch folder)")
    ap.add_argument("--out-dir", default=None, help="where to write without --update (default: a temporary folder)")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.device == "cpu" else 10)
    rows = run(args.device, reps)
    env = environment(args.device)
    out_dir = os.path.join(HERE, "results") if args.update else (
        args.out_dir or os.path.join(tempfile.gettempdir(), "ranktuner-bench"))
    os.makedirs(out_dir, exist_ok=True)
    stem = "trl_head" if args.device == "cpu" else "trl_head_gpu"
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"environment": env, "sizes": SIZES[args.device], "n_prec": N_PREC, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown(env, rows, args.device))
    print(table(rows))
    print(f"written to {out_dir}/{stem}.{{md,json}}")
    return rows


if __name__ == "__main__":
    main()
