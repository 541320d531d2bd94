"""Inputs, peers, timing and memory measurement shared by the benchmarks.

Every implementation is a factory ``make(inputs) -> (fn, params)``: ``fn()`` runs the
forward pass and returns the loss; ``params`` are the tensors whose gradients backward
fills. Peers that are not installed are reported as missing, never faked.
"""

from __future__ import annotations

import math
import platform
import statistics

import torch
import torch.nn.functional as F

import ranktuner_kernels as rk
from ranktuner_kernels import synthetic

# ---- inputs with a realistic spread of p_t (mean 0.4) --------------------------------------


def make_linear_inputs(n, d, v, dtype=torch.bfloat16, device="cuda"):
    return synthetic.make_linear_inputs(n, d, v, dtype, device)


def make_logits(n, v, dtype=torch.bfloat16, device="cuda"):
    return synthetic.make_logits(n, v, dtype, device)


# ---- the naive materialising RankTuner (what a user writes today) ------------------------


def naive_ranktuner(logits, target):
    """RankTuner on materialised float32 logits, as the paper's pseudocode reads."""
    z = logits.float()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    lp_t = logp.gather(1, target[:, None])[:, 0]
    p_t = lp_t.exp()
    h_bits = -(p * logp).sum(-1) / math.log(2)
    rank = (z >= z.gather(1, target[:, None])).sum(-1).float()
    s = torch.where(h_bits >= 2, 2**h_bits / 4 + 1, 2 - p.max(-1).values)
    k = torch.log2(torch.maximum(rank, s) + 1) ** -2
    w = (p_t * torch.clamp(p_t * s, min=1e-6) ** -k).detach()
    return (w * -lp_t).mean()


def plain_ce(logits, target):
    return F.cross_entropy(logits.float(), target)


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


#: The benchmarks' N tokens form SEQS sequences of N / SEQS tokens.
SEQS = 8

# ---- implementations ---------------------------------------------------------------------


def linear_impls(weightings=("sft", "ranktuner")):
    """Fused-linear forward+backward implementations: name -> factory(h, w, y)."""
    impls = {}
    for name in weightings:  # as [B, T] sequences (TALR's median is per sequence)
        impls[f"rk.linear_cross_entropy[{name}]"] = lambda h, w, y, name=name: (
            lambda: rk.linear_cross_entropy(h.view(SEQS, -1, h.shape[-1]), w, y.view(SEQS, -1), weighting=name))
    impls["eager h@W.T + F.cross_entropy (fp32)"] = lambda h, w, y: (lambda: plain_ce(h @ w.T, y))
    impls["eager h@W.T + naive ranktuner"] = lambda h, w, y: (lambda: naive_ranktuner(h @ w.T, y))
    impls["eager h@W.T + rk reference[ranktuner]"] = lambda h, w, y: (
        lambda: rk.cross_entropy(h @ w.T, y, weighting="ranktuner", impl="reference"))
    impls["torch.compile(h@W.T + naive ranktuner)"] = lambda h, w, y: (
        lambda: compiled(_linear_naive)(h, w, y))
    impls["torch.compile(h@W.T + F.cross_entropy)"] = lambda h, w, y: (lambda: compiled(_linear_ce)(h, w, y))
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger fused linear CE (sft)"] = lambda h, w, y: (lambda: liger(w, h, y))
    except ImportError as e:
        impls["liger fused linear CE (sft)"] = _missing(e)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cut cross-entropy (sft)"] = lambda h, w, y: (lambda: cce(h, w, y))
    except ImportError as e:
        impls["cut cross-entropy (sft)"] = _missing(e)
    if hasattr(F, "linear_cross_entropy"):
        impls["F.linear_cross_entropy (sft)"] = lambda h, w, y: (lambda: F.linear_cross_entropy(h, w, y))
    else:
        impls["F.linear_cross_entropy (sft)"] = _missing(f"torch {torch.__version__} has no F.linear_cross_entropy")
    return impls


def _linear_naive(h, w, y):
    return naive_ranktuner(h @ w.T, y)


def _linear_ce(h, w, y):
    return plain_ce(h @ w.T, y)


def logits_impls(weightings=("sft", "ranktuner")):
    """Logits-input forward+backward implementations: name -> factory(logits, y)."""
    impls = {}
    for name in weightings:  # as [B, T] sequences (TALR's median is per sequence)
        impls[f"rk.cross_entropy[{name}]"] = lambda z, y, name=name: (
            lambda: rk.cross_entropy(z.view(SEQS, -1, z.shape[-1]), y.view(SEQS, -1), weighting=name))
    impls["rk.cross_entropy[ranktuner, inplace_backward]"] = lambda z, y: (
        lambda: rk.cross_entropy(z, y, weighting="ranktuner", inplace_backward=True))
    impls["F.cross_entropy (fp32 upcast)"] = lambda z, y: (lambda: plain_ce(z, y))
    impls["torch.compile(F.cross_entropy)"] = lambda z, y: (lambda: compiled(plain_ce)(z, y))
    impls["eager naive ranktuner"] = lambda z, y: (lambda: naive_ranktuner(z, y))
    impls["torch.compile(naive ranktuner)"] = lambda z, y: (lambda: compiled(naive_ranktuner)(z, y))
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        impls["liger cross-entropy (sft, in place)"] = lambda z, y: (lambda: liger(z, y))
    except ImportError as e:
        impls["liger cross-entropy (sft, in place)"] = _missing(e)
    return impls


def _missing(reason):
    def factory(*_):
        raise ModuleNotFoundError(str(reason))

    return factory


# ---- measurement -------------------------------------------------------------------------


def cuda_time_ms(fn, warmup=3, reps=10, flush_l2=True):
    """Median milliseconds of ``fn`` with CUDA events; L2 flushed before each repetition."""
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cache is not None:
            cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def measure(loss_fn, params, reps=10, warmup=3):
    """Forward, backward and forward+backward medians (ms) and peak memory above the inputs."""

    def clear():
        for p in params:
            p.grad = None

    def fwd():
        with torch.no_grad():
            loss_fn()

    def fwd_bwd():
        clear()
        loss_fn().backward()

    out = {}
    out["fwd_bwd_ms"], out["fwd_bwd_all_ms"] = cuda_time_ms(fwd_bwd, warmup, reps)
    out["fwd_nograd_ms"], _ = cuda_time_ms(fwd, warmup, reps)
    # backward alone: time a backward of a fresh forward each repetition
    times = []
    for _ in range(max(3, reps // 2)):
        clear()
        loss = loss_fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        loss.backward()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    out["bwd_ms"] = statistics.median(times)
    clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_fn().backward()
    torch.cuda.synchronize()
    out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    out["grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
    clear()
    return out


def ceilings():
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms, _ = cuda_time_ms(lambda: y.copy_(x), 5, 20, flush_l2=False)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms, _ = cuda_time_ms(lambda: a @ b, 5, 20, flush_l2=False)
    return {
        "copy_bytes_per_s": 2 * (1 << 30) / (copy_ms / 1e3),
        "matmul_flops_per_s": 2 * 8192**3 / (mm_ms / 1e3),
        "copy_1GiB_ms": copy_ms,
        "matmul_8192_ms": mm_ms,
    }


def environment():
    import triton

    props = torch.cuda.get_device_properties(0)
    env = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "ranktuner_kernels": rk.__version__,
    }
    try:
        import subprocess

        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        env["driver"] = "unknown"
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env
