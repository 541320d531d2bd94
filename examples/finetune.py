"""See it work: fine-tune a tiny causal LM with ``sft``, ``ranktuner`` and ``dft``.

    python examples/finetune.py                 # defaults: a few minutes on a 2-core CPU
    python examples/finetune.py --quick         # the shortened run of tests/test_examples.py (to a scratch folder)
    python examples/finetune.py --help

Everything is generated here with a fixed seed; nothing is downloaded.

1. **Data.** Multi-step arithmetic with worked solutions (operands below ``--max-operand``,
   every intermediate value below ``--max-value``, ``--n-ops`` steps)::

       prompt:   "9+3+8-1=?\\n"
       response: "9+3=12. 12+8=20. 20-1=19. A: 19"      (then <eos>)

   A fraction (``--noise-frac``, 20%) of the *training* responses are corrupted with an
   irrelevant sentence ("The quiet river sings near the old tower.") inserted at the
   whitespace nearest the middle, as in the paper's noise diagnostic (App. B.3). Held-out
   problems are never in the training set.
2. **Pre-training** (once, shared): a tiny GPT (``examples/tiny_lm.py``) learns from a packed
   stream of single-step facts (``"19-3=16."``), English-like sentences and worked problems
   (mostly one step; ``--pretrain-full`` of them with ``--n-ops`` steps), with plain SFT. It
   knows the facts and the format but rarely solves the multi-step problems.
3. **Fine-tuning**, once per weighting, from the same pre-trained weights, same batches:
   ``rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=...)`` on the final
   hidden states and the head (the fused-linear path: the reference implementation on CPU,
   the Triton kernels on a GPU). A progress bar (tqdm if installed) shows the running NLL and
   mean weight (``return_stats=True``, ignored positions masked with ``target != -100``);
   held-out exact-match accuracy every ``--eval-every`` steps (greedy decoding; correct when
   the first ``"A: <n>"`` has the right number and the generation stops right after it).
4. **Results**: a table of final accuracies, the curves PNG (NLL, objective, mean weight,
   accuracy; needs matplotlib), the noise-sensitivity table (paper Table 1's format) of the
   pre-trained and fine-tuned models, and a token-inspector page/PNG of one corrupted
   training response under the ranktuner-fine-tuned model. Files go to ``--out``
   (``--out-dir``; default ``examples/results``, but ``--quick`` writes to a scratch folder
   under the system's temporary directory unless ``--out`` is given): ``finetune_curves.png``, ``inspect_ranktuner.{html,png}``,
   ``results.json``, checkpoints ``tiny_lm_<name>.pt`` (loadable by
   ``python -m ranktuner_kernels.analysis.cli --model examples/tiny_lm.py:load_checkpoint``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_lm import CharTokenizer, TinyLM, TinyLMConfig, save_checkpoint  # noqa: E402

import ranktuner_kernels as rk  # noqa: E402
from ranktuner_kernels.analysis.noise_metric import insert_at_midpoint  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # optional: plain prints instead
    tqdm = None


@dataclass
class Config:
    seed: int = 0
    # data
    max_operand: int = 10          # operands in [0, max_operand)
    max_value: int = 30            # every intermediate value in [0, max_value)
    n_ops: int = 3                 # operations per problem (n_ops + 1 operands)
    n_train: int = 3000
    n_test: int = 400
    noise_frac: float = 0.2        # corrupted training responses
    # model
    d_model: int = 96
    n_layer: int = 3
    n_head: int = 4
    d_ff: int = 384
    max_len: int = 128
    # pre-training (plain SFT on a packed stream)
    pretrain_steps: int = 1200
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    pretrain_seq: int = 64
    pretrain_mix: tuple = (0.55, 0.2)  # fractions of facts and sentences; the rest worked problems
    pretrain_full: float = 0.15    # of the pre-training's worked problems, the fraction with n_ops
                                   # operations (the rest have one)
    # fine-tuning
    weightings: tuple = ("sft", "ranktuner", "dft")
    steps: int = 500
    lr: float = 2e-3
    batch_size: int = 32
    eval_every: int = 100
    eval_n: int = 200              # held-out problems in the periodic evaluations (the final one uses all)
    # noise diagnostic
    diag_n: int = 500              # the first diag_n clean training pairs
    # runtime
    device: str = "auto"
    impl: str = "auto"             # rk's implementation: auto = Triton on CUDA, reference on CPU
    out_dir: str = "examples/results"
    save: bool = True              # checkpoints, PNGs, HTML, results.json


#: ``--quick``: the shortened run of tests/test_examples.py.
#: where ``--quick`` writes unless ``--out`` is given (the committed ``examples/results`` hold the full run)
QUICK_OUT = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "finetune_quick")
QUICK = dict(max_operand=10, max_value=20, n_ops=2, n_train=1500, n_test=200, d_model=64, n_layer=2, d_ff=256,
             max_len=96, pretrain_steps=800, pretrain_lr=4e-3, pretrain_seq=48, steps=300, lr=2e-3, eval_every=100,
             eval_n=100, diag_n=200)


# ----------------------------------------------------------------------------- data

DET = ["The", "A", "Every", "My", "Our", "That"]
ADJ = ["quiet", "red", "small", "old", "bright", "lazy", "green", "happy", "tall", "cold"]
NOUN = ["cat", "river", "garden", "teacher", "train", "bird", "city", "painter", "wind", "baker"]
VERB = ["sleeps", "sings", "waits", "walks", "shines", "rests", "turns", "dreams", "listens", "hides"]
PREP = ["near", "under", "behind", "beside", "across", "above"]
PLACE = ["the hill", "the bridge", "the old tower", "the market", "the lake", "the station", "the forest"]
TAIL = ["", "", " every morning", " in the rain", " after dinner", " all summer"]


def make_sentence(rng: random.Random) -> str:
    """An irrelevant English-like sentence from a small grammar."""
    return f"{rng.choice(DET)} {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} {rng.choice(PREP)} {rng.choice(PLACE)}{rng.choice(TAIL)}."


def make_problem(rng: random.Random, cfg: Config, n_ops: int | None = None) -> tuple:
    """``(prompt, response, answer)``: ``n_ops`` (default ``cfg.n_ops``) chained
    additions/subtractions of operands
    in ``[0, max_operand)`` whose running value stays in ``[0, max_value)``, with the worked
    solution one step per sentence."""
    value = rng.randrange(min(cfg.max_operand, cfg.max_value))
    expr, steps = str(value), []
    for _ in range(cfg.n_ops if n_ops is None else n_ops):
        while True:
            op, b = rng.choice("+-"), rng.randrange(cfg.max_operand)
            new = value + b if op == "+" else value - b
            if 0 <= new < cfg.max_value:
                break
        expr += f"{op}{b}"
        steps.append(f"{value}{op}{b}={new}.")
        value = new
    return f"{expr}=?\n", " ".join(steps) + f" A: {value}", value


def make_fact(rng: random.Random, cfg: Config) -> str:
    """One step, ``"19-3=16."``, from the same ranges as the problems' steps."""
    while True:
        a, op, b = rng.randrange(cfg.max_value), rng.choice("+-"), rng.randrange(cfg.max_operand)
        c = a + b if op == "+" else a - b
        if 0 <= c < cfg.max_value:
            return f"{a}{op}{b}={c}."


