"""Compile every kernel variant the library launches for GPU targets, on a machine without a GPU.

Two steps, two processes:

1. :func:`record_launches` (in a process with ``TRITON_INTERPRET=1``, as the tests run): the
   library's public functions run on small CPU tensors (:func:`exercise`: every weighting of
   the registry, both option sets, three dtypes, both paths, in-place backward,
   ``token_stats``, ``logprobs``, ``linear_logprobs``, THR) while every Triton launch is
   recorded (kernel, argument dtypes/values, constexprs, ``num_warps``) and still run by the
   interpreter, so the call paths see real values. A new kernel or switch reached from the
   public functions is covered without a list.
2. :func:`compile_variants` (a subprocess without the interpreter, one per target): Triton's
   active driver is replaced by one that only reports a ``GPUTarget`` and each recorded launch
   becomes ``JITFunction.warmup`` (a compile, no launch). From the compiled kernel: registers,
   stack (spill) bytes and shared memory (``cuobjdump -res-usage`` on the cubin; the AMDGPU
   kernel descriptor for gfx942), and the SASS of the hot loop (:func:`loop_counts`).

Launch shapes: the vocabulary is 2112 wide (one full 2048 tile, the GPU default, and a
ragged tail), so the row kernels compile at their production block sizes; THR is recorded
with its GPU launch (``thr.GPU_LAUNCH``: blocks, warps, stages, ``maxnreg``), both precisions,
at ``V_RECORD`` and at ``V_RAGGED`` (not a multiple of 16); for gfx942 a
launch is compiled as the library makes it on ROCm (:func:`_rocm_launch`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

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
#: THR is also recorded at a vocabulary that is not a multiple of 16 (as GPT-2's 50,257 is).
V_RAGGED = 4100


def backends_available() -> str | None:
    """None if Triton's NVIDIA and AMD backends (and the CUDA binary tools) are present, else why not."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover
        return f"Triton is not installed ({e})"
    missing = [b for b in ("nvidia", "amd") if b not in backends]
    if missing:
        return f"Triton's {'/'.join(missing)} backend(s) are absent from this Triton build"
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        if not os.path.exists(os.path.join(bindir, tool)):
            return f"{tool} is not shipped in {bindir}"
    return None


# ----------------------------------------------------------------------------- recording

def _encode(x):
    import torch

    if x is None:
        return ["none"]
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype).replace("torch.", "")]
    if isinstance(x, bool):
        return ["bool", x]
    if isinstance(x, int):
        return ["int", x]
    if isinstance(x, float):
        return ["float", x]
    if isinstance(x, str):
        return ["str", x]
    fn = getattr(x, "fn", None)
    if fn is not None and hasattr(fn, "__module__"):  # a @triton.jit function passed as a constexpr
        return ["jit", fn.__module__, fn.__name__]
    if hasattr(x, "value"):  # tl.constexpr
        return _encode(x.value)
    raise TypeError(f"cannot record a launch argument of type {type(x).__name__}")


