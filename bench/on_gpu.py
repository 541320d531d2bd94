"""One command for a short GPU window (about 15 minutes including start-up on one H100/H200).

    python -m bench.on_gpu             # everything below, at most ~8 minutes; to a scratch folder
    python -m bench.on_gpu --update    # the same, into bench/results/ (merged: other toolchains' rows stay)
    python -m bench.on_gpu --dry-run   # list the steps with their estimated times (CPU, CI)

Steps, in order (each with its own time limit; a step that no longer fits the budget is
skipped and said so):

1. the GPU tests (``pytest -m gpu``), 2. the kernels' and numerics tests on the device (the
GPU's ``exp``/``log`` are approximate: the 1e-5 confident-token bound must hold there too),
3. the headline of both paths with the peers that are installed (Qwen2.5-7B head, N = 8192),
4. the fused linear path's memory-time frontier, 5. the THR benchmark, 6. TRL's fused LM head
against ours (``bench.trl_head``).

Writes ``on_gpu.json`` (device, versions, commit, each step's status, time and log tail)
besides what each step writes itself, all to a scratch folder unless ``--update`` (then into
``bench/results/``, the benchmarks merged by toolchain, ``on_gpu.json`` replaced; see
``bench/outputs.py``), and prints a one-screen summary of the headline against the last
committed GPU run's (``bench/results/headline.json`` as it was before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import outputs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUDGET_S = 480

#: (name, command, estimated seconds on an H100, time limit in seconds)
STEPS = [
    ("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-x", "tests"], 60, 120),
    ("numerics on the device", [sys.executable, "-m", "pytest", "-q", "tests/test_numerics.py",
                                "tests/test_kernels.py", "-m", "not slow"], 90, 150),
    ("headline, both paths", [sys.executable, "-m", "bench.compare", "--suite", "headline",
                              "--heads", "qwen2.5-7b", "--reps", "5", "--warmup", "2"], 120, 180),
    ("frontier", [sys.executable, "-m", "bench.compare", "--suite", "frontier", "--reps", "3", "--warmup", "1"],
     120, 180),
    ("THR benchmark", [sys.executable, "-m", "bench.thr_bench", "--device", "cuda"], 60, 120),
    ("TRL's head vs ours", [sys.executable, "-m", "bench.trl_head", "--device", "cuda", "--reps", "5", "--update"],
     30, 90),
]


def _environment():
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    return env


def _headline_rows(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None, {}
    env = data.get("environment", {})
    label = outputs.toolchain(env)  # the rows of the file's last run (a merged file holds others too)
    rows = {(r.get("kind"), r.get("impl")): r for r in data.get("rows", []) if r.get("toolchain", label) == label}
    return env, rows


def summary(before, after) -> str:
    """Headline rows now against the last GPU run (fwd+bwd ms, peak extra GiB)."""
    env_b, rows_b = before
    env_a, rows_a = after
    lines = [f"last GPU run: {env_b.get('device', '?')}, Triton {env_b.get('triton', '?')}",
             f"this run:     {env_a.get('device', '?')}, Triton {env_a.get('triton', '?')}",
             f"{'path':8} {'impl':42} {'fwd+bwd ms':>12} {'before':>8} {'x':>6} {'peak GiB':>9}"]
    for key, r in sorted(rows_a.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        if r.get("N") not in (None, 8192) or "fwd_bwd_ms" not in r:
            continue
        b = rows_b.get(key, {})
        ratio = r["fwd_bwd_ms"] / b["fwd_bwd_ms"] if b.get("fwd_bwd_ms") else None
        lines.append(f"{str(key[0]):8} {str(key[1])[:42]:42} {r['fwd_bwd_ms']:12.2f} "
                     f"{b.get('fwd_bwd_ms', float('nan')):8.2f} {('%.2f' % ratio) if ratio else '':>6} "
                     f"{r.get('peak_extra_bytes', 0) / 2**30:9.2f}")
    return "\n".join(lines[:40])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their estimated times, run nothing")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--update", action="store_true", help="write into the committed bench/results/ (merged by "
                                                           "toolchain), not to the scratch folder")
    args = ap.parse_args(argv)
    out_dir = outputs.RESULTS if args.update else outputs.SCRATCH
    steps_to_run = [(name, cmd + (["--update"] if args.update and "bench.compare" in cmd else []), est, limit)
                    for name, cmd, est, limit in STEPS]
    total = sum(s[2] for s in STEPS)
    if args.dry_run:
        for name, cmd, est, limit in steps_to_run:
            print(f"{est:4d} s (limit {limit:3d} s)  {name}: {' '.join('python' if c == sys.executable else c for c in cmd)}")
        print(f"{total:4d} s estimated in all (budget {args.budget:.0f} s)")
        print(f"writes to {out_dir}")
        return 0 if total <= args.budget else 1
    import torch

    if not torch.cuda.is_available():
        print("bench.on_gpu: no CUDA device (use --dry-run on a CPU machine)")
        return 2
    before = _headline_rows(os.path.join(outputs.RESULTS, "headline.json"))
    env = _environment()
    t0 = time.time()
    steps = []
    for name, cmd, est, limit in steps_to_run:
        left = args.budget - (time.time() - t0)
        if left < est:
            steps.append({"step": name, "status": "skipped", "why": f"{left:.0f} s left of the budget, {est} s estimated"})
            print(f"-- {name}: skipped ({left:.0f} s left)", flush=True)
            continue
        start = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(limit, left))
            status, log = ("ok" if p.returncode == 0 else f"failed (rc {p.returncode})"), p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            status, log = "timed out", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        took = time.time() - start
        steps.append({"step": name, "status": status, "seconds": round(took, 1), "estimate": est, "log_tail": log[-4000:]})
        print(f"-- {name}: {status} in {took:.0f} s (estimated {est})", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "on_gpu.json"), "w") as f:
        json.dump({"environment": env, "seconds": round(time.time() - t0, 1), "steps": steps}, f, indent=1)
    print(summary(before, _headline_rows(os.path.join(out_dir, "headline.json"))))
    print(f"wrote {os.path.join(out_dir, 'on_gpu.json')} (and the steps' reports beside it)")
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
