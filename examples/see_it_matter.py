"""See it matter: does the objective change what a fine-tuned model learns from noisy data, and
does the answer depend on how much the model knew of the task before fine-tuning?

    python examples/see_it_matter.py --continuum --jobs 2  # 3 prior strengths x 5 objectives x 3 seeds (docs/choosing.md)
    python examples/see_it_matter.py --quick      # the continuum shortened, in float64 (tests/test_see_it_matter.py)
    python examples/see_it_matter.py              # the single setting of docs/see_it_work.md: 4 objectives x 3 seeds
    python examples/see_it_matter.py --help

The setting (``examples/noisy_setting.py``, fixed before any objective but ``sft`` was run:
``docs/see_it_work.md``, "See it matter"): the task and model of ``examples/finetune.py
--quick``, 30 % of the training responses corrupted with an irrelevant sentence right after the
first step, 150 fine-tuning steps, each objective from the same pre-trained model with the same
batches; held-out exact match, the noisy-generation rates and the clean held-out NLL.

* The **single setting** pre-trains one model per seed (``pre-trained only`` row) and compares
  ``sft``, ``ranktuner``, ``dft`` and ``talr``.
* The **continuum** (``--continuum``, ``examples/continuum.py``; the protocol, fixed before the
  run: ``docs/choosing.md``) pre-trains three models per seed that know the task to different
  degrees, measured by ``rk.analysis.prior_strength`` (arXiv 2510.00526's proxy), and compares
  ``sft``, ``ranktuner``, ``RankTuner(w0='one')``, ``dft`` and ``threshold`` at each.
* ``--quick`` is the continuum shortened (one seed, small data and budgets) and in float64, so
  that it gives the same figures on any CPU (float32 figures move with the CPU's rounding).

Output: a scratch folder under the system's temporary directory, unless ``--update`` (the
committed folder: ``examples/results/see_it_matter``, ``..._continuum`` or ``..._quick``) or
``--out DIR``: ``see_it_matter.json`` (every run, the mean and sample standard deviation, the
commit, the command, the CPU time and the machine's load) and ``see_it_matter.png``. Each process
uses one torch thread (``--threads``); ``--jobs N`` runs the seeds in N processes at a time and
merges them (also by hand: ``--seeds k`` per process, then ``--merge DIR ...``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import continuum as cont  # noqa: E402
import finetune as ft  # noqa: E402
# the building blocks, also for finetune_hf.py and the tests
from noisy_setting import (MatterConfig, corrupt_after_first_step, dataclass_replace, evaluate,  # noqa: E402,F401
                           finetune_each, make_data, new_model, plot_summary, pretrain, provenance, summarize,
                           summary_table, weighting_of)
from tiny_lm import CharTokenizer  # noqa: E402

#: ``--quick``: the continuum shortened (one seed, 300/40 problems, batches of 16, 80 pre-training
#: and 20 fine-tuning steps, the strong model to 0.4 in at most 6 rounds of 20 steps), in float64
QUICK = dict(n_train=300, n_test=40, batch_size=16, pretrain_batch=16, pretrain_steps=80, steps=20, seeds=(0,),
             strong_target=0.4, strong_round=20, strong_rounds=6, dtype="float64")
SCRATCH = os.path.join(tempfile.gettempdir(), "ranktuner_examples")
#: the folder name of each mode, under SCRATCH or (``--update``) examples/results
FOLDERS = {"single": "see_it_matter", "continuum": "see_it_matter_continuum", "quick": "see_it_matter_quick"}
QUICK_OUT = os.path.join(SCRATCH, FOLDERS["quick"])


def run_seed(cfg: MatterConfig, seed: int, hush: bool, say) -> list:
    """The single setting, one seed: pre-train, then fine-tune with every objective; one row per
    objective, ``pre-trained only`` first."""
    cfg = dataclass_replace(cfg, seed=seed)
    tok = CharTokenizer()
    data = make_data(cfg)
    model = new_model(cfg, tok, seed)
    t0 = time.time()
    pretrain(model, cfg, tok, random.Random(seed + 1), {p for p, _, _ in data["test"]}, cfg.pretrain_steps,
             cfg.pretrain_lr, f"seed {seed} pre-train", hush)
    rows = [{"seed": seed, "weighting": "pre-trained only", **evaluate(model, tok, data["test"], cfg, seed + 3),
             "seconds": time.time() - t0}]
    say(f"seed {seed}: pre-trained in {rows[0]['seconds']:.0f} s; {sum(c for *_, c in data['finetune'])} of "
        f"{len(data['finetune'])} training responses corrupted, e.g. {next(r for _, r, c in data['finetune'] if c)!r}")
    return rows + finetune_each(model, cfg, tok, data, seed, hush, say)


def assemble(config: dict, rows: list, prov: dict, timing: dict, out_dir: str, save: bool, say) -> dict:
    """The result of a run or a merge (what ``see_it_matter.json`` holds), printed; the JSON and
    the PNG written when ``save``."""
    names = list(config["weightings"])
    seeds = sorted({r["seed"] for r in rows})
    result = {"mode": config.get("mode", "single"), "config": config, "provenance": prov, "rows": rows, **timing,
              "files": {}}
    if result["mode"] == "single":
        summary = summarize(rows, ["pre-trained only", *names])
        result["summary"] = {n: {k: {"mean": m, "std": sd, "n": c} for k, (m, sd, c) in s.items()}
                             for n, s in summary.items()}
        text = summary_table(summary)
    else:
        summary = cont.summarize(rows, names)
        result["summary"] = {s: {n: ({"mean": d[0], "std": d[1], "n": d[2]} if n == "prior" else
                                     {k: {"mean": m, "std": sd, "n": c} for k, (m, sd, c) in d.items()})
                                 for n, d in summ.items()}
                             for s, summ in summary.items()}
        result["tables"] = {k: cont.table(summary, k) for k in ("accuracy", "noisy_sampled", "clean_nll")}
        result["verdicts"] = {k: cont.verdicts(rows, summary, names, k) for k in ("accuracy", "clean_nll")}
        text = "\n\n".join(f"{k}:\n{t}" for k, t in result["tables"].items())
        text += "\n\n" + "\n".join(line for k, v in result["verdicts"].items() for line in cont.verdict_lines(v, k))
    say(f"\n{len(seeds)} seed(s), held-out {config['n_test']} problems; mean ± std over the seeds\n\n{text}")
    loads = [(p.get("loadavg_start"), p.get("loadavg_end")) for p in timing.get("parts", [timing])]
    say(f"\nwall {timing['wall_seconds']:.0f} s, CPU {timing['cpu_seconds']:.0f} s; load average at the start and "
        "the end: " + ", ".join(f"{a and round(a[0], 1)} / {b and round(b[0], 1)}" for a, b in loads))
    if save:
        os.makedirs(out_dir, exist_ok=True)
        title = (f"Tiny LM, {config['n_ops']}-step arithmetic, {config['noise_frac']:.0%} of responses with a sentence "
                 f"after step 1, {config['steps']} steps; mean ± std over {len(seeds)} seed(s)")
        png = os.path.join(out_dir, "see_it_matter.png")
        png = (plot_summary(rows, ["pre-trained only", *names], png, title) if result["mode"] == "single"
               else cont.plot(summary, names, png, title))
        if png:
            result["files"]["png"] = png
        result["files"]["json"] = os.path.join(out_dir, "see_it_matter.json")
        with open(result["files"]["json"], "w") as f:
            json.dump(result, f, indent=1)
        say("files: " + ", ".join(result["files"].values()))
    return result


def run(cfg: MatterConfig, quiet: bool = False, progress: bool | None = None, argv: list | None = None) -> dict:
    """Every seed (and, for a ``ContinuumConfig``, every strength) and objective; returns what
    ``see_it_matter.json`` holds. Writes files when ``cfg.save``."""
    cfg = copy.deepcopy(cfg)
    cfg.device = ft.resolve_device(cfg.device)
    continuum = isinstance(cfg, cont.ContinuumConfig)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    hush = quiet if progress is None else not progress
    prov = provenance(argv)  # before the run: the code that runs is the code at this commit
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall0, cpu0 = time.time(), time.process_time()
    say(f"device {cfg.device}, {torch.get_num_threads()} threads, {cfg.dtype}; objectives {', '.join(cfg.weightings)}; "
        f"seeds {', '.join(map(str, cfg.seeds))}; {cfg.noise_frac:.0%} of the training responses corrupted after "
        f"their first step; {cfg.steps} fine-tuning steps" + ("; strengths " + ", ".join(cont.STRENGTHS)
                                                              if continuum else ""))
    rows = []
    for seed in cfg.seeds:
        rows += (cont.run_seed if continuum else run_seed)(cfg, seed, hush, say)
    config = {"mode": "continuum" if continuum else "single",
              **{k: (str(v) if k == "device" else v) for k, v in asdict(cfg).items()}}
    timing = {"wall_seconds": time.time() - wall0, "cpu_seconds": time.process_time() - cpu0, "loadavg_start": load0,
              "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return assemble(config, rows, prov, timing, cfg.out_dir, cfg.save, say)


def _without(argv: list, valued: set, flags: set) -> list:
    """``argv`` without the options in ``valued`` (with their value) and the ``flags``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in valued:
            skip = True
        elif a.split("=", 1)[0] not in valued | flags:
            out.append(a)
    return out


