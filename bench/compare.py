"""GPU comparison: our kernels against eager torch, torch.compile, Liger-Kernel, Cut
Cross-Entropy and F.linear_cross_entropy, measured in one run.

    python -m bench.compare --suite headline   # Qwen2.5-7B and Llama-3-8B heads, N = 8192
    python -m bench.compare --suite sweep      # time and memory vs N and vs V, with plots
    python -m bench.compare --suite frontier   # memory-time frontier of the fused linear path:
                                               # chunk sizes x acc_policy x weighting, peers on the
                                               # same axes, and each one's bf16 dW/dh error

Writes ``<suite>.json`` (device, driver, versions, ceilings, every median) and ``<suite>.md``
to a scratch folder (printed; ``bench/outputs.py``), or with ``--update`` into the committed
``bench/results/``, merged: the committed rows of this run's toolchain (device, torch, Triton)
are replaced, those of other toolchains kept, and the Markdown has a section per toolchain.
The sweep also writes PNG plots (of this run). Each result carries its fraction of the
hardware floor: FLOPs at the measured matmul rate for the fused-linear path, bytes at the
measured copy bandwidth for the logits path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

from bench import common, outputs

HEADS = {"qwen2.5-7b": (3584, 152064), "llama-3-8b": (4096, 128256)}


def all_weightings():
    """Every weighting of the registry (``rk.weightings.WEIGHTINGS``), in its order."""
    import ranktuner_kernels as rk

    return tuple(rk.weightings.WEIGHTINGS)


def row_local_weightings():
    """The registry's row-local weightings (their formula runs inside the statistics kernel)."""
    import ranktuner_kernels as rk

    return tuple(name for name, cls in rk.weightings.WEIGHTINGS.items() if cls().row_local)


def linear_floor_ms(n, d, v, ceil):
    """6 N D V FLOPs (logits, dh, dW) at the measured bf16 matmul rate."""
    return 6 * n * d * v / ceil["matmul_flops_per_s"] * 1e3


def logits_floor_ms(n, v, itemsize, ceil):
    """Read the logits twice and write the gradient once at the measured copy bandwidth."""
    return 3 * n * v * itemsize / ceil["copy_bytes_per_s"] * 1e3


def run_one(factory, inputs, params, reps, warmup):
    try:
        fn = factory(*inputs)
        return common.measure(fn, params, reps=reps, warmup=warmup)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except ModuleNotFoundError as e:
        return {"error": f"not installed: {e}"}
    except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def bench_linear(n, d, v, impls, ceil, reps, warmup, log):
    h, w, y = common.make_linear_inputs(n, d, v)
    h.requires_grad_(), w.requires_grad_()
    mean_p = float(rk_token_p(h, w, y))
    floor = linear_floor_ms(n, d, v, ceil)
    rows = []
    for name, factory in impls.items():
        r = run_one(factory, (h, w, y), [h, w], reps, warmup)
        r.update(kind="linear", impl=name, N=n, D=d, V=v, mean_p_t=mean_p, floor_ms=floor)
        if "fwd_bwd_ms" in r:
            r["x_floor"] = r["fwd_bwd_ms"] / floor
        log(r)
        rows.append(r)
    del h, w, y
    return rows


def rk_token_p(h, w, y):
    import ranktuner_kernels as rk

    with torch.no_grad():
        _, st = rk.linear_cross_entropy(h, w, y, weighting="sft", return_stats=True)
    return st["p_t"].mean()


def bench_logits(n, v, impls, ceil, reps, warmup, log):
    z, y = common.make_logits(n, v)
    z.requires_grad_()
    floor = logits_floor_ms(n, v, z.element_size(), ceil)
    with torch.no_grad():
        mean_p = float(torch.softmax(z[:1024].float(), -1).gather(1, y[:1024, None]).mean())
    rows = []
    for name, factory in impls.items():
        zz = z.detach().clone().requires_grad_() if "in place" in name or "inplace" in name else z
        r = run_one(factory, (zz, y), [zz], reps, warmup)
        r.update(kind="logits", impl=name, N=n, V=v, mean_p_t=mean_p, floor_ms=floor)
        if "fwd_bwd_ms" in r:
            r["x_floor"] = r["fwd_bwd_ms"] / floor
        log(r)
        rows.append(r)
        del zz
    del z, y
    return rows


