"""The noisy fine-tuning setting of "See it matter" (``docs/see_it_work.md``), as building blocks
for ``examples/see_it_matter.py`` (its single setting and the prior-strength continuum of
``examples/continuum.py``) and ``examples/finetune_hf.py``.

The setting: the task and model of ``examples/finetune.py --quick`` (2-step arithmetic, a
2-layer character model), **30 %** of the training responses corrupted with an irrelevant
sentence **always right after the first step**, 150 fine-tuning steps. Each pre-trained model
is fine-tuned with every objective from the same weights with the same batches
(``rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=...)``), and on the
held-out problems we measure:

* ``accuracy``: greedy exact match (``finetune.evaluate``);
* ``noisy_greedy``: greedy generations with lowercase letters before the answer (an inserted
  style sentence);
* ``noisy_sampled``: the same rate under sampling at ``temperature`` (1.0), one sample per
  prompt from a seeded generator: the probability the model gives to reproducing the noise,
  the primary measure of noise (greedy decoding hides noise that is never the single likeliest
  token);
* ``clean_nll``: the teacher-forced NLL of the clean held-out responses (mean per token over
  the response and ``<eos>``).

An objective is a weighting name (``"sft"``, ``"dft"``, ...) or a config call such as
``"RankTuner(w0='one')"`` (:func:`weighting_of`); the string is its label in every table.
``dtype="float64"`` trains and evaluates in float64 (what a run that must reproduce on any CPU
uses: float32 results move with the CPU's rounding).
"""

from __future__ import annotations

import copy
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as ft  # noqa: E402
from tiny_lm import CharTokenizer, TinyLM, TinyLMConfig  # noqa: E402

import ranktuner_kernels as rk  # noqa: E402
from ranktuner_kernels.analysis.cli import parse_weighting  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: the metrics of one fine-tuned model, in table order: (key, label, unit)
METRICS = (("accuracy", "held-out exact match (greedy)", "%"),
           ("noisy_sampled", "noisy generations, sampled T=1 (↓)", "%"),
           ("noisy_greedy", "noisy generations, greedy (↓)", "%"),
           ("clean_nll", "NLL of clean held-out responses (↓)", "nats/token"))

#: one colour per objective in every plot
COLOURS = {"sft": "#4d4d4d", "ranktuner": "#d6604d", "RankTuner(w0='one')": "#f4a582", "dft": "#4393c3",
           "threshold": "#762a83", "talr": "#5aae61", "pre-trained only": "#bababa"}


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
    dtype: str = "float32"                                 # or "float64": the model, training, evaluation
    out_dir: str = os.path.join("examples", "results", "see_it_matter")


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


# ----------------------------------------------------------------------------- models and objectives

def weighting_of(spec: str):
    """An objective's label -> what ``rk.linear_cross_entropy(weighting=...)`` takes: a name as
    it is, ``"Name(key=literal, ...)"`` as that registered config (``RankTuner(w0='one')``)."""
    return parse_weighting(spec)


def new_model(cfg: MatterConfig, tok: CharTokenizer, seed: int) -> TinyLM:
    """The seed's freshly initialised model (``torch.manual_seed(seed)``), created and initialised
    in ``cfg.dtype``: a float32 initialisation cast to float64 would carry float32's CPU-dependent
    rounding of the random normals (~5e-7), which Adam's first steps grow to ~1e-3."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    try:
        model = TinyLM(TinyLMConfig(tok.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                    d_ff=cfg.d_ff, max_len=cfg.max_len))
    finally:
        torch.set_default_dtype(default)
    return model.to(cfg.device)


def pretrain(model: TinyLM, cfg: MatterConfig, tok: CharTokenizer, rng: random.Random, held_out: set, steps: int,
             lr: float, desc: str, hush: bool) -> None:
    """``steps`` of plain SFT on ``finetune.pretrain_batch``'s packed stream (``cfg.pretrain_mix``,
    ``cfg.pretrain_full``; never a ``held_out`` prompt), drawn with ``rng``."""
    ft.train(model, lambda: (lambda b: (b[:, :-1], b[:, 1:]))(ft.pretrain_batch(rng, tok, cfg, held_out)),
             steps, lr, "sft", cfg, desc, quiet=hush)


def finetune_each(model: TinyLM, cfg: MatterConfig, tok: CharTokenizer, data: dict, seed: int, hush: bool, say,
                  extra: dict | None = None) -> list:
    """Fine-tune the pre-trained ``model`` with every objective of ``cfg.weightings`` (each from
    its current weights, the same batches: ``random.Random(seed + 2)``) and evaluate it
    (sampling seeded with ``seed + 3``); the model is left at its pre-trained weights. One row per
    objective (``extra`` added to each), with the first per-step mean weights and NLLs."""
    base = copy.deepcopy(model.state_dict())
    rows, tag = [], " ".join(str(v) for v in (extra or {}).values())
    for name in cfg.weightings:
        model.load_state_dict(base)
        frng = random.Random(seed + 2)  # the same batches for every objective
        t0 = time.time()
        hist = ft.train(model, lambda: ft.finetune_batch(frng, tok, data["finetune"], cfg), cfg.steps, cfg.lr,
                        weighting_of(name), cfg, f"seed {seed} {tag} {name}".replace("  ", " "), quiet=hush)
        ev = evaluate(model, tok, data["test"], cfg, seed + 3)
        rows.append({"seed": seed, **(extra or {}), "weighting": name, **ev,
                     "train_nll": sum(hist["nll"][-20:]) / len(hist["nll"][-20:]),
                     "first_weights": hist["weight"][:5], "first_nll": hist["nll"][:5],
                     "seconds": time.time() - t0})
        say(f"seed {seed} {tag} {name:>9}: accuracy {ev['accuracy']:.1%}, noisy sampled {ev['noisy_sampled']:.1%}, "
            f"greedy {ev['noisy_greedy']:.1%}, clean NLL {ev['clean_nll']:.4f} ({rows[-1]['seconds']:.0f} s)")
    model.load_state_dict(base)
    return rows


# ----------------------------------------------------------------------------- summaries

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
    for ax, (key, label, unit) in zip(axes, keys):
        scale = 100 if unit == "%" else 1
        present = [n for n in summary if key in summary[n]]
        for i, name in enumerate(present):
            m, sd, _ = summary[name][key]
            ax.bar(i, scale * m, yerr=scale * sd, capsize=4, color=COLOURS.get(name, "#999999"), alpha=0.85)
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