@contextlib.contextmanager
def record_launches(out: list):
    """Append one dict per Triton launch (``module, name, args, kwargs``) to ``out``; the launches
    still run (under the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        out.append({"module": self.fn.__module__, "name": self.fn.__name__,
                    "args": [_encode(a) for a in args],
                    "kwargs": {k: _encode(v) for k, v in sorted(kwargs.items())}})
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield out
    finally:
        InterpretedFunction.run = original


def exercise():
    """Run the library's public call paths on small CPU tensors with ``impl="triton"``."""
    import torch

    import ranktuner_kernels as rk
    from ranktuner_kernels.kernels import thr as thr_kernels

    g = torch.Generator().manual_seed(0)
    b, t, v, d = 1, 3, V_RECORD, 8
    names = sorted(rk.weightings.WEIGHTINGS)
    option_sets = [{}, dict(softcap=6.0, temperature=1.3, label_smoothing=0.1, z_loss=1e-3)]
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 1] = -100
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z0 = torch.randn(b, t, v, generator=g).to(dtype)
        h0 = torch.randn(b, t, d, generator=g).to(dtype)
        w0 = (torch.randn(v, d, generator=g) / 3).to(dtype)
        for name in names:
            for opts in option_sets:
                weighting = rk.weightings.resolve(name)
                z = z0.clone().requires_grad_()
                rk.cross_entropy(z, y, weighting=weighting, impl="triton", **opts).backward()
                if name == names[0]:  # one weighting suffices for in-place and the linear path's layout
                    z = z0.clone().requires_grad_()
                    rk.cross_entropy(z * 1, y, weighting=weighting, impl="triton", inplace_backward=True,
                                     **opts).backward()
                h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                rk.linear_cross_entropy(h, w, y, weighting=weighting, impl="triton", **opts).backward()
        for opts in ({}, dict(softcap=6.0, temperature=1.3)):
            rk.token_stats(z0, y, impl="triton", **opts)
            rk.logprobs(z0, y, impl="triton", **opts)
            rk.linear_logprobs(h0, w0, y, impl="triton", **opts)
        # THR at its GPU default blocks (the interpreter's smaller ones are a CPU speed choice), at
        # a vocabulary that is not a multiple of 16 (rows not 16-element aligned: scalar loads)
        # first, so that the one-per-switch-set lists of the other targets get that case
        saved = thr_kernels._interpreting
        thr_kernels._interpreting = lambda: False
        try:
            rows = torch.arange(b * t)
            grp = torch.zeros(b * t, dtype=torch.long)
            z_ragged = torch.randn(b, t, V_RAGGED, generator=g).to(dtype)
            for z in (z_ragged, z0):
                for hidden in (None, h0.reshape(b * t, d)):
                    for precision in ("ieee", "tf32"):
                        rk.rl.thr.thr_pair_sums(z, y.clamp_min(0).reshape(-1), rows, grp, rows, grp,
                                                torch.ones(b * t), hidden, impl="triton", precision=precision)
        finally:
            thr_kernels._interpreting = saved


