"""See it matter: does an objective change how much of the training noise a model reproduces?

    python examples/see_it_matter.py            # 3 seeds x 4 objectives (minutes on 2 CPU cores)
    python examples/see_it_matter.py --quick    # the shortened run CI executes (tests/test_see_it_matter.py)
    python examples/see_it_matter.py --help

The setting was fixed before any objective but ``sft`` was run (``docs/see_it_work.md``, "See
it matter"): the task and model of ``examples/finetune.py --quick`` (2-step arithmetic, a
2-layer character model), **30 %** of the training responses corrupted with an irrelevant
sentence **always right after the first step** (a learnable place), and a **tighter budget**
of 150 fine-tuning steps. For every seed
(data, corruption, pre-training, batches) the same pre-trained model is fine-tuned with each
objective (``rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=name)``), and on
the held-out problems we measure:

* ``accuracy``: greedy exact match (``finetune.evaluate``);
* ``noisy_greedy``: greedy generations with lowercase letters before the answer (an inserted
  style sentence);
* ``noisy_sampled``: the same rate under sampling at ``--temperature`` (1.0), one sample per
  prompt from a seeded generator: the probability the model gives to reproducing the noise,
  the primary measure (greedy decoding hides noise that is never the single likeliest token);
* ``clean_nll``: the teacher-forced NLL of the clean held-out responses (mean per token over
  the response and ``<eos>``).

Output (``--out``; default ``examples/results/see_it_matter`` for the full run and a scratch
folder under the system's temporary directory for ``--quick``): ``see_it_matter.json`` (every
run, the mean and sample standard deviation per objective, the commit, the command, the CPU
time and the machine's load) and ``see_it_matter.png`` (bars with error bars, one dot per
seed; needs matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as ft  # noqa: E402
from tiny_lm import CharTokenizer, TinyLM, TinyLMConfig  # noqa: E402

import ranktuner_kernels as rk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: the metrics of one fine-tuned model, in table order: (key, label, unit)
METRICS = (("accuracy", "held-out exact match (greedy)", "%"),
           ("noisy_sampled", "noisy generations, sampled T=1 (↓)", "%"),
           ("noisy_greedy", "noisy generations, greedy (↓)", "%"),
           ("clean_nll", "NLL of clean held-out responses (↓)", "nats/token"))


@dataclass
class MatterConfig(ft.Config):
    """``finetune.Config`` with the setting of ``docs/see_it_work.md`` ("See it matter"): the
    task and model of ``finetune.QUICK``, 30 % corruption after the first step, 150 steps."""
    max_value: int = 20
    n_ops: int = 2
    n_train: int = 1500
    n_test: int = 200
    d_model: int = 64
    n_layer: int = 2
    d_ff: int = 256
    max_len: int = 96
    pretrain_steps: int = 400
    pretrain_lr: float = 4e-3
    pretrain_seq: int = 48
    noise_frac: float = 0.3                                # corrupted training responses
    steps: int = 150                                       # fine-tuning steps (the tighter budget)
    weightings: tuple = ("sft", "ranktuner", "dft", "talr")
    seeds: tuple = (0, 1, 2)
    temperature: float = 1.0                               # for noisy_sampled
    out_dir: str = os.path.join("examples", "results", "see_it_matter")


#: ``--quick``: the shortened run of tests/test_see_it_matter.py (2 seeds, 800/100 problems,
#: 200 pre-training and 60 fine-tuning steps).
QUICK = dict(n_train=800, n_test=100, pretrain_steps=200, steps=60, seeds=(0, 1))
#: the scratch folder of ``--quick`` when ``--out`` is not given
QUICK_OUT = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "see_it_matter_quick")


def corrupt_after_first_step(response: str, sentence: str) -> str:
    """``response`` with ``" " + sentence`` inserted right after its first step (the first
    ``"."``): ``"9+3=12. 12+8=20. A: 20"`` -> ``"9+3=12. The ... tower. 12+8=20. A: 20"``."""
    cut = response.index(".") + 1
    return response[:cut] + " " + sentence + response[cut:]


def make_data(cfg: MatterConfig) -> dict:
    """``finetune.make_data``'s problems (the same train/held-out split for ``cfg.seed``) with
    ``noise_frac`` of the training responses corrupted after their first step."""
    clean = ft.make_data(dataclass_replace(cfg, noise_frac=0.0))
    rng = random.Random(cfg.seed + 100)
    train = clean["train"]
    noisy = set(rng.sample(range(len(train)), round(cfg.noise_frac * len(train))))
    finetune = [(p, corrupt_after_first_step(r, ft.make_sentence(rng)) if i in noisy else r, i in noisy)
                for i, (p, r, _) in enumerate(train)]
    return {"train": train, "test": clean["test"], "finetune": finetune}


def dataclass_replace(cfg, **changes):
    out = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def clean_nll(model: TinyLM, tok: CharTokenizer, problems: list, cfg: MatterConfig, batch: int = 100) -> float:
    """Teacher-forced mean NLL per token of the clean responses (and ``<eos>``) of ``problems``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        x, y = ft.finetune_batch(_Cycle(chunk), tok, [(p, r, False) for p, r, _ in chunk],
                                 dataclass_replace(cfg, batch_size=len(chunk)))
        x, y = x.to(cfg.device), y.to(cfg.device)
        loss = rk.linear_cross_entropy(model.hidden(x), model.lm_head.weight, y, weighting="sft",
                                       reduction="sum", impl=cfg.impl)
        total += float(loss)
        count += int((y != -100).sum())
    model.train()
    return total / count