def fmt_row(r):
    if "error" in r:
        return f"| {r['impl']} | {r['error']} | | | | |"
    gib = r["peak_extra_bytes"] / 2**30
    return (f"| {r['impl']} | {r['fwd_bwd_ms']:.1f} | {r['fwd_nograd_ms']:.1f} | {r['bwd_ms']:.1f} | "
            f"{gib:.2f} | {r['x_floor']:.2f} |")


def markdown(results):
    """The report: one section per toolchain of the rows (a merged report has several), each
    headed by its environment and ceilings."""
    envs = results.get("toolchains", {})
    now = outputs.toolchain(results["environment"])  # this run's, first
    labels = sorted(dict.fromkeys(r.get("toolchain", now) for r in results["rows"]), key=lambda label: label != now)
    if labels in ([], [now]):
        return _markdown_one(results["environment"], results["ceilings"], results["rows"])
    return "\n".join(f"### {label}\n\n" + _markdown_one(envs[label]["environment"], envs[label]["ceilings"],
                                                        [r for r in results["rows"] if r.get("toolchain") == label])
                     for label in labels)


def merge_results(committed, results):
    """``results`` with the committed rows of other toolchains kept (``outputs.merge_rows``), and
    ``toolchains``: each toolchain's environment and ceilings."""
    old_label = outputs.toolchain(committed["environment"])
    old_rows = [dict(r, toolchain=r.get("toolchain", old_label)) for r in committed["rows"]]
    envs = committed.get("toolchains") or {old_label: {"environment": committed["environment"],
                                                       "ceilings": committed["ceilings"]}}
    rows = outputs.merge_rows(old_rows, results["rows"], lambda r: r["toolchain"])
    labels = dict.fromkeys(r["toolchain"] for r in rows)
    envs = {**envs, **results["toolchains"]}
    return dict(results, rows=rows, toolchains={k: envs[k] for k in labels})


def save(results, out_dir, update):
    """Write ``<suite>.json`` and ``<suite>.md`` (merged into the committed ones with ``update``)
    and the suite's plots of this run to ``out_dir``; returns the merged results."""
    label = outputs.toolchain(results["environment"])
    results = dict(results, rows=[dict(r, toolchain=label) for r in results["rows"]],
                   toolchains={label: {"environment": results["environment"], "ceilings": results["ceilings"]}})
    path = os.path.join(out_dir, f"{results['suite']}.json")
    committed = outputs.read_json(path) if update else None
    written = merge_results(committed, results) if committed else results
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(written, f, indent=1)
    with open(os.path.join(out_dir, f"{results['suite']}.md"), "w") as f:
        f.write(markdown(written) + "\n")
    if results["suite"] == "sweep":
        plots(results, out_dir)
    if results["suite"] == "frontier":
        frontier_plot(results, out_dir)
    print(f"wrote {path} and {results['suite']}.md beside it"
          + (f" ({len(written['toolchains']) - 1} other toolchain(s) kept)" if len(written["toolchains"]) > 1 else ""))
    return written


def _markdown_one(env, ceil, all_rows):
    lines = [
        f"Device: {env['device']} (driver {env.get('driver')}), torch {env['torch']}, Triton {env['triton']}, "
        f"CUDA {env['cuda']}; Liger-Kernel {env.get('liger_kernel')}, Cut Cross-Entropy {env.get('cut_cross_entropy')}.",
        f"Measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write), "
        f"bf16 matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (8192^3).",
        "",
    ]
    groups = {}
    errors = [r for r in all_rows if r["kind"] == "grad_error"]
    for r in all_rows:
        if r["kind"] == "grad_error":
            continue
        key = (r["kind"], r["N"], r.get("D"), r["V"])
        groups.setdefault(key, []).append(r)
    for (kind, n, d, v), rows in groups.items():
        shape = f"N={n}, D={d}, V={v}" if kind == "linear" else f"N={n}, V={v}"
        floor = rows[0]["floor_ms"]
        what = "6NDV at the matmul rate" if kind == "linear" else "2 reads + 1 write of the logits at copy bandwidth"
        lines += [
            f"**{kind}**, {shape}, bf16, mean p_t {rows[0]['mean_p_t']:.2f}; floor {floor:.1f} ms ({what})",
            "",
            "| implementation | fwd+bwd ms | fwd (no grad) ms | bwd ms | peak extra GiB | x floor |",
            "|---|---|---|---|---|---|",
            *[fmt_row(r) for r in rows],
            "",
        ]
    if errors:
        lines += ["**bf16 gradient error** against float64 (relative Frobenius norm)", "",
                  "| implementation | upstream | dh | dW |", "|---|---|---|---|",
                  *[f"| {r['impl']} | {r['upstream']} | {r['dh_rel_err']:.2e} | {r['dW_rel_err']:.2e} |" for r in errors],
                  ""]
    return "\n".join(lines)