def record_variants() -> list[dict]:
    """Distinct launches of :func:`exercise` (needs ``TRITON_INTERPRET=1`` set before Triton's import)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("record_variants: set TRITON_INTERPRET=1 before importing Triton")
    launches: list = []
    with record_launches(launches):
        exercise()
    seen, variants = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            variants.append(launch)
    return variants, len(launches)


# ----------------------------------------------------------------------------- compiling

def _decode(x):
    import torch

    kind = x[0]
    if kind == "none":
        return None
    if kind == "tensor":
        from triton.runtime.jit import MockTensor

        return MockTensor(getattr(torch, x[1]))
    if kind == "jit":
        return _jit_function(x[1], x[2])
    return x[1]


def _jit_function(module, name):
    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):  # heuristics / autotune wrappers
        obj = obj.fn
    return obj


def _target_driver(target, index):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class TargetOnly(DriverBase):
        """Reports ``target`` and device ``index``; compiles, never launches."""

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):  # pragma: no cover - launches only
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget(*target)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):  # pragma: no cover
            raise NotImplementedError

        def get_current_device(self):
            return index

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

    return TargetOnly()


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources_cuda(cubin: bytes, arch: str):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {"registers": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
            "local": int(fields.get("LOCAL", -1))}, sass


def _resources_hip(asm: str):
    def field(pattern):
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else -1

    return {"registers": field(r"\.vgpr_count:\s+(\d+)"),
            "stack": field(r"\.private_segment_fixed_size:\s+(\d+)"),
            "local": field(r"\.vgpr_spill_count:\s+(\d+)")}


def _ldg_bytes(text):
    """Bytes per thread of one SASS global load (``LDG.E.128`` 16, ``.64`` 8, ``.U16`` 2, ...)."""
    op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    if not op.startswith("LDG"):
        return 0
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def main_loop(row, elem_bytes):
    """The streaming loop of a row kernel (the loop loading the most bytes) with its counts per
    element: ``per_elem`` (instructions per element per thread, on the fast path), ``warp_per_elem``
    (``per_elem / 32``: warp-instructions per element) and ``mufu_per_elem``; None without one."""
    loops = [lp for lp in row.get("loops", []) if lp["ldg_bytes"] > 0]
    if not loops:
        return None
    lp = max(loops, key=lambda x: (x["ldg_bytes"], x["static"]))
    elems = lp["ldg_bytes"] / elem_bytes  # elements per thread per iteration
    return dict(lp, elems=elems, per_elem=lp["fast"] / elems, warp_per_elem=lp["fast"] / elems / 32,
                mufu_per_elem=lp["mufu"] / elems)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def loop_counts(sass: str) -> list[dict]:
    """The loops of a SASS listing (``nvdisasm -c``): one per backward branch, innermost first.

    Each: ``static`` (instructions from the loop head to the back-edge branch, inclusive),
    ``fast`` (the shortest path around the loop: forward branches inside it may skip code,
    such as the statistics loop's rare rescale when the running max grows), ``mufu``
    (``MUFU`` on that path) and ``ldg``. Counting ignores ``NOP``.
    """
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m and not re.match(r"\s*NOP\b", m.group(2)):
            instrs.append(m.group(2).strip())
    loops = []
    for i, text in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?`?\((\.L_x_\d+)\)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            head = labels[m.group(1)]
            loops.append((head, i))
    out = []
    for head, tail in loops:
        # shortest path from head to tail over the loop's instructions (a DAG: forward edges only)
        n = tail - head + 1
        inf = float("inf")
        dist = [inf] * (n + 1)
        dist[0] = 0
        mufu = [0] * (n + 1)
        for k in range(n):
            if dist[k] == inf:
                continue
            text = instrs[head + k]
            cost = dist[k] + 1
            is_mufu = 1 if text.split()[0].startswith("MUFU") or " MUFU" in text else 0
            succ = []
            m = re.search(r"\bBRA\b.*?`?\((\.L_x_\d+)\)", text)
            if m and m.group(1) in labels:
                j = labels[m.group(1)] - head
                if 0 < j <= n and k < n - 1:
                    succ.append(j)
                unconditional = not text.startswith("@")
                if not unconditional and k + 1 <= n:
                    succ.append(k + 1)
                if k == n - 1:
                    succ.append(n)
            elif text.split()[0] in ("EXIT", "RET") and not text.startswith("@"):
                pass
            else:
                succ.append(k + 1)
            for j in succ:
                if cost < dist[j]:
                    dist[j] = cost
                    mufu[j] = mufu[k] + is_mufu
        body = instrs[head:tail + 1]
        out.append({"static": n, "fast": dist[n] if dist[n] != inf else n,
                    "mufu": mufu[n] if dist[n] != inf else sum("MUFU" in s for s in body),
                    "mufu_static": sum("MUFU" in s for s in body),
                    "ldg": sum(s.split()[0].startswith("LDG") or " LDG" in s for s in body),
                    "ldg_bytes": sum(_ldg_bytes(s) for s in body)})
    out.sort(key=lambda lp: lp["static"])
    return out


#: Launch arguments that only pick the weighting's formula (compiled into a row-level epilogue).
FORMULA_KEYS = ("FORMULA", "S0", "S1", "S2", "S3")


def distinct_kernels(variants):
    """One variant per kernel, logits dtype and switch set, the weighting's formula aside."""
    seen, out = set(), []
    for v in variants:
        key = json.dumps([v["name"], v["args"][0], {k: x for k, x in v["kwargs"].items() if k not in FORMULA_KEYS}],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def describe(variant):
    """A short label: logits dtype and the switches that are on (``FORMULA=name``)."""
    parts = [variant["args"][0][1]]
    for k, x in sorted(variant["kwargs"].items()):
        if x[0] == "bool" and x[1]:
            parts.append(k)
        elif x[0] == "jit":
            parts.append(f"{k}={x[2]}")
        elif x[0] == "str" and k.startswith("S"):
            parts.append(f"{k}={x[1]}")
        elif k in ("PRECISION",):
            parts.append(f"{k}={x[1]}")
    return " ".join(parts)


def _rocm_launch(variant, kw):
    """The recorded launch (the library's on CUDA) as the library makes it on ROCm: no
    ``maxnreg`` (a CUDA option), THR's warps from ``thr.GPU_LAUNCH_ROCM``."""
    kw.pop("maxnreg", None)
    if variant["name"] == "_thr_pair_kernel":
        kw["num_warps"] = importlib.import_module(variant["module"]).GPU_LAUNCH_ROCM["num_warps"]


def compile_one(variant, target_name):
    """Compile ``variant`` for ``target_name`` (the active driver must be set); a dict of metrics."""
    fn = _jit_function(variant["module"], variant["name"])
    args, kw = [_decode(a) for a in variant["args"]], {k: _decode(v) for k, v in variant["kwargs"].items()}
    if not target_name.startswith("sm_"):
        _rocm_launch(variant, kw)
    kernel = fn.run(*args, grid=(1,), warmup=True, **kw)
    md = kernel.metadata
    row = {"name": variant["name"], "target": target_name, "num_warps": md.num_warps,
           "shared": md.shared,
           "constexprs": {k: (x[2] if x[0] == "jit" else x[1] if len(x) > 1 else None) for k, x in variant["kwargs"].items() if x[0] != "float"}}
    if target_name.startswith("sm_"):
        res, sass = _resources_cuda(kernel.asm["cubin"], target_name)
        row.update(res)
        row["loops"] = loop_counts(sass)
    else:
        row.update(_resources_hip(kernel.asm["amdgcn"]))
        row["loops"] = []
    return row


def _worker(target_name, variants):
    """Subprocess body: compile every variant for one target; JSON lines on stdout."""
    from triton.runtime import driver

    target_name = target_name.split("#")[0]  # "sm_90#2": a share of sm_90's list
    index = list(TARGETS).index(target_name)
    driver.set_active(_target_driver(TARGETS[target_name], index))
    rows = []
    for i, variant in enumerate(variants):
        try:
            row = compile_one(variant, target_name)
        except Exception as e:  # reported, the caller fails on it
            row = {"name": variant["name"], "target": target_name, "error": f"{type(e).__name__}: {e}"[:2000]}
        row["variant"] = i
        rows.append(row)
    json.dump(rows, sys.stdout)


def compile_variants(variants, targets=tuple(TARGETS), jobs=2, python=None, timeout=3600):
    """Compile ``variants`` (a list, or a dict ``target -> list``) for each target in
    subprocesses (``jobs`` at a time; ``python``: the interpreter to use, e.g. another venv's
    for another Triton version). A key ``"sm_90#2"`` is a share of a target's work (its own
    list, its own process). Rows of metrics; ``row["variant"]`` indexes the key's list and
    ``row["key"]`` names it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    per_target = variants if isinstance(variants, dict) else {t: variants for t in targets}
    procs, rows, pending = [], [], list(targets)
    while pending or procs:
        while pending and len(procs) < jobs:
            tname = pending.pop(0)
            # run as a file: the installed ranktuner_kernels, not the checkout folder, is imported
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(per_target[tname], f)
            p = subprocess.Popen([python or sys.executable, os.path.abspath(__file__), "--worker", tname, f.name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append((tname, p, f.name))
        tname, p, path = procs.pop(0)
        out, err = p.communicate(timeout=timeout)
        os.unlink(path)
        if p.returncode != 0:
            rows.append({"name": "<worker>", "target": tname, "error": err[-3000:]})
            continue
        for row in json.loads(out):
            row["key"] = tname
            rows.append(row)
    return rows


def triton_version(python=None):
    return subprocess.run([python or sys.executable, "-c", "import triton; print(triton.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def record_in_subprocess(python=None):
    """:func:`record_variants` in a fresh interpreter with ``TRITON_INTERPRET=1``: ``(variants, launches)``."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([python or sys.executable, os.path.abspath(__file__), "--record"], capture_output=True,
                         text=True, env=env, check=True)
    data = json.loads(out.stdout)
    return data["variants"], data["launches"]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        with open(sys.argv[3]) as f:
            _worker(sys.argv[2], json.load(f))
    elif sys.argv[1:] == ["--record"]:
        variants, launches = record_variants()
        json.dump({"variants": variants, "launches": launches}, sys.stdout)
    else:
        sys.exit("usage: python -m bench.kernels_report (this file is its worker)")