def run_in_processes(cfg: MatterConfig, argv: list, jobs: int) -> dict:
    """Each seed in a process of its own (``--seeds k``, output in ``out_dir/seed<k>``, console in
    its ``output.txt``), at most ``jobs`` at a time, then :func:`merge` into ``out_dir``."""
    import subprocess

    child = _without(argv, {"--seeds", "--out", "--jobs"}, {"--update", "--merge"})
    wall0, procs, parts = time.time(), [], []
    for seed in cfg.seeds:
        folder = os.path.join(cfg.out_dir, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        while sum(p.poll() is None for p in procs) >= jobs:
            time.sleep(1)
        with open(os.path.join(folder, "output.txt"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *child, "--seeds", str(seed),
                                           "--out", folder, "--quiet"], stdout=log, stderr=subprocess.STDOUT))
        parts.append(folder)
        print(f"seed {seed}: process {procs[-1].pid}, console in {folder}/output.txt", flush=True)
    for seed, p in zip(cfg.seeds, procs):
        if p.wait() != 0:
            raise RuntimeError(f"the process of seed {seed} failed (exit {p.returncode}): see its output.txt")
    return merge(parts, cfg.out_dir, argv, wall_seconds=time.time() - wall0)


def merge(parts: list, out_dir: str, argv: list | None = None, wall_seconds: float | None = None) -> dict:
    """One result from the ``see_it_matter.json`` of runs made separately (e.g. one seed per
    process): the rows concatenated, the summary and the plot re-made; each part's provenance,
    CPU and wall time kept; ``cpu_seconds`` is their sum, ``wall_seconds`` their maximum (or the
    caller's measure)."""
    loaded = []
    for part in parts:
        path = part if part.endswith(".json") else os.path.join(part, "see_it_matter.json")
        with open(path) as f:
            loaded.append(json.load(f))
    cfgs = [{k: v for k, v in r["config"].items() if k not in ("seeds", "seed", "out_dir")} for r in loaded]
    if any(c != cfgs[0] for c in cfgs):
        raise ValueError("parts: the runs differ in more than their seeds and output folders")
    rows = [row for r in loaded for row in r["rows"]]
    config = dict(loaded[0]["config"], seeds=sorted({r["seed"] for r in rows}), out_dir=out_dir)
    timing = {"wall_seconds": wall_seconds or max(r["wall_seconds"] for r in loaded),
              "cpu_seconds": sum(r["cpu_seconds"] for r in loaded),
              "parts": [{k: r.get(k) for k in ("wall_seconds", "cpu_seconds", "loadavg_start", "loadavg_end")}
                        for r in loaded]}
    prov = {**provenance(argv), "parts": [r["provenance"] for r in loaded]}
    return assemble(config, rows, prov, timing, out_dir, True, print)


