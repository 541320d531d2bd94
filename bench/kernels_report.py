"""What the kernels compile to on the GPUs people use, measured on a CPU machine.

    python -m bench.kernels_report                       # this Triton; to a scratch folder (printed)
    python -m bench.kernels_report --update              # into bench/results/kernels.{md,json}, merged
    python -m bench.kernels_report --python /path/to/other/venv/bin/python   # add another Triton
    python -m bench.kernels_report --all                 # every recorded variant, not one per formula

The launches come from the library's own call paths (``bench.gpu_compile``); each is compiled
for sm_80, sm_90, sm_100 and gfx942 with each Triton given. The table: per kernel variant and
target, registers, stack (spill) bytes, shared memory and, for the row kernels on NVIDIA
targets, the streaming loop's instructions per element (per thread and per warp) and MUFU
per element, counted in the SASS (method in the written file).

The report goes to a scratch folder unless ``--update`` (``bench/outputs.py``): then the
committed ``bench/results/kernels.json`` is merged, its rows of the Triton versions this run
compiled with replaced and its rows of any other Triton (e.g. 3.6, compiled with another
interpreter) kept, and ``kernels.md`` is re-written from the merged rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from . import gpu_compile, gpu_inventory, gpu_metrics, outputs

HERE = os.path.dirname(os.path.abspath(__file__))
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

METHOD = """\
## How the loop is counted

Each launch is compiled with `JITFunction.warmup` under a Triton driver that only reports the
target (`bench/gpu_compile.py`); no GPU is involved. Registers, stack and local bytes come
from `cuobjdump -res-usage` on the cubin (for gfx942: `.vgpr_count` and
`.private_segment_fixed_size` of the AMDGPU kernel descriptor); shared memory from the
compiled kernel's metadata. The loops are read off `nvdisasm -c` (the tools shipped in the
Triton wheel): every backward `BRA` closes a loop running from its target label to the
branch. The streaming loop is the loop with the most global-load bytes. Its instructions are
counted on the **fast path**: the shortest path from the loop head to the back-edge, so that
a forward branch skipping a rarely run block is not charged (in `_row_stats_kernel` the
lanes' rescale when the running max grows, which a row takes a handful of times; `static`
is the whole loop). `NOP`s are not counted. Elements per thread and iteration = the loop's
global-load bytes per thread / the logits' element size (ptxas unrolls the gradient loop 4×,
so one iteration is not one tile). *Per element* = fast-path instructions / elements per
thread; *warp-instr/elem* = that / 32 (a warp issues one instruction for 32 threads), the
figure to set against the issue rate: an H100 SXM issues at most ~132 SMs × 4 × 1.98 GHz ≈
1.05e12 warp-instructions/s, so a loop at *x* warp-instructions per element cannot stream
bf16 logits faster than 2.1e12 / *x* bytes/s at full issue efficiency (at 0.45: 4.6 TB/s).
"""


def _record(all_variants: bool, python=None):
    variants, launches = gpu_compile.record_in_subprocess(python)
    return variants, (variants if all_variants else gpu_metrics.distinct_kernels(variants)), launches


def _fmt(x, nd=3):
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def summarize(rows, variants):
    """Table rows (dicts) from compile rows."""
    out = []
    for r in rows:
        v = variants[r["variant"]] if "variant" in r else None
        dtype = v["args"][0][1] if v else ""
        item = {"kernel": r["name"], "variant": gpu_metrics.describe(v) if v else "", "target": r["target"],
                "triton": r.get("triton", ""), "error": r.get("error")}
        if not r.get("error"):
            item.update(registers=r["registers"], stack=r["stack"], shared=r["shared"], warps=r["num_warps"],
                        block_v=r["constexprs"].get("BLOCK_V"))
            lp = gpu_metrics.main_loop(r, ELEM_BYTES.get(dtype, 4)) if r["name"] in gpu_inventory.ROW_KERNELS else None
            if lp:
                item.update(loop_static=lp["static"], loop_fast=lp["fast"], per_elem=lp["per_elem"],
                            warp_per_elem=lp["warp_per_elem"], mufu_per_elem=lp["mufu_per_elem"])
        out.append(item)
    return out


def spills(table):
    """Rows breaking the rule: a compile error, or stack bytes in a row kernel (any target) or in
    THR on an NVIDIA target (``gpu_inventory.must_not_spill``)."""
    return [t for t in table if t["error"] or (t["stack"] and gpu_inventory.must_not_spill(t["kernel"], t["target"]))]


def other_stack(table):
    """Other rows with stack bytes (reported, not a failure: THR on gfx942)."""
    return [t for t in table if not t["error"] and t["stack"] and not gpu_inventory.must_not_spill(t["kernel"], t["target"])]


#: The same measures before the loop rewrite (commit b72bb2e, the code of the last GPU run, 529afee's
#: era), as issue 18 reported them: the figures the headline above replaces.
BEFORE = ("Before the loop rewrite (b72bb2e, counted the same way; bf16, sm_90, options off): statistics "
          "0.885 warp-instr/elem with Triton 3.6 (453 instructions / 16 elements) and 0.852 with 3.9 (436 / 16); "
          "gradient 0.703 (90 / 4); THR 376-904 stack bytes per thread with 3.6 and 24-312 with 3.9 "
          "(4 warps, 3 stages).")


def merge_meta(committed: dict, meta: dict, kept_rows: list) -> dict:
    """``meta`` of this run, with the Triton versions of the committed rows it keeps added to
    ``tritons`` and, under ``kept``, each one's run (date, commit)."""
    runs = {t: {"date": committed.get("date"), "commit": committed.get("commit")} for t in committed.get("tritons", [])}
    runs.update(committed.get("kept", {}))
    kept = list(dict.fromkeys(r["triton"] for r in kept_rows))
    return dict(meta, tritons=meta["tritons"] + [t for t in kept if t not in meta["tritons"]],
                kept={t: runs.get(t, {}) for t in kept})


