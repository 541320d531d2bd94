"""The training loop of ``examples/finetune.py``: AdamW on ``rk.linear_cross_entropy`` (the
fused-linear path) with warm-up and cosine decay, a progress bar (tqdm if installed) and
periodic evaluations. ``cfg`` is the run's ``finetune.Config``."""

from __future__ import annotations

import math

import torch
from tiny_lm import TinyLM

import ranktuner_kernels as rk

try:
    from tqdm.auto import tqdm
except ImportError:  # optional: plain prints instead
    tqdm = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Progress:
    """tqdm when installed, else a line every ~10% of the steps."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.total, self.desc, self.quiet, self.n = total, desc, quiet, 0
        self.bar = None if quiet or tqdm is None else tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
        self.every = max(1, total // 10)

    def update(self, **post):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()}, refresh=False)
            self.bar.update(1)
        elif not self.quiet and (self.n % self.every == 0 or self.n == self.total):
            print(f"  {self.desc} step {self.n}/{self.total} " + " ".join(f"{k}={v:.3f}" for k, v in post.items()), flush=True)

    def write(self, msg: str):
        if self.quiet:
            return
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``peak``."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    u = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u)))


def train(model: TinyLM, next_batch, steps: int, lr: float, weighting, cfg, desc: str,
          eval_fn=None, quiet: bool = False) -> dict:
    """AdamW on ``rk.linear_cross_entropy(model.hidden(x), model.lm_head.weight, y, ...)``;
    returns the per-step history (objective, NLL and mean weight over kept tokens) and the
    periodic evaluations."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    hist = {"objective": [], "nll": [], "weight": [], "eval_steps": [], "accuracy": [], "answer_right": [],
            "noisy_generations": []}
    bar = _Progress(steps, desc, quiet)
    model.train()
    ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x, y = next_batch()
        x, y = x.to(cfg.device), y.to(cfg.device)
        loss, stats = rk.linear_cross_entropy(model.hidden(x), model.lm_head.weight, y, weighting=weighting,
                                              return_stats=True, impl=cfg.impl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        keep = y != -100  # ignored positions may hold NaN statistics
        nll = float(-stats["logp_t"][keep].mean())
        w = float(stats["weight"][keep].mean())
        hist["objective"].append(loss.item())
        hist["nll"].append(nll)
        hist["weight"].append(w)
        ema = (nll, w) if ema is None else (0.9 * ema[0] + 0.1 * nll, 0.9 * ema[1] + 0.1 * w)
        bar.update(nll=ema[0], w=ema[1])
        if eval_fn is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            ev = eval_fn(step + 1 == steps)
            hist["eval_steps"].append(step + 1)
            for k in ("accuracy", "answer_right", "noisy_generations"):
                hist[k].append(ev[k])
            bar.write(f"  [{desc}] step {step + 1}: held-out accuracy {ev['accuracy']:.1%}, "
                      f"noisy generations {ev['noisy_generations']:.1%}")
            model.train()
    bar.close()
    return hist