def parse_args(argv=None) -> tuple:
    """``(config, argparse.Namespace)`` of the command line: a ``MatterConfig`` (single setting)
    or a ``ContinuumConfig`` (``--continuum``, ``--quick``); ``out_dir`` a scratch folder unless
    ``--update`` or ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--continuum", action="store_true", help="the three prior strengths (docs/choosing.md)")
    ap.add_argument("--quick", action="store_true", help="the continuum shortened, in float64 (the test's run)")
    ap.add_argument("--update", action="store_true", help="write to the committed folder under examples/results/")
    ap.add_argument("--out", default=None, help=f"output folder (default: a scratch folder under {SCRATCH})")
    ap.add_argument("--float64", action="store_true", help="train and evaluate in float64 (same as --dtype float64)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    ap.add_argument("--weightings", default=None, help="comma-separated names or config calls "
                                                       "(e.g. sft,dft,\"RankTuner(w0='one')\")")
    skip = {"weightings", "seeds", "save", "pretrain_mix", "out_dir", "weak_mix", "strong_mix"}
    for f in fields(cont.ContinuumConfig):
        if f.name not in skip:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"default {f.default}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: for these tiny "
                                                               "models more threads cost more than they give)")
    ap.add_argument("--jobs", type=int, default=1, help="run the seeds in this many processes at a time, then merge "
                                                        "(e.g. 2 on 2 cores)")
    ap.add_argument("--no-save", action="store_true", help="write no files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge the results of separate runs (e.g. one seed "
                    "each) into --out (or, with --update, the committed folder) and exit")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        ap.error("--threads and --jobs must be positive")
    if args.jobs > 1 and args.no_save:
        ap.error("--jobs merges the processes' files: it cannot be used with --no-save")
    mode = "quick" if args.quick else "continuum" if args.continuum else "single"
    cfg = cont.ContinuumConfig(**QUICK) if args.quick else cont.ContinuumConfig() if args.continuum else MatterConfig()
    names = {f.name for f in fields(cfg)}
    for f in fields(cont.ContinuumConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in skip:
            if f.name not in names:
                ap.error(f"--{f.name.replace('_', '-')} is a setting of the continuum: add --continuum")
            setattr(cfg, f.name, v)
    if args.float64:
        cfg.dtype = "float64"
    if cfg.dtype not in ("float32", "float64"):
        ap.error(f"--dtype: float32 or float64, got {cfg.dtype!r}")
    if args.seeds:
        cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.weightings:
        cfg.weightings = tuple(w.strip() for w in args.weightings.split(",") if w.strip())
    cfg.out_dir = args.out or (os.path.join("examples", "results", FOLDERS[mode]) if args.update
                               else os.path.join(SCRATCH, FOLDERS[mode]))
    cfg.save = not args.no_save
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.merge:
        return merge(args.merge, cfg.out_dir, argv)
    if args.jobs > 1 and len(cfg.seeds) > 1:
        return run_in_processes(cfg, argv, args.jobs)
    torch.set_num_threads(args.threads)
    return run(cfg, progress=not args.quiet, argv=argv)


if __name__ == "__main__":
    main()
