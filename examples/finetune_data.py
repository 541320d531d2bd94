"""The data of ``examples/finetune.py``, all generated from a seed (nothing is downloaded):
multi-step arithmetic problems with worked solutions, single-step facts, English-like sentences
from a small grammar (the noise inserted into corrupted responses), and the batches of
pre-training (a packed stream) and fine-tuning (prompt + response, the prompt's labels -100).
``cfg`` is the run's ``finetune.Config``."""

from __future__ import annotations

import random

import torch
from tiny_lm import CharTokenizer

from ranktuner_kernels.analysis.noise_metric import insert_at_midpoint

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


def make_problem(rng: random.Random, cfg, n_ops: int | None = None) -> tuple:
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


def make_fact(rng: random.Random, cfg) -> str:
    """One step, ``"19-3=16."``, from the same ranges as the problems' steps."""
    while True:
        a, op, b = rng.randrange(cfg.max_value), rng.choice("+-"), rng.randrange(cfg.max_operand)
        c = a + b if op == "+" else a - b
        if 0 <= c < cfg.max_value:
            return f"{a}{op}{b}={c}."


def make_data(cfg) -> dict:
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


def pretrain_batch(rng: random.Random, tok: CharTokenizer, cfg, exclude: set) -> torch.Tensor:
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


def finetune_batch(rng: random.Random, tok: CharTokenizer, examples: list, cfg) -> tuple:
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
