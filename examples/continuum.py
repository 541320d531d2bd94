"""The prior-strength continuum on the toy: the "See it matter" fine-tuning from three
pre-trained models that know the task to different degrees (the protocol, fixed before the
run: ``docs/choosing.md``). Run it with ``python examples/see_it_matter.py --continuum``.

Prior strength is arXiv 2510.00526's proxy, the mean target probability of the fine-tune data
before fine-tuning (``rk.analysis.prior_strength``, on every response token and ``<eos>`` of
the noisy fine-tune set). The three pre-trained models of a seed:

* ``weak``: pre-trained on generated sentences only (no digit, no task format);
* ``intermediate``: the existing "See it matter" pre-training (facts, sentences, worked
  problems, mostly one-step);
* ``strong``: the intermediate model pre-trained further on the task family
  (:func:`task_batch`: clean worked problems in the fine-tune format with ``<eos>``,
  sentences, facts) in rounds of ``strong_round`` steps until its prior strength reaches
  ``strong_target`` (at most ``strong_rounds`` rounds).

Each is fine-tuned with every objective (``noisy_setting.finetune_each``) and evaluated; the
summary is per strength and objective, and :func:`verdicts` applies the protocol's criterion.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as ft  # noqa: E402
from noisy_setting import (  # noqa: E402
    COLOURS, METRICS, CharTokenizer, MatterConfig, dataclass_replace, evaluate, finetune_each, make_data, new_model,
    pretrain)

from ranktuner_kernels.analysis.prior import REGION_BOUNDS, prior_strength  # noqa: E402

STRENGTHS = ("weak", "intermediate", "strong")
PRE = "pre-trained only"


@dataclass
class ContinuumConfig(MatterConfig):
    """``MatterConfig`` with the continuum's objectives and the three pre-trainings."""
    weightings: tuple = ("sft", "ranktuner", "RankTuner(w0='one')", "dft", "threshold")
    weak_mix: tuple = (0.0, 1.0)        # the weak model's stream: (facts, sentences), no problem
    strong_target: float = 0.8          # the strong model's prior strength to reach
    strong_round: int = 50              # steps per round (a fresh AdamW each, warm-up + cosine)
    strong_rounds: int = 30             # at most
    strong_lr: float = 2e-3
    strong_mix: tuple = (0.6, 0.3)      # the strong stream: (worked problems, sentences), the rest facts
    out_dir: str = os.path.join("examples", "results", "see_it_matter_continuum")


# ----------------------------------------------------------------------------- prior strength

def prior_batches(examples: list, tok: CharTokenizer, cfg: MatterConfig, size: int = 250):
    """Batches for ``rk.analysis.prior_strength`` of the fine-tune ``examples``: the ids of
    ``<bos>``, prompt, response, ``<eos>`` (cut to ``max_len``), labels ``-100`` on ``<bos>`` and
    the prompt: the tokens the fine-tuning loss scores."""
    for i in range(0, len(examples), size):
        rows = []
        for p, r, _ in examples[i: i + size]:
            pi, ri = [tok.bos_id] + tok.encode(p), tok.encode(r) + [tok.eos_id]
            ids = (pi + ri)[: cfg.max_len]
            rows.append((ids, ([-100] * len(pi) + ri)[: len(ids)]))
        t = max(len(a) for a, _ in rows)
        ids = torch.full((len(rows), t), tok.pad_id)
        labels = torch.full((len(rows), t), -100)
        for j, (a, b) in enumerate(rows):
            ids[j, : len(a)], labels[j, : len(b)] = torch.tensor(a), torch.tensor(b)
        yield {"input_ids": ids, "labels": labels}  # prior_strength moves them to the model


