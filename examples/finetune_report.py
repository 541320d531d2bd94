"""The outputs of ``examples/finetune.py``: the table of final accuracies, the curves PNG
(needs matplotlib), a token-inspector page and PNG of one corrupted training response, and
``results.json`` with the provenance (commit, command, machine) of the run. ``cfg`` is the
run's ``finetune.Config``; files go to ``cfg.out_dir``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict

import torch
from tiny_lm import CharTokenizer, TinyLM

import ranktuner_kernels as rk


def plot_curves(histories: dict, path: str, cfg) -> str | None:
    """NLL, objective and mean weight per step (EMA-smoothed over the raw curve) and the
    held-out accuracy, one line per weighting. ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no curves PNG (pip install matplotlib)")
        return None

    def smooth(v, a=0.9):
        out, m = [], None
        for x in v:
            m = x if m is None else a * m + (1 - a) * x
            out.append(m)
        return out

    fig = Figure(figsize=(11, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [("nll", "training NLL of the target tokens (−log p_t, mean over kept tokens)"),
              ("objective", "objective (the loss minimised)"),
              ("weight", "mean token weight w_t"),
              ("accuracy", "held-out exact-match accuracy (greedy)")]
    colours = {"sft": "#4d4d4d", "ranktuner": "#d6604d", "dft": "#4393c3"}
    for ax, (key, title) in zip(axes.flat, panels):
        for name, h in histories.items():
            c = colours.get(name)
            if key == "accuracy":
                ax.plot(h["eval_steps"], [100 * a for a in h["accuracy"]], "o-", color=c, label=name)
                ax.set_ylabel("%")
            else:
                ax.plot(h[key], color=c, alpha=0.2, lw=0.8)
                ax.plot(smooth(h[key]), color=c, label=name, lw=1.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    dev = "GPU" if str(cfg.device).startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    fig.suptitle(f"Tiny LM fine-tuned on {cfg.n_ops}-step arithmetic, {cfg.noise_frac:.0%} of responses with an inserted "
                 f"sentence ({dev})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def results_table(rows: list) -> str:
    head = f"{'model':<26} {'accuracy':>9} {'answer right':>13} {'noisy gen.':>11} {'train NLL':>10} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        nll = f"{r['final_nll']:.3f}" if r.get("final_nll") is not None else "-"
        t = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"{r['name']:<26} {r['accuracy']:>8.1%} {r['answer_right']:>12.1%} {r['noisy_generations']:>10.1%} "
                     f"{nll:>10} {t:>7}")
    return "\n".join(lines)


def provenance(argv: list | None = None, script: str = "finetune.py") -> dict:
    """The commit (``describe``: ``git describe --always --dirty``), the command (``python
    examples/<script> <argv>``; ``argv`` defaults to this process's) and the machine, recorded
    with every result file."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    args = sys.argv[1:] if argv is None else list(argv)
    return {"commit": git("rev-parse", "HEAD"), "describe": git("describe", "--always", "--dirty"),
            "command": " ".join(["python examples/" + script, *args]),
            "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def inspect_corrupted(model: TinyLM, tok: CharTokenizer, example: tuple, out_dir: str) -> dict:
    """``rk.inspect`` of one corrupted fine-tuning example ``(prompt, response, True)`` under
    ``model`` (the prompt unscored), as ``inspect_ranktuner.html`` and, with matplotlib,
    ``inspect_ranktuner.png`` in ``out_dir``; returns ``{"inspect_html": path[, "inspect_png": path]}``."""
    p, r, _ = example
    ids = [tok.bos_id] + tok.encode(p) + tok.encode(r) + [tok.eos_id]
    labels = [-100] * (1 + len(tok.encode(p))) + ids[1 + len(tok.encode(p)):]
    html_path = os.path.join(out_dir, "inspect_ranktuner.html")
    png_path = os.path.join(out_dir, "inspect_ranktuner.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png_path = None
    rk.inspect(model, ids, tok.token_strings(ids), labels=labels, weighting=rk.RankTuner(), html=html_path,
               png=png_path, png_rows=("p_t", "entropy", "indicator", "weight"), line_chars=60,
               title="Tiny LM (ranktuner-fine-tuned) on a corrupted training response",
               print_table=False)
    return {"inspect_html": html_path, **({"inspect_png": png_path} if png_path else {})}


def write_results(path: str, cfg, prov: dict, rows: list, diagnostics: dict, histories: dict, seconds: float) -> str:
    """``results.json``: the config, the provenance, the accuracy rows, the noise diagnostics
    and the per-step histories; returns ``path``."""
    summary = {"config": {k: (str(v) if k == "device" else v) for k, v in asdict(cfg).items()},
               "provenance": prov,
               "device": str(cfg.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rows": rows, "seconds": seconds,
               "diagnostics": {k: {"rows": v.rows, "n_examples": v.n_examples, "n_corrupted": v.n_corrupted,
                                   "n_tokens": v.n_tokens, "n_noise_tokens": v.n_noise_tokens}
                               for k, v in diagnostics.items()},
               "histories": histories}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path