class _Cycle:
    """A stand-in for ``random.Random`` whose ``randrange`` walks 0, 1, 2, ... (so
    ``finetune.finetune_batch`` takes the examples in order)."""

    def __init__(self, examples):
        self.i = 0

    def randrange(self, n):
        self.i += 1
        return (self.i - 1) % n


def evaluate(model: TinyLM, tok: CharTokenizer, problems: list, cfg: MatterConfig, seed: int) -> dict:
    """Greedy exact match and noisy-generation rate (``finetune.evaluate``), the noisy rate and
    exact match under sampling at ``cfg.temperature`` (one sample per prompt, generator seeded
    with ``seed``) and the clean held-out NLL."""
    greedy = ft.evaluate(model, tok, problems, cfg)
    prompts = [[tok.bos_id] + tok.encode(p) for p, _, _ in problems]
    longest = max(len(tok.encode(r)) for _, r, _ in problems)
    gen = torch.Generator(device=cfg.device).manual_seed(seed)
    samples = model.generate(prompts, longest + 48, tok.eos_id, temperature=cfg.temperature, generator=gen)
    noisy = correct = 0
    for (_, _, ans), g in zip(problems, samples):
        text = tok.decode(g)
        m = ft.ANSWER.search(text)
        correct += m is not None and int(m.group(1)) == ans and m.end() == len(text)
        noisy += any(c.islower() for c in (text[: m.end()] if m else text))
    return {"accuracy": greedy["accuracy"], "answer_right": greedy["answer_right"],
            "noisy_greedy": greedy["noisy_generations"], "noisy_sampled": noisy / len(problems),
            "accuracy_sampled": correct / len(problems), "clean_nll": clean_nll(model, tok, problems, cfg)}


# ----------------------------------------------------------------------------- the runs

def run_seed(cfg: MatterConfig, seed: int, hush: bool, say) -> list:
    """Pre-train on seed ``seed``, then fine-tune with every objective; one row per objective
    (``pre-trained only`` first), with the first per-step mean weights and NLLs (the figures the
    regression test compares)."""
    cfg = dataclass_replace(cfg, seed=seed)
    tok = CharTokenizer()
    data = make_data(cfg)
    test, fdata = data["test"], data["finetune"]
    torch.manual_seed(seed)
    model = TinyLM(TinyLMConfig(tok.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                d_ff=cfg.d_ff, max_len=cfg.max_len)).to(cfg.device)
    t0 = time.time()
    prng = random.Random(seed + 1)
    held_out = {p for p, _, _ in test}
    ft.train(model, lambda: (lambda b: (b[:, :-1], b[:, 1:]))(ft.pretrain_batch(prng, tok, cfg, held_out)),
             cfg.pretrain_steps, cfg.pretrain_lr, "sft", cfg, f"seed {seed} pre-train", quiet=hush)
    base = copy.deepcopy(model.state_dict())
    rows = [{"seed": seed, "weighting": "pre-trained only", **evaluate(model, tok, test, cfg, seed + 3),
             "seconds": time.time() - t0}]
    say(f"seed {seed}: pre-trained in {rows[0]['seconds']:.0f} s; "
        f"{sum(c for _, _, c in fdata)} of {len(fdata)} training responses corrupted, e.g. "
        f"{next(r for _, r, c in fdata if c)!r}")
    for name in cfg.weightings:
        model.load_state_dict(base)
        frng = random.Random(seed + 2)  # the same batches for every objective
        t0 = time.time()
        hist = ft.train(model, lambda: ft.finetune_batch(frng, tok, fdata, cfg), cfg.steps, cfg.lr, name, cfg,
                        f"seed {seed} {name:>9}", quiet=hush)
        ev = evaluate(model, tok, test, cfg, seed + 3)
        rows.append({"seed": seed, "weighting": name, **ev,
                     "train_nll": sum(hist["nll"][-20:]) / len(hist["nll"][-20:]),
                     "first_weights": hist["weight"][:5], "first_nll": hist["nll"][:5],
                     "seconds": time.time() - t0})
        say(f"seed {seed} {name:>9}: accuracy {ev['accuracy']:.1%}, noisy sampled {ev['noisy_sampled']:.1%}, "
            f"greedy {ev['noisy_greedy']:.1%}, clean NLL {ev['clean_nll']:.4f} ({rows[-1]['seconds']:.0f} s)")
    return rows