def plots(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "fwd_bwd_ms" in r]
    for kind in ("linear", "logits"):
        for axis, fixed in (("N", "V"), ("V", "N")):
            sel = [r for r in rows if r["kind"] == kind and r.get("sweep") == axis]
            if not sel:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
            for impl in dict.fromkeys(r["impl"] for r in sel):
                pts = sorted((r[axis], r["fwd_bwd_ms"], r["peak_extra_bytes"] / 2**30) for r in sel if r["impl"] == impl)
                xs = [p[0] for p in pts]
                ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
                ax_m.plot(xs, [p[2] for p in pts], marker="o", label=impl)
            floor = sorted((r[axis], r["floor_ms"]) for r in sel if r["impl"] == sel[0]["impl"])
            ax_t.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="floor")
            for ax, label in ((ax_t, "forward+backward ms"), (ax_m, "peak memory above inputs, GiB")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
            fixed_val = sel[0][fixed]
            fig.suptitle(f"{kind} path vs {axis} ({fixed}={fixed_val}, bf16, {results['environment']['device']})")
            ax_t.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"sweep_{kind}_vs_{axis}.png"), dpi=110)
            plt.close(fig)


FRONTIER_CHUNKS = (128, 256, 512, 1024, 2048, 4096)


def frontier_impls(weightings):
    """Our fused linear path at every (weighting, acc_policy, chunk_size), and the peers."""
    import ranktuner_kernels as rk

    impls = {}
    for name in weightings:
        for policy in ("compact", "accurate"):
            for rows in FRONTIER_CHUNKS:
                impls[f"rk[{name}] {policy} C={rows}"] = lambda h, w, y, name=name, policy=policy, rows=rows: (
                    lambda: rk.linear_cross_entropy(h, w, y, weighting=name, acc_policy=policy, chunk_size=rows))
    peers = ("liger", "cut cross", "eager h@w.t + f.cross_entropy", "torch.compile(h@w.t + f.cross_entropy)")
    impls.update({k: f for k, f in common.linear_impls(("sft",)).items() if k.lower().startswith(peers)})
    return impls