def write_markdown(path, table, meta):
    kept = meta.get("kept", {})
    lines = ["# Kernels compiled for GPUs (no GPU involved)", "",
             f"Written by `python -m bench.kernels_report` on {meta['date']} at commit {meta['commit']}: "
             f"{meta['launches']} launches recorded from the library's call paths, {meta['recorded']} distinct, "
             f"{meta['compiled']} compiled per target ({meta['scope']}); Triton {', '.join(meta['tritons'])}; "
             f"targets {', '.join(meta.get('targets', gpu_inventory.TARGETS))}."
             + "".join(f" The Triton {t} rows are kept from the run of {run.get('date')} at commit {run.get('commit')} "
                       "(`--update` replaces only the rows of the Triton versions it compiles with)."
                       for t, run in kept.items()), ""]
    head = [t for t in table if t["kernel"] in ("_row_stats_kernel", "_row_grad_kernel") and t["target"] == "sm_90"
            and t["variant"].split()[0] == "bfloat16" and not t.get("error")]
    lines += ["## Headline: the streaming loops, bf16 logits, sm_90", "",
              "| kernel | variant | Triton | regs | stack | loop instr (fast / static) | per element | warp-instr/elem | MUFU/elem |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(head, key=lambda t: (t["kernel"], t["variant"], t["triton"])):
        if "per_elem" in t:
            lines.append(f"| {t['kernel']} | {t['variant']} | {t['triton']} | {t['registers']} | {t['stack']} | "
                         f"{t['loop_fast']} / {t['loop_static']} | {_fmt(t['per_elem'], 2)} | "
                         f"{_fmt(t['warp_per_elem'])} | {_fmt(t['mufu_per_elem'], 2)} |")
    lines += ["", BEFORE]
    bad = spills(table)
    lines += ["", f"**Spills / errors: {len(bad)}**" + ("" if not bad else " — " + "; ".join(
        f"{t['kernel']} {t['variant']} {t['target']} Triton {t['triton']}: "
        + (t['error'][:200] if t['error'] else f"{t['stack']} stack bytes") for t in bad)), ""]
    other = other_stack(table)
    lines += [f"Stack bytes elsewhere (reported, not a failure: THR on gfx942): {len(other)}" + ("" if not other else " — "
              + "; ".join(f"{t['kernel']} {t['variant']} {t['target']} Triton {t['triton']}: {t['stack']}"
                          for t in other)), ""]
    lines += [METHOD, "## Every compiled variant", "",
              "| kernel | variant | target | Triton | warps | BLOCK_V | regs | stack | shared | loop fast/static | per elem | warp-instr/elem | MUFU/elem |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(table, key=lambda t: (t["kernel"], t["variant"], t["target"], t["triton"])):
        if t["error"]:
            lines.append(f"| {t['kernel']} | {t['variant']} | {t['target']} | {t['triton']} | error: {t['error'][:120]} |")
            continue
        loop = f"{t['loop_fast']}/{t['loop_static']}" if "loop_fast" in t else ""
        lines.append(f"| {t['kernel']} | {t['variant']} | {t['target']} | {t['triton']} | {t['warps']} | "
                     f"{_fmt(t['block_v'])} | {t['registers']} | {t['stack']} | {t['shared']} | {loop} | "
                     f"{_fmt(t.get('per_elem'), 2)} | {_fmt(t.get('warp_per_elem'))} | {_fmt(t.get('mufu_per_elem'), 2)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", action="append", default=[],
                    help="another interpreter (another Triton) to compile with, besides this one")
    ap.add_argument("--all", action="store_true", help="every recorded variant (default: one per formula set)")
    ap.add_argument("--targets", default=",".join(gpu_inventory.TARGETS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--record-with", default=None,
                    help="the interpreter that records the launches (default: this one; the launches do not "
                         "depend on the Triton version)")
    outputs.add_arguments(ap, "the Markdown file to write, the JSON beside it")
    args = ap.parse_args(argv)
    out = outputs.destination(ap, args, "kernels.md")
    why = gpu_compile.backends_available()
    if why:
        print(f"skipped: {why}")
        return 0
    t0 = time.time()
    recorded, variants, launches = _record(args.all, args.record_with)
    print(f"recorded {launches} launches, {len(recorded)} distinct; compiling {len(variants)} per target", flush=True)
    table, tritons = [], []
    for py in [sys.executable] + args.python:
        version = gpu_compile.triton_version(py)
        tritons.append(version)
        rows = gpu_compile.compile_variants(variants, targets=tuple(args.targets.split(",")), jobs=args.jobs, python=py)
        for r in rows:
            r["triton"] = version
        table += summarize(rows, variants)
        print(f"Triton {version}: {len(rows)} compiles, {time.time() - t0:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(HERE)).stdout.strip()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit, launches=launches,
                recorded=len(recorded), compiled=len(variants), tritons=tritons, targets=args.targets.split(","),
                scope="every variant" if args.all else "one per kernel, dtype and switch set; formulas aside")
    bad = spills(table)
    json_path = os.path.splitext(out)[0] + ".json"
    committed = outputs.read_json(json_path) if args.update else None
    if committed:
        merged = outputs.merge_rows(committed["rows"], table, lambda r: r["triton"])
        meta = merge_meta(committed["meta"], meta, merged[: len(merged) - len(table)])
        table = merged
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_markdown(out, table, meta)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": table}, f, indent=1)
    kept = f" (kept the committed rows of Triton {', '.join(meta['kept'])})" if meta.get("kept") else ""
    print(f"wrote {out} and {json_path}{kept}; {len(bad)} spills/errors in this run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
