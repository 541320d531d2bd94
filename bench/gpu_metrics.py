"""What a compiled kernel is measured by, and how the report names and groups the recorded
variants (the report of ``bench.gpu_compile``, written by ``bench.kernels_report``).

* From the compiled kernel: registers, stack (spill) and local bytes (``cuobjdump -res-usage``
  on the cubin; for gfx942 the AMDGPU kernel descriptor), and the loops of its SASS
  (``nvdisasm -c``, :func:`loop_counts`) with the streaming loop's counts per element
  (:func:`main_loop`). The CUDA tools are the ones shipped in the Triton wheel.
* The variants: :func:`describe` (a short label), :func:`distinct_kernels` (one per kernel,
  dtype and switch set, the weighting's formula aside).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources_cuda(cubin: bytes):
    """``({"registers", "stack", "local"}, SASS listing)`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {"registers": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
            "local": int(fields.get("LOCAL", -1))}, sass


def resources_hip(asm: str):
    """``{"registers", "stack", "local"}`` (VGPRs, private segment, VGPR spills) of AMDGPU assembly."""
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