def grad_errors(n, d, v, log):
    """Relative error of dW and dh in bf16 against a float64 reference, for each policy, Liger's
    fused linear CE and torch (eager and compiled ``h @ W.T`` + CE), at an upstream gradient of 1
    and of 0.37 (not a power of two: no implementation may round once more there)."""
    import ranktuner_kernels as rk

    h, w, y = common.make_linear_inputs(n, d, v)
    rows = []
    for upstream in (1.0, 0.37):
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        (torch.nn.functional.cross_entropy(h64 @ w64.T, y) * upstream).backward()
        ref = (h64.grad, w64.grad)
        del h64, w64
        cands = {f"rk {p}": (lambda hh, ww, p=p: rk.linear_cross_entropy(hh, ww, y, acc_policy=p))
                 for p in ("compact", "accurate")}
        cands["eager h@W.T + CE (bf16)"] = lambda hh, ww: torch.nn.functional.cross_entropy(hh @ ww.T, y)
        cands["compiled h@W.T + CE"] = common.compiled(lambda hh, ww: torch.nn.functional.cross_entropy(hh @ ww.T, y))
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            cands["liger FLCE"] = lambda hh, ww: liger(ww, hh, y)
        except ImportError:
            pass
        for name, fn in cands.items():
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            try:
                (fn(hh, ww) * upstream).backward()
            except Exception as e:  # noqa: BLE001
                log({"impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            err = [float((g.double() - r).norm() / r.norm()) for g, r in zip((hh.grad, ww.grad), ref)]
            row = {"kind": "grad_error", "impl": name, "upstream": upstream, "dh_rel_err": err[0], "dW_rel_err": err[1],
                   "N": n, "D": d, "V": v}
            log(row)
            rows.append(row)
            del hh, ww
            torch.cuda.empty_cache()
    return rows


def frontier_plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("kind") == "linear" and "fwd_bwd_ms" in r]
    fig, ax = plt.subplots(figsize=(9, 6))
    series = {}
    for r in rows:
        key = r["impl"].split(" C=")[0]
        series.setdefault(key, []).append((r["fwd_bwd_ms"], r["peak_extra_bytes"] / 2**30, r["impl"]))
    for key, pts in series.items():
        pts.sort()
        marker = "o" if key.startswith("rk[") else "s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key, linestyle="-" if len(pts) > 1 else "")
    ax.axvline(rows[0]["floor_ms"], color="k", linestyle="--", label="6NDV floor")
    ax.set_xlabel("forward + backward, ms")
    ax.set_ylabel("peak memory above the inputs, GiB")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    r0 = rows[0]
    ax.set_title(f"fused linear memory-time frontier, N={r0['N']}, D={r0['D']}, V={r0['V']}, bf16, "
                 f"{results['environment']['device']}", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("headline", "sweep", "frontier"), default="headline")
    ap.add_argument("--all-weightings", action="store_true", help="every weighting, not only sft and ranktuner")
    ap.add_argument("--heads", default="qwen2.5-7b,llama-3-8b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-logits", action="store_true")
    outputs.add_arguments(ap)
    args = ap.parse_args(argv)
    out_dir = outputs.destination(ap, args)
    if not torch.cuda.is_available():
        sys.exit("bench.compare needs a CUDA GPU; on CPU run `pytest bench/ --benchmark-only`")
    ceil = common.ceilings()
    results = {"suite": args.suite, "environment": common.environment(), "ceilings": ceil, "rows": []}

    def log(r):
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "fwd_bwd_all_ms"}
        print(json.dumps(shown), flush=True)

    weightings = all_weightings() if args.all_weightings else ("sft", "ranktuner")
    if args.suite == "headline":
        for head in args.heads.split(","):
            d, v = HEADS[head]
            results["rows"] += bench_linear(args.tokens, d, v, common.linear_impls(weightings), ceil, args.reps, args.warmup, log)
            if not args.no_logits:
                results["rows"] += bench_logits(args.tokens, v, common.logits_impls(weightings), ceil, args.reps, args.warmup, log)
    elif args.suite == "frontier":
        d, v = HEADS["qwen2.5-7b"]
        names = row_local_weightings() if args.all_weightings else ("sft", "ranktuner")
        results["rows"] += bench_linear(args.tokens, d, v, frontier_impls(names), ceil, args.reps, args.warmup, log)
        results["rows"] += grad_errors(2048, d, v, log)
    else:
        d, v0 = HEADS["llama-3-8b"]
        # torch.compile peers are left out of the sweep: they recompile at every shape (minutes
        # each); the headline suite measures them
        keep = ("rk.", "eager h@W.T + F.cross_entropy", "liger", "cut cross", "F.linear", "eager naive", "F.cross_entropy (fp32")
        lin = {k: f for k, f in common.linear_impls(weightings).items() if k.startswith(keep)}
        lg = {k: f for k, f in common.logits_impls(weightings).items() if k.startswith(keep)}
        for n in (1024, 2048, 4096, 8192, 16384, 32768):
            for r in bench_linear(n, d, v0, lin, ceil, args.reps, args.warmup, log):
                results["rows"].append({**r, "sweep": "N"})
            for r in bench_logits(n, v0, lg, ceil, args.reps, args.warmup, log):
                results["rows"].append({**r, "sweep": "N"})
        for v in (32768, 65536, 131072, 262144):
            for r in bench_linear(8192, d, v, lin, ceil, args.reps, args.warmup, log):
                results["rows"].append({**r, "sweep": "V"})
            for r in bench_logits(8192, v, lg, ceil, args.reps, args.warmup, log):
                results["rows"].append({**r, "sweep": "V"})
    print(markdown(save(results, out_dir, args.update)))


if __name__ == "__main__":
    main()
