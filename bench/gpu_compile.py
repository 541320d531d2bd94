"""Compile every kernel variant the library launches for GPU targets, on a machine without a GPU:
the compile driver. What is recorded and for which targets is the inventory
(``bench/gpu_inventory.py``); what is measured from a compiled kernel, the report's metrics
(``bench/gpu_metrics.py``); the report itself is ``python -m bench.kernels_report``.

Two steps, two processes:

1. :func:`record_launches` (in a process with ``TRITON_INTERPRET=1``, as the tests run): the
   library's public functions run on small CPU tensors (``gpu_inventory.exercise``: every
   weighting of the registry, both option sets, three dtypes, both paths, in-place backward,
   ``token_stats``, ``logprobs``, ``linear_logprobs``, THR) while every Triton launch is
   recorded (kernel, argument dtypes/values, constexprs, ``num_warps``) and still run by the
   interpreter, so the call paths see real values. A new kernel or switch reached from the
   public functions is covered without a list.
2. :func:`compile_variants` (a subprocess without the interpreter, one per target): Triton's
   active driver is replaced by one that only reports a ``GPUTarget`` and each recorded launch
   becomes ``JITFunction.warmup`` (a compile, no launch). From the compiled kernel: registers,
   stack (spill) bytes and shared memory (``cuobjdump -res-usage`` on the cubin; the AMDGPU
   kernel descriptor for gfx942), and the SASS of the hot loop (``gpu_metrics.loop_counts``).

Launch shapes: the vocabulary is 2112 wide (one full 2048 tile, the GPU default, and a
ragged tail), so the row kernels compile at their production block sizes; THR is recorded
with its GPU launch (``thr.GPU_LAUNCH``: blocks, warps, stages, ``maxnreg``), both precisions,
at ``V_RECORD`` and at ``V_RAGGED`` (not a multiple of 16); for gfx942 a
launch is compiled as the library makes it on ROCm (:func:`_rocm_launch`).

The subprocesses run this file by its path (``python .../bench/gpu_compile.py --worker`` /
``--record``), so that the installed ``ranktuner_kernels`` is imported, not the checkout
folder; its two sibling modules are then imported from its own folder.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile

if __package__:  # bench.gpu_compile: python -m, the report, the tests
    from . import gpu_inventory, gpu_metrics
else:  # run by its path (the subprocesses): its folder is sys.path[0]
    import gpu_inventory
    import gpu_metrics


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


def record_variants() -> list[dict]:
    """Distinct launches of ``gpu_inventory.exercise`` (needs ``TRITON_INTERPRET=1`` set before Triton's import)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("record_variants: set TRITON_INTERPRET=1 before importing Triton")
    launches: list = []
    with record_launches(launches):
        gpu_inventory.exercise()
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
        res, sass = gpu_metrics.resources_cuda(kernel.asm["cubin"])
        row.update(res)
        row["loops"] = gpu_metrics.loop_counts(sass)
    else:
        row.update(gpu_metrics.resources_hip(kernel.asm["amdgcn"]))
        row["loops"] = []
    return row


def _worker(target_name, variants):
    """Subprocess body: compile every variant for one target; JSON lines on stdout."""
    from triton.runtime import driver

    target_name = target_name.split("#")[0]  # "sm_90#2": a share of sm_90's list
    index = list(gpu_inventory.TARGETS).index(target_name)
    driver.set_active(_target_driver(gpu_inventory.TARGETS[target_name], index))
    rows = []
    for i, variant in enumerate(variants):
        try:
            row = compile_one(variant, target_name)
        except Exception as e:  # reported, the caller fails on it
            row = {"name": variant["name"], "target": target_name, "error": f"{type(e).__name__}: {e}"[:2000]}
        row["variant"] = i
        rows.append(row)
    json.dump(rows, sys.stdout)


def compile_variants(variants, targets=tuple(gpu_inventory.TARGETS), jobs=2, python=None, timeout=3600):
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