def make_data(cfg: Config) -> dict:
    """Training and held-out problems (disjoint prompts), the corrupted training responses,
    and a pool of noise sentences, all from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    seen, train, test = set(), [], []
    for _ in range(100 * (cfg.n_train + cfg.n_test)):
        p, r, a = make_problem(rng, cfg)
        if p in seen:
            continue
        seen.add(p)
        (train if len(train) < cfg.n_train else test).append((p, r, a))
        if len(train) + len(test) == cfg.n_train + cfg.n_test:
            break
    else:
        raise ValueError(f"found only {len(seen)} distinct problems: lower n_train/n_test or raise max_operand, "
                         "max_value or n_ops")
    noisy = set(rng.sample(range(len(train)), round(cfg.noise_frac * len(train))))
    ft = []
    for i, (p, r, a) in enumerate(train):
        if i in noisy:
            pre, ins, post = insert_at_midpoint(r, make_sentence(rng))
            r = pre + ins + post
        ft.append((p, r, i in noisy))
    sentences = [make_sentence(rng) for _ in range(200)]
    return {"train": train, "test": test, "finetune": ft, "sentences": sentences}


def pretrain_batch(rng: random.Random, tok: CharTokenizer, cfg: Config, exclude: set) -> torch.Tensor:
    """``[B, pretrain_seq + 1]`` ids: BOS, then a packed stream of single-step facts
    (``"19-3=16."``), sentences and worked problems in the task's format, most with one
    operation, a fraction ``pretrain_full`` with ``n_ops`` (never a held-out prompt,
    ``exclude``), cut to length: the pre-trained model knows the facts and the format and
    has seen a few chains, like a math-pre-trained LLM before math fine-tuning."""
    rows = []
    for _ in range(cfg.pretrain_batch):
        text = ""
        while len(text) < cfg.pretrain_seq:
            u = rng.random()
            if u < cfg.pretrain_mix[0]:
                item = make_fact(rng, cfg)
            elif u < cfg.pretrain_mix[0] + cfg.pretrain_mix[1]:
                item = make_sentence(rng)
            else:
                p, r, _ = make_problem(rng, cfg, cfg.n_ops if rng.random() < cfg.pretrain_full else 1)
                if p in exclude:
                    continue
                item = p + r + "\n"
            text += item + " "
        rows.append([tok.bos_id] + tok.encode(text[: cfg.pretrain_seq]))
    return torch.tensor(rows)


def finetune_batch(rng: random.Random, tok: CharTokenizer, examples: list, cfg: Config) -> tuple:
    """Inputs ``[B, T]`` and targets ``[B, T]`` (next tokens; -100 on the prompt and the
    padding) of ``batch_size`` random fine-tuning examples."""
    seqs, labels = [], []
    for p, r, _ in (examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)):
        pi, ri = [tok.bos_id] + tok.encode(p), tok.encode(r) + [tok.eos_id]
        seq = (pi + ri)[: cfg.max_len + 1]
        seqs.append(seq)
        labels.append(([-100] * len(pi) + ri)[: len(seq)])
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), tok.pad_id)
    lab = torch.full((len(seqs), t), -100)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids[:, :-1], lab[:, 1:]


# ----------------------------------------------------------------------------- evaluation

ANSWER = re.compile(r"A: (\d+)")


def evaluate(model: TinyLM, tok: CharTokenizer, problems: list, cfg: Config) -> dict:
    """Greedy-decode each held-out prompt. ``accuracy`` (exact match): the generation's
    first ``A: <n>`` has the right ``n`` and the generation stops there (``<eos>``); the
    worked steps may differ. ``answer_right``: the first ``A: <n>`` is right, stopping or not.
    ``noisy_generations``: the fraction of generations with lowercase letters before that
    answer (the model reproducing an inserted-style sentence)."""
    prompts = [[tok.bos_id] + tok.encode(p) for p, _, _ in problems]
    longest = max(len(tok.encode(r)) for _, r, _ in problems)
    gens = model.generate_greedy(prompts, max_new_tokens=longest + 48, eos_id=tok.eos_id)
    correct = right = noisy = 0
    for (_, _, ans), g in zip(problems, gens):
        text = tok.decode(g)
        m = ANSWER.search(text)
        ok = m is not None and int(m.group(1)) == ans
        right += ok
        correct += ok and m.end() == len(text)
        noisy += any(c.islower() for c in (text[: m.end()] if m else text))
    n = len(problems)
    return {"accuracy": correct / n, "answer_right": right / n, "noisy_generations": noisy / n}


# ----------------------------------------------------------------------------- training

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


def train(model: TinyLM, next_batch, steps: int, lr: float, weighting, cfg: Config, desc: str,
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


# ----------------------------------------------------------------------------- outputs

def plot_curves(histories: dict, path: str, cfg: Config) -> str | None:
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


# ----------------------------------------------------------------------------- the run

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def provenance(argv: list | None = None) -> dict:
    """The commit (``describe``: ``git describe --always --dirty``), the command and the
    machine, recorded with every result file."""
    import platform
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    args = sys.argv[1:] if argv is None else list(argv)
    return {"commit": git("rev-parse", "HEAD"), "describe": git("describe", "--always", "--dirty"),
            "command": " ".join(["python examples/" + os.path.basename(__file__), *args]),
            "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def run(cfg: Config, quiet: bool = False, progress: bool | None = None, argv: list | None = None) -> dict:
    """The whole example; returns ``{"rows", "histories", "diagnostics", "files", "accuracy"}``
    (``rows``: accuracy per model, the untrained and pre-trained-only baselines first).
    ``quiet``: print nothing; ``progress``: progress bars and periodic evaluation lines
    (default: ``not quiet``)."""
    t_start = time.time()
    prov = provenance(argv)  # before the run: the commit of the code that runs
    cfg = copy.deepcopy(cfg)
    cfg.device = resolve_device(cfg.device)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    hush = quiet if progress is None else not progress  # progress bars and periodic evaluations
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    data = make_data(cfg)
    test, ft = data["test"], data["finetune"]
    n_noisy = sum(c for _, _, c in ft)
    say(f"device {cfg.device} ({'Triton kernels' if cfg.device.type == 'cuda' and cfg.impl != 'reference' else 'reference implementation'}); "
        f"{len(ft)} training problems ({n_noisy} with an inserted sentence), {len(test)} held-out")
    say(f"e.g. prompt {test[0][0]!r} -> response {test[0][1]!r}")
    if n_noisy:
        say(f"     corrupted: {next(r for _, r, c in ft if c)!r}")

    mcfg = TinyLMConfig(tok.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, d_ff=cfg.d_ff,
                        max_len=cfg.max_len)
    model = TinyLM(mcfg).to(cfg.device)
    rows = []
    sub = test[: cfg.eval_n]
    ev0 = evaluate(model, tok, sub, cfg)  # a random model: the subset is plenty
    rows.append({"name": "untrained (random init)", **ev0})

    # pre-training
    t0 = time.time()
    prng = random.Random(cfg.seed + 1)
    held_out = {p for p, _, _ in test}
    train(model, lambda: (lambda b: (b[:, :-1], b[:, 1:]))(pretrain_batch(prng, tok, cfg, held_out)), cfg.pretrain_steps,
          cfg.pretrain_lr, "sft", cfg, "pre-train", quiet=hush)
    base_state = copy.deepcopy(model.state_dict())
    ev_base = evaluate(model, tok, test, cfg)
    rows.append({"name": "pre-trained only", **ev_base, "seconds": time.time() - t0})
    say(f"pre-trained in {time.time() - t0:.0f} s; held-out accuracy before fine-tuning {ev_base['accuracy']:.1%}")

    files = {}
    if cfg.save:
        os.makedirs(cfg.out_dir, exist_ok=True)
        files["base"] = os.path.join(cfg.out_dir, "tiny_lm_pretrained.pt")
        save_checkpoint(files["base"], model, tok)

    histories, models = {}, {}
    for name in cfg.weightings:
        model.load_state_dict(base_state)
        frng = random.Random(cfg.seed + 2)  # the same batches for every weighting
        torch.manual_seed(cfg.seed + 2)
        t0 = time.time()
        hist = train(model, lambda: finetune_batch(frng, tok, ft, cfg), cfg.steps, cfg.lr, name, cfg, f"{name:>9}",
                     eval_fn=lambda final: evaluate(model, tok, test if final else sub, cfg), quiet=hush)
        secs = time.time() - t0
        histories[name] = hist
        models[name] = copy.deepcopy(model.state_dict())
        rows.append({"name": f"fine-tuned: {name}", "accuracy": hist["accuracy"][-1],
                     "answer_right": hist["answer_right"][-1], "noisy_generations": hist["noisy_generations"][-1],
                     "final_nll": sum(hist["nll"][-20:]) / len(hist["nll"][-20:]), "seconds": secs})
        if cfg.save:
            files[name] = os.path.join(cfg.out_dir, f"tiny_lm_{name}.pt")
            save_checkpoint(files[name], model, tok, weighting=name)

    say(f"\nFinal held-out exact-match accuracy ({len(test)} problems, greedy decoding; 'answer right': the first "
        "'A: <n>' is right, stopping or not; 'noisy gen.': generations containing an inserted-style sentence)")
    say(results_table(rows))

    # the noise-sensitivity diagnostic (paper App. B.3) on the clean training pairs, as the paper
    # does on its fine-tuning data; it corrupts 10% of them itself
    pairs = [(p, r) for p, r, _ in data["train"][: cfg.diag_n]]
    diagnostics = {}
    for label, state in [("pre-trained", base_state), *((f"fine-tuned: {n}", s) for n, s in models.items())]:
        model.load_state_dict(state)
        ns = rk.noise_sensitivity(model, pairs, data["sentences"], tok.encode, rho=0.1, seed=cfg.seed,
                               max_length=cfg.max_len, prefix_ids=[tok.bos_id], pad_id=tok.pad_id, impl=cfg.impl)
        diagnostics[label] = ns
        say("\n" + ns.table(f"Noise sensitivity, {label} model"))

    # token inspection of one corrupted training response under the ranktuner model
    if cfg.save and "ranktuner" in models:
        inspect_fn = rk.inspect
        model.load_state_dict(models["ranktuner"])
        p, r, _ = next(e for e in ft if e[2])
        ids = [tok.bos_id] + tok.encode(p) + tok.encode(r) + [tok.eos_id]
        labels = [-100] * (1 + len(tok.encode(p))) + ids[1 + len(tok.encode(p)):]
        html_path = os.path.join(cfg.out_dir, "inspect_ranktuner.html")
        png_path = os.path.join(cfg.out_dir, "inspect_ranktuner.png")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            png_path = None
        rk.inspect(model, ids, tok.token_strings(ids), labels=labels, weighting=rk.RankTuner(), html=html_path,
                   png=png_path, png_rows=("p_t", "entropy", "indicator", "weight"), line_chars=60,
                   title="Tiny LM (ranktuner-fine-tuned) on a corrupted training response",
                   print_table=False)
        files["inspect_html"] = html_path
        if png_path:
            files["inspect_png"] = png_path
        say(f"\ntoken inspection: {html_path}" + (f", {png_path}" if png_path else ""))

    if cfg.save:
        curves = plot_curves(histories, os.path.join(cfg.out_dir, "finetune_curves.png"), cfg)
        if curves:
            files["curves"] = curves
        summary = {"config": {k: (str(v) if k == "device" else v) for k, v in asdict(cfg).items()},
                   "provenance": prov,
                   "device": str(cfg.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "rows": rows, "seconds": time.time() - t_start,
                   "diagnostics": {k: {"rows": v.rows, "n_examples": v.n_examples, "n_corrupted": v.n_corrupted,
                                       "n_tokens": v.n_tokens, "n_noise_tokens": v.n_noise_tokens}
                                   for k, v in diagnostics.items()},
                   "histories": histories}
        files["results"] = os.path.join(cfg.out_dir, "results.json")
        with open(files["results"], "w") as f:
            json.dump(summary, f, indent=1)
        say("files: " + ", ".join(files.values()))
    say(f"total {time.time() - t_start:.0f} s")
    return {"rows": rows, "histories": histories, "diagnostics": diagnostics, "files": files,
            "accuracy": {r["name"].split(": ")[-1]: r["accuracy"] for r in rows}}


def parse_args(argv=None) -> tuple:
    """``(Config, argparse.Namespace)`` of the command line (``--quick`` without ``--out``:
    the scratch folder)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the shortened run of the test (about a minute on 2 CPU cores); "
                    f"writes to a scratch folder ({QUICK_OUT}) unless --out is given")
    ap.add_argument("--out", dest="out", default=None, help="output folder (same as --out-dir)")
    for f in fields(Config):
        if f.name in ("weightings", "save", "pretrain_mix"):
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"default {f.default}")
    ap.add_argument("--weightings", default=None, help="comma-separated (default sft,ranktuner,dft); any rk weighting name")
    ap.add_argument("--no-save", action="store_true", help="write no files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (the results are still printed)")
    args = ap.parse_args(argv)
    cfg = Config(**(QUICK if args.quick else {}))
    for f in fields(Config):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("weightings", "save", "pretrain_mix"):
            setattr(cfg, f.name, v)
    if args.weightings:
        cfg.weightings = tuple(w.strip() for w in args.weightings.split(",") if w.strip())
    if args.out is not None:
        cfg.out_dir = args.out
    elif args.quick and args.out_dir is None:
        cfg.out_dir = QUICK_OUT  # never over the committed full-run results
    cfg.save = not args.no_save
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    run(cfg, progress=not args.quiet, argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