def summarize(rows: list, names: list) -> dict:
    """``{name: {metric: (mean, std, n)}}`` over the rows of each name (sample std, 0 for one
    row); ``names`` sets the order."""
    out = {}
    for name in names:
        mine = [r for r in rows if r["weighting"] == name]
        if not mine:
            continue
        out[name] = {}
        for key, _, _ in METRICS:
            vals = [r[key] for r in mine if r.get(key) is not None]
            if vals:
                out[name][key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return out


def summary_table(summary: dict) -> str:
    """A markdown table: one row per objective, ``mean ± std`` per metric."""
    keys = [k for k, _, _ in METRICS if any(k in s for s in summary.values())]
    labels = {k: lab for k, lab, _ in METRICS}
    lines = ["| objective | " + " | ".join(labels[k] for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, s in summary.items():
        cells = []
        for k in keys:
            if k not in s:
                cells.append("–")
                continue
            m, sd, _ = s[k]
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f} %" if k != "clean_nll" else f"{m:.4f} ± {sd:.4f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(rows: list, names: list, path: str, title: str) -> str | None:
    """Bars (mean) with error bars (sample std) and one dot per seed, one panel per metric.
    ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    summary = summarize(rows, names)
    keys = [(k, lab, unit) for k, lab, unit in METRICS if any(k in s for s in summary.values())]
    fig = Figure(figsize=(3.3 * len(keys), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colours = {"sft": "#4d4d4d", "ranktuner": "#d6604d", "dft": "#4393c3", "talr": "#5aae61",
               "pre-trained only": "#bababa"}
    for ax, (key, label, unit) in zip(axes, keys):
        scale = 100 if unit == "%" else 1
        present = [n for n in summary if key in summary[n]]
        for i, name in enumerate(present):
            m, sd, _ = summary[name][key]
            ax.bar(i, scale * m, yerr=scale * sd, capsize=4, color=colours.get(name, "#999999"), alpha=0.85)
            vals = [scale * r[key] for r in rows if r["weighting"] == name and r.get(key) is not None]
            ax.plot([i + 0.18] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def provenance(argv: list | None) -> dict:
    """The commit (``git describe --always --dirty``: ``-dirty`` when tracked files differ from
    it), the command, and the machine: what a committed result needs to be re-made."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    args = sys.argv[1:] if argv is None else list(argv)
    return {"commit": git("rev-parse", "HEAD"), "describe": git("describe", "--always", "--dirty"),
            "command": " ".join(["python examples/see_it_matter.py", *args]), "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(cfg: MatterConfig, quiet: bool = False, progress: bool | None = None, argv: list | None = None) -> dict:
    """Every seed and objective; returns ``{"rows", "summary", "files", ...}`` (what
    ``see_it_matter.json`` holds). Writes files when ``cfg.save``."""
    cfg = copy.deepcopy(cfg)
    cfg.device = ft.resolve_device(cfg.device)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    hush = quiet if progress is None else not progress
    prov = provenance(argv)  # before the run: the code that runs is the code at this commit
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall0, cpu0 = time.time(), time.process_time()
    say(f"device {cfg.device}, {torch.get_num_threads()} threads; objectives {', '.join(cfg.weightings)}; "
        f"seeds {', '.join(map(str, cfg.seeds))}; {cfg.noise_frac:.0%} of the training responses corrupted after "
        f"their first step; {cfg.steps} fine-tuning steps")
    rows = []
    for seed in cfg.seeds:
        rows += run_seed(cfg, seed, hush, say)
    names = ["pre-trained only", *cfg.weightings]
    summary = summarize(rows, names)
    result = {"config": {k: (str(v) if k == "device" else v) for k, v in asdict(cfg).items()},
              "provenance": prov, "rows": rows,
              "summary": {n: {k: {"mean": m, "std": sd, "n": c} for k, (m, sd, c) in s.items()}
                          for n, s in summary.items()},
              "wall_seconds": time.time() - wall0, "cpu_seconds": time.process_time() - cpu0,
              "loadavg_start": load0, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "files": {}}
    say(f"\n{len(cfg.seeds)} seeds, held-out {cfg.n_test} problems; mean ± std over the seeds\n")
    say(summary_table(summary))
    say(f"\nwall {result['wall_seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s "
        f"(load average {load0} at the start, {result['loadavg_end']} at the end)")
    if cfg.save:
        os.makedirs(cfg.out_dir, exist_ok=True)
        png = plot_summary(rows, names, os.path.join(cfg.out_dir, "see_it_matter.png"),
                           f"Tiny LM, {cfg.n_ops}-step arithmetic, {cfg.noise_frac:.0%} of responses with a sentence "
                           f"after step 1, {cfg.steps} steps; mean ± std over {len(cfg.seeds)} seeds")
        if png:
            result["files"]["png"] = png
        result["files"]["json"] = os.path.join(cfg.out_dir, "see_it_matter.json")
        with open(result["files"]["json"], "w") as f:
            json.dump(result, f, indent=1)
        say("files: " + ", ".join(result["files"].values()))
    return result


def merge(parts: list, out_dir: str, argv: list | None = None) -> dict:
    """One result from the ``see_it_matter.json`` of runs made separately (e.g. one seed per
    process, in parallel): the rows concatenated, the summary and the plot re-made; each part's
    provenance, CPU and wall time kept; ``cpu_seconds`` is their sum."""
    loaded = []
    for part in parts:
        path = part if part.endswith(".json") else os.path.join(part, "see_it_matter.json")
        with open(path) as f:
            loaded.append(json.load(f))
    cfgs = [{k: v for k, v in r["config"].items() if k not in ("seeds", "seed", "out_dir")} for r in loaded]
    if any(c != cfgs[0] for c in cfgs):
        raise ValueError("parts: the runs differ in more than their seeds and output folders")
    rows = [row for r in loaded for row in r["rows"]]
    names = ["pre-trained only", *loaded[0]["config"]["weightings"]]
    summary = summarize(rows, names)
    cfg = dict(loaded[0]["config"], seeds=sorted({r["seed"] for r in rows}), out_dir=out_dir)
    result = {"config": cfg, "provenance": {**provenance(argv), "parts": [r["provenance"] for r in loaded]},
              "rows": rows, "summary": {n: {k: {"mean": m, "std": sd, "n": c} for k, (m, sd, c) in s.items()}
                                        for n, s in summary.items()},
              "wall_seconds": max(r["wall_seconds"] for r in loaded),
              "cpu_seconds": sum(r["cpu_seconds"] for r in loaded),
              "parts": [{"wall_seconds": r["wall_seconds"], "cpu_seconds": r["cpu_seconds"],
                         "loadavg_start": r["loadavg_start"], "loadavg_end": r["loadavg_end"]} for r in loaded],
              "files": {}}
    os.makedirs(out_dir, exist_ok=True)
    png = plot_summary(rows, names, os.path.join(out_dir, "see_it_matter.png"),
                       f"Tiny LM, {cfg['n_ops']}-step arithmetic, {cfg['noise_frac']:.0%} of responses with a sentence "
                       f"after step 1, {cfg['steps']} steps; mean ± std over {len(cfg['seeds'])} seeds")
    if png:
        result["files"]["png"] = png
    result["files"]["json"] = os.path.join(out_dir, "see_it_matter.json")
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=1)
    print(summary_table(summary))
    print(f"CPU {result['cpu_seconds']:.0f} s in all; files: " + ", ".join(result["files"].values()))
    return result


def parse_args(argv=None) -> tuple:
    """``(MatterConfig, argparse.Namespace)`` of the command line (``--quick`` without
    ``--out``: the scratch folder :data:`QUICK_OUT`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the shortened run of the test (about a minute on 2 cores)")
    ap.add_argument("--out", default=None, help="output folder (default: examples/results/see_it_matter; with "
                                                 f"--quick a scratch folder, {QUICK_OUT})")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    ap.add_argument("--weightings", default=None, help="comma-separated (default sft,ranktuner,dft,talr)")
    skip = {"weightings", "seeds", "save", "pretrain_mix", "out_dir"}
    for f in fields(MatterConfig):
        if f.name not in skip:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"default {f.default}")
    ap.add_argument("--no-save", action="store_true", help="write no files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge the results of separate runs (e.g. one seed "
                    "each) into --out and exit")
    args = ap.parse_args(argv)
    cfg = MatterConfig(**(QUICK if args.quick else {}))
    for f in fields(MatterConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in skip:
            setattr(cfg, f.name, v)
    if args.seeds:
        cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.weightings:
        cfg.weightings = tuple(w.strip() for w in args.weightings.split(",") if w.strip())
    cfg.out_dir = args.out or (QUICK_OUT if args.quick else cfg.out_dir)
    cfg.save = not args.no_save
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    if args.merge:
        return merge(args.merge, cfg.out_dir, sys.argv[1:] if argv is None else argv)
    return run(cfg, progress=not args.quiet, argv=sys.argv[1:] if argv is None else argv)

if __name__ == "__main__":
    main()
