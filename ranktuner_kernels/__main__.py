"""Demo: every weighting on a synthetic batch, checked against the float64 reference.

    python -m ranktuner_kernels                  # GPU if present (Triton kernels), else CPU
    python -m ranktuner_kernels --impl triton    # on CPU: the kernels under Triton's interpreter

Prints, per weighting, the loss, the gradient's error against the float64 reference
(relative to the error of the same reference run in the input dtype), the forward+backward
time and the peak memory above the inputs, next to plain ``F.cross_entropy``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch


def peak_tracker(device):
    """``(reset, read)``: peak device memory in bytes above the current use (None on CPU)."""
    if device.type != "cuda":
        return (lambda: None), (lambda base: None)

    def reset():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def read(base):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    return reset, read


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 8 on GPU, 4 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024 on GPU, 128 on CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32768 on GPU, 4096 on CPU)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="logits dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.impl == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported: start again with it set
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "ranktuner_kernels", *(argv or sys.argv[1:])], env)
    if os.environ.get("TRITON_INTERPRET") == "1":  # numpy's warnings on discarded tl.where branches
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    import ranktuner_kernels as rk
    from ranktuner_kernels.synthetic import make_logits

    device = torch.device("cuda" if cuda else "cpu")
    b = args.batch or (8 if cuda else 4)
    t = args.seq or (1024 if cuda else 128)
    v = args.vocab or (32768 if cuda else 4096)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    logits, target = make_logits(b * t, v, dtype, device)
    logits, target = logits.view(b, t, v), target.view(b, t)
    target[:, :2] = -100  # a prompt-like prefix, ignored
    kept = target != -100
    impl_used = rk._dispatch.pick_impl(args.impl, logits)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"ranktuner-kernels {rk.__version__} demo on {where}: logits [{b}, {t}, {v}] {dtype}, "
          f"{int(kept.sum())} tokens kept, impl={impl_used}, torch {torch.__version__}")
    with torch.no_grad():
        p_t = rk.token_stats(logits, target)["p_t"][kept]
    print(f"p_t: mean {p_t.mean():.2f}, quartiles {[round(float(q), 3) for q in p_t.float().quantile(torch.tensor([0.25, 0.5, 0.75], device=device))]}")

    reset, read = peak_tracker(device)

    def timed(fn, x):
        x.grad = None
        fn(x).backward()  # warm-up (kernel compilation)
        x.grad = None
        if cuda:
            torch.cuda.synchronize()
        base = reset()
        start = time.perf_counter()
        loss = fn(x)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        return loss.detach(), x.grad, ms, read(base)

    def rel(a, ref):
        return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))

    rows = []
    ref_col = f"(ref {str(dtype).split('.')[-1]})"
    header = f"{'weighting':<14}{'loss':>10}{'max |dgrad|':>13}{'grad err':>11}{ref_col:>17}{'ms':>9}{'peak MiB':>10}  check"
    ce = lambda x: torch.nn.functional.cross_entropy(x.float().flatten(0, 1), target.flatten(), ignore_index=-100)  # noqa: E731
    x = logits.clone().requires_grad_()
    loss, _, ms, peak = timed(ce, x)
    rows.append(("F.cross_entropy", float(loss), None, None, None, ms, peak, ""))
    failures = 0
    for name in sorted(rk.weightings.WEIGHTINGS):
        def fn(z, name=name):
            return rk.cross_entropy(z, target, weighting=name, impl=args.impl)

        loss, grad, ms, peak = timed(fn, logits.clone().requires_grad_())
        z64 = logits.double().requires_grad_()
        rk.cross_entropy(z64, target, weighting=name, impl="reference").backward()
        z_low = logits.clone().requires_grad_()
        rk.cross_entropy(z_low, target, weighting=name, impl="reference").backward()
        err, err_ref = rel(grad, z64.grad), rel(z_low.grad, z64.grad)
        max_err = float((grad.double() - z64.grad).abs().max())
        ok = err <= 2 * err_ref + 1e-4 and torch.isfinite(loss)
        failures += not ok
        rows.append((name, float(loss), max_err, err, err_ref, ms, peak, "ok" if ok else "MISMATCH"))

    print(header)
    for name, loss, max_err, err, err_ref, ms, peak, check in rows:
        me = "" if max_err is None else f"{max_err:.2e}"
        e = "" if err is None else f"{err:.2e}"
        er = "" if err_ref is None else f"{err_ref:.2e}"
        pk = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        print(f"{name:<14}{loss:>10.4f}{me:>13}{e:>11}{er:>17}{ms:>9.2f}{pk:>10}  {check}")
    print("max |dgrad|: the largest gradient difference from the float64 reference; grad err: "
          "|grad - grad_ref64| / |grad_ref64|, beside the same error of the reference run in the input dtype "
          "(what torch itself gets there). Peak memory is measured on CUDA only.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