def measure_prior(model, tok: CharTokenizer, examples: list, cfg: MatterConfig):
    """``rk.analysis.prior_strength`` of the toy on the fine-tune ``examples`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        return prior_strength(model.hidden, prior_batches(examples, tok, cfg), head=model.lm_head, impl=cfg.impl)
    finally:
        model.train(was)


def task_batch(rng: random.Random, tok: CharTokenizer, cfg: ContinuumConfig, exclude: set) -> tuple:
    """The strong model's pre-training stream: ``pretrain_batch`` rows of ``<bos>`` and
    ``max_len`` packed ids: clean worked problems in the fine-tune format (prompt, response,
    ``<eos>``; never an ``exclude`` prompt), sentences and one-step facts (``cfg.strong_mix``).
    Returns inputs and next-token targets ``[B, max_len]``."""
    rows = []
    for _ in range(cfg.pretrain_batch):
        ids = [tok.bos_id]
        while len(ids) < cfg.max_len + 1:
            u = rng.random()
            if u < cfg.strong_mix[0]:
                p, r, _ = ft.make_problem(rng, cfg)
                if p in exclude:
                    continue
                ids += tok.encode(p + r) + [tok.eos_id]
            elif u < cfg.strong_mix[0] + cfg.strong_mix[1]:
                ids += tok.encode(ft.make_sentence(rng) + " ")
            else:
                ids += tok.encode(ft.make_fact(rng, cfg) + " ")
        rows.append(ids[: cfg.max_len + 1])
    b = torch.tensor(rows)
    return b[:, :-1], b[:, 1:]


def pretrained_models(cfg: ContinuumConfig, seed: int, tok: CharTokenizer, data: dict, hush: bool, say):
    """Yields ``(strength, model, prior, info)`` for the weak, intermediate and strong models of
    ``seed`` (the caller may fine-tune the model but must hand it back at its pre-trained
    weights: the strong model continues from the intermediate one)."""
    held = {p for p, _, _ in data["test"]}
    for strength, mix in (("weak", cfg.weak_mix), ("intermediate", cfg.pretrain_mix)):
        t0 = time.time()
        model = new_model(cfg, tok, seed)
        pretrain(model, dataclass_replace(cfg, pretrain_mix=mix), tok, random.Random(seed + 1), held,
                 cfg.pretrain_steps, cfg.pretrain_lr, f"seed {seed} pre-train ({strength})", hush)
        yield strength, model, measure_prior(model, tok, data["finetune"], cfg), {
            "pretrain_steps": cfg.pretrain_steps, "pretrain_seconds": time.time() - t0}
    t0, rng, trace = time.time(), random.Random(seed + 4), []
    for r in range(cfg.strong_rounds):
        ft.train(model, lambda: task_batch(rng, tok, cfg, held), cfg.strong_round, cfg.strong_lr, "sft", cfg,
                 f"seed {seed} pre-train (strong) round {r + 1}", quiet=hush)
        prior = measure_prior(model, tok, data["finetune"], cfg)
        trace.append(prior.mean_p)
        if prior.mean_p >= cfg.strong_target:
            break
    else:
        say(f"seed {seed}: the strong model reached {prior.mean_p:.3f} < {cfg.strong_target} in "
            f"{cfg.strong_rounds} rounds; used as it is")
    yield "strong", model, prior, {"pretrain_steps": cfg.pretrain_steps + len(trace) * cfg.strong_round,
                                   "pretrain_seconds": time.time() - t0, "strong_trace": trace}


def run_seed(cfg: ContinuumConfig, seed: int, hush: bool, say) -> list:
    """Every strength and objective of one seed: per strength a ``pre-trained only`` row (its
    evaluation and prior strength), then one row per objective."""
    cfg = dataclass_replace(cfg, seed=seed)
    tok = CharTokenizer()
    data = make_data(cfg)
    rows = []
    for strength, model, prior, info in pretrained_models(cfg, seed, tok, data, hush, say):
        ev = evaluate(model, tok, data["test"], cfg, seed + 3)
        rows.append({"seed": seed, "strength": strength, "weighting": PRE, **ev, **info, "prior": prior.to_dict()})
        say(f"seed {seed} {strength}: prior strength {prior.mean_p:.3f} ({prior.region}), top-1 {prior.top1:.1%}, "
            f"p<0.2 {prior.low_share:.1%}; pre-trained exact match {ev['accuracy']:.1%} "
            f"({info['pretrain_steps']} steps, {info['pretrain_seconds']:.0f} s)")
        rows += finetune_each(model, cfg, tok, data, seed, hush, say, extra={"strength": strength})
    return rows


# ----------------------------------------------------------------------------- summaries

def _ms(vals: list) -> tuple:
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def summarize(rows: list, names: list) -> dict:
    """``{strength: {"prior": (mean, std, n), name: {metric: (mean, std, n)}}}`` (sample std over
    the seeds); ``names`` after ``pre-trained only`` set the order."""
    out = {}
    for s in STRENGTHS:
        mine = [r for r in rows if r.get("strength") == s]
        if not mine:
            continue
        out[s] = {"prior": _ms([r["prior"]["mean_p"] for r in mine if r["weighting"] == PRE])}
        for name in (PRE, *names):
            got = [r for r in mine if r["weighting"] == name]
            if got:
                out[s][name] = {k: _ms([r[k] for r in got]) for k, _, _ in METRICS}
    return out


def _cell(m, sd, key):
    return f"{m:.3f} ± {sd:.3f}" if key == "clean_nll" else f"{100 * m:.1f} ± {100 * sd:.1f} %"


def table(summary: dict, key: str) -> str:
    """A markdown table of one metric: one row per objective, one column per strength (headed by
    its measured prior strength), ``mean ± std``."""
    strengths = [s for s in STRENGTHS if s in summary]
    head = [f"{s} (prior {summary[s]['prior'][0]:.2f} ± {summary[s]['prior'][1]:.2f})" for s in strengths]
    names = list(dict.fromkeys(n for s in strengths for n in summary[s] if n != "prior"))
    lines = ["| objective | " + " | ".join(head) + " |", "|---|" + "---|" * len(strengths)]
    for n in names:
        cells = [_cell(*summary[s][n][key][:2], key) if n in summary[s] else "–" for s in strengths]
        lines.append(f"| {n if n == PRE else f'`{n}`'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list, summary: dict, names: list, key: str = "accuracy") -> dict:
    """Per strength, the protocol's reading of ``key`` (higher is better; for ``clean_nll`` and
    the noise rates lower): the best objective, each pair whose mean ± std intervals do not
    overlap (``beats``, with the number of seeds in which the winner was ahead) and whether
    RankTuner (the better of its variants) tracks the better of ``sft`` and ``dft``."""
    sign = -1 if key in ("clean_nll", "noisy_sampled", "noisy_greedy") else 1
    out = {}
    for s, summ in summary.items():
        present = [n for n in names if n in summ]
        m = {n: summ[n][key][:2] for n in present}
        best = max(present, key=lambda n: sign * m[n][0])
        if min(summ[n][key][2] for n in present) < 2:
            out[s] = {"best": best, "beats": None}  # one seed: no spread to judge a difference by
            continue
        beats = []
        for a in present:
            for b in present:
                if a != b and sign * (m[a][0] - m[b][0]) > m[a][1] + m[b][1]:
                    by_seed = {r["seed"]: r[key] for r in rows if r.get("strength") == s and r["weighting"] == a}
                    ahead = sum(sign * (by_seed[r["seed"]] - r[key]) > 0 for r in rows
                                if r.get("strength") == s and r["weighting"] == b and r["seed"] in by_seed)
                    beats.append({"winner": a, "loser": b, "seeds_ahead": ahead, "seeds": len(by_seed)})
        v = {"best": best, "beats": beats}
        rt = [n for n in ("ranktuner", "RankTuner(w0='one')") if n in m]
        ref = [n for n in ("sft", "dft") if n in m]
        if rt and ref:
            r_best, f_best = max(rt, key=lambda n: sign * m[n][0]), max(ref, key=lambda n: sign * m[n][0])
            v["ranktuner_tracks"] = {"ranktuner": r_best, "reference": f_best,
                                     "tracks": sign * (m[f_best][0] - m[r_best][0]) <= m[f_best][1] + m[r_best][1]}
        out[s] = v
    return out


def verdict_lines(v: dict, key: str = "accuracy") -> list:
    lines = []
    for s, d in v.items():
        if d["beats"] is None:
            lines.append(f"{key} — {s}: best {d['best']} (one seed: no spread to judge a difference by)")
            continue
        beats = "; ".join(f"{b['winner']} > {b['loser']} ({b['seeds_ahead']}/{b['seeds']} seeds)" for b in d["beats"])
        line = f"{s}: best {d['best']}; outside the spread: {beats or 'none'}"
        if "ranktuner_tracks" in d:
            t = d["ranktuner_tracks"]
            line += (f"; RankTuner ({t['ranktuner']}) {'tracks' if t['tracks'] else 'does not track'} "
                     f"the better of sft and dft ({t['reference']})")
        lines.append(f"{key} — {line}")
    return lines


def plot(summary: dict, names: list, path: str, title: str) -> str | None:
    """Each objective's metric against the measured prior strength (mean ± std over the seeds on
    both axes), one panel per metric (exact match first), the regions of arXiv 2510.00526
    shaded. ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    strengths = [s for s in STRENGTHS if s in summary]
    keys = [m for m in METRICS if m[0] != "noisy_greedy"]
    fig = Figure(figsize=(13, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), gridspec_kw={"width_ratios": [1.5] + [1] * (len(keys) - 1)})
    xs = [summary[s]["prior"] for s in strengths]
    for ax, (key, label, unit) in zip(axes, keys):
        scale = 100 if unit == "%" else 1
        for lo, hi in zip((0.0, *REGION_BOUNDS), (*REGION_BOUNDS, 1.0)):
            ax.axvspan(lo, hi, color="#f0f0f0" if lo == REGION_BOUNDS[0] else "white", zorder=0)
        allnames = [PRE, *names]
        for i, n in enumerate(allnames):
            pts = [(x, summary[s][n][key]) for x, s in zip(xs, strengths) if n in summary[s]]
            if not pts:
                continue
            dx = 0.006 * (i - len(allnames) / 2)
            ax.errorbar([x[0] + dx for x, _ in pts], [scale * v[0] for _, v in pts], xerr=[x[1] for x, _ in pts],
                        yerr=[scale * v[1] for _, v in pts], fmt="o-" if n != PRE else "s--", capsize=3, ms=4,
                        color=COLOURS.get(n, "#999999"), label=n, lw=1.3)
        ax.set_xlim(0, 1)
        ax.set_xlabel("prior strength (mean p_t before fine-tuning)", fontsize=8)
        if key == "clean_nll":
            ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    for x, s in zip(xs, strengths):
        axes[0].annotate(s, (x[0], 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7,
                         xycoords=("data", "axes fraction"))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
