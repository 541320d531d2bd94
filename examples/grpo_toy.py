"""GRPO on a toy verifiable task, on CPU in seconds: ranktuner_kernels.rl end to end.

Task: the prompt is two digits ``a, b``; the policy writes the two decimal digits of ``a + b``
(``7 + 8 -> "1 5"``, ``2 + 3 -> "0 5"``). The reward is verifiable: the fraction of the two
digits that are right (``correct`` = both right). The policy is a tiny autoregressive MLP
(``prompt + previous token + position -> next-token logits``), trained from scratch, no
downloads.

Each step samples ``--group`` answers for each of ``--questions`` prompts, computes GRPO
advantages (reward minus the group mean, over the group std; plus an entropy bonus in the
loss, ``--entropy-coef``, which keeps groups from collapsing), optionally adjusts them per
token with THR (``--thr-p``, the paper's exploitation / exploration knob; the hidden states
are the MLP's last layer, the LM head's input) and weights each question by EAST
(``--east-a``: answer-cluster entropy of the group's sampled answers), then takes
``--ppo-epochs`` clipped policy-gradient steps. The per-token log-probabilities come from
``rk.cross_entropy(logits, tokens, weighting="sft", reduction="none")`` (its negative), so the
gradient runs through the library's loss.

    python examples/grpo_toy.py                       # 150 steps (36 s on 2 CPU cores), reward curve at the end
    python examples/grpo_toy.py --thr-p 0.1 --east-a 1.0 --ratio gspo_token
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

import ranktuner_kernels as rk
from ranktuner_kernels.rl import answer_entropy, east_weights, policy_loss, thr_guided_advantages

DIGITS = 10  # vocabulary: the digits 0-9
LENGTH = 2  # response: tens and units digit of a + b
BOS = DIGITS  # "previous token" of the first position


class TinyPolicy(nn.Module):
    """Next-token logits from (a, b, previous token, position); returns logits and the
    hidden state that feeds the LM head."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.a = nn.Embedding(DIGITS, width)
        self.b = nn.Embedding(DIGITS, width)
        self.prev = nn.Embedding(DIGITS + 1, width)
        self.pos = nn.Embedding(LENGTH, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, DIGITS)

    def forward(self, a, b, prev):  # a, b: [N]; prev: [N, L] -> logits [N, L, V], hidden [N, L, W]
        x = self.a(a)[:, None] + self.b(b)[:, None] + self.prev(prev) + self.pos.weight[: prev.shape[1]]
        h = self.body(x)
        return self.head(h), h


def target_digits(a, b):
    s = a + b
    return torch.stack([s // 10, s % 10], dim=1)


@torch.no_grad()
def sample(policy, a, b, generator):
    """Sample ``LENGTH`` tokens per prompt, one position at a time."""
    prev = torch.full((a.numel(), LENGTH), BOS, dtype=torch.long)
    out = torch.empty(a.numel(), LENGTH, dtype=torch.long)
    for t in range(LENGTH):
        logits, _ = policy(a, b, prev[:, : t + 1])
        probs = torch.softmax(logits[:, t].float(), -1)
        out[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if t + 1 < LENGTH:
            prev[:, t + 1] = out[:, t]
    return out


def token_logp(policy, a, b, tokens):
    """``[N, L]`` log-probabilities of ``tokens`` through ``rk.cross_entropy``, plus the logits
    and hidden states."""
    prev = torch.cat([torch.full((tokens.shape[0], 1), BOS, dtype=torch.long), tokens[:, :-1]], dim=1)
    logits, hidden = policy(a, b, prev)
    nll = rk.cross_entropy(logits, tokens, weighting="sft", reduction="none")
    return -nll, logits, hidden


def grpo_advantages(reward, group, eps=1e-6):
    """``(r - mean_group) / (std_group + eps)`` per response."""
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups).index_add_(0, group, torch.ones_like(reward))
    mean = torch.zeros(n_groups).index_add_(0, group, reward) / count
    var = torch.zeros(n_groups).index_add_(0, group, (reward - mean[group]) ** 2) / (count - 1).clamp_min(1)
    return (reward - mean[group]) / (var.sqrt()[group] + eps)


def train(steps=150, questions=32, group_size=8, lr=2e-3, ppo_epochs=2, clip=0.2, ratio="token", thr_p=None,
          east_a=None, entropy_coef=0.05, seed=0, progress=True, log_every=None):
    """Run GRPO; returns a dict of per-step histories (``reward``, ``accuracy``, ``entropy`` of
    answers, ``east_w_min``/``east_w_max``, ``clip_frac``, ``thr_kept``) and the eval accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    policy = TinyPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    hist = {k: [] for k in ("reward", "accuracy", "answer_entropy", "east_w_min", "east_w_max", "clip_frac", "thr_kept")}
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="grpo", leave=False, file=sys.stdout)
        except ImportError:
            bar = None
    for step in range(steps):
        # prompts and a group of answers for each
        qa = torch.randint(0, 10, (questions,), generator=gen)
        qb = torch.randint(0, 10, (questions,), generator=gen)
        group = torch.arange(questions).repeat_interleave(group_size)
        a, b = qa[group], qb[group]
        policy.eval()
        tokens = sample(policy, a, b, gen)
        right = tokens == target_digits(a, b)
        reward = right.float().mean(1)
        correct = right.all(1)
        adv = grpo_advantages(reward, group)

        # EAST: entropy of each question's answer clusters -> weight with mean 1
        answers = [[tuple(x) for x in tokens[group == q].tolist()] for q in range(questions)]
        h = answer_entropy(answers)
        w = east_weights(h, east_a if east_a is not None else 1.0)
        if east_a is not None:
            adv = adv * w[group]

        with torch.no_grad():
            old_logp, logits, hidden = token_logp(policy, a, b, tokens)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        token_adv = adv[:, None].expand(-1, LENGTH)
        kept = float("nan")
        if thr_p is not None:
            token_adv, info = thr_guided_advantages(logits, tokens, adv, correct, group, mask=mask, hidden=hidden,
                                                    p=thr_p)
            kept = float(info["kept_frac"])

        policy.train()
        clip_frac = 0.0
        for _ in range(ppo_epochs):
            logp, logits, _ = token_logp(policy, a, b, tokens)
            ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
            loss, metrics = policy_loss(logp, old_logp, token_adv, mask, eps=clip, ratio=ratio, entropy=ent,
                                        entropy_coef=entropy_coef)
            opt.zero_grad()
            loss.backward()
            opt.step()
            clip_frac = float(metrics["clip_frac"])

        hist["reward"].append(float(reward.mean()))
        hist["accuracy"].append(float(correct.float().mean()))
        hist["answer_entropy"].append(float(h.mean()))
        hist["east_w_min"].append(float(w.min()))
        hist["east_w_max"].append(float(w.max()))
        hist["clip_frac"].append(clip_frac)
        hist["thr_kept"].append(kept)
        if bar is not None:
            bar.set_postfix(reward=f"{hist['reward'][-1]:.2f}", acc=f"{hist['accuracy'][-1]:.2f}",
                            H=f"{hist['answer_entropy'][-1]:.2f}")
            bar.update(1)
        elif log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  reward {hist['reward'][-1]:.3f}  accuracy {hist['accuracy'][-1]:.3f}  "
                  f"answer entropy {hist['answer_entropy'][-1]:.3f}", flush=True)
    if bar is not None:
        bar.close()
    # greedy accuracy on all 100 prompts
    with torch.no_grad():
        policy.eval()
        ea, eb = torch.arange(10).repeat_interleave(10), torch.arange(10).repeat(10)
        prev = torch.full((100, LENGTH), BOS, dtype=torch.long)
        out = torch.empty(100, LENGTH, dtype=torch.long)
        for t in range(LENGTH):
            logits, _ = policy(ea, eb, prev[:, : t + 1])
            out[:, t] = logits[:, t].argmax(-1)
            if t + 1 < LENGTH:
                prev[:, t + 1] = out[:, t]
        hist["greedy_accuracy"] = float((out == target_digits(ea, eb)).all(1).float().mean())
    return hist


def curve(values, buckets=10):
    """Mean of ``values`` over ``buckets`` equal slices, as text with a bar per slice."""
    n = len(values)
    rows = []
    for i in range(buckets):
        lo, hi = i * n // buckets, max((i + 1) * n // buckets, i * n // buckets + 1)
        chunk = [v for v in values[lo:hi] if not math.isnan(v)]
        m = sum(chunk) / len(chunk) if chunk else float("nan")
        rows.append(f"  steps {lo:4d}-{hi - 1:4d}  {m:5.3f}  " + "#" * int(round(40 * m)))
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--entropy-coef", type=float, default=0.05, help="entropy bonus (keeps groups from collapsing)")
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--ratio", choices=["token", "gspo_token"], default="token")
    ap.add_argument("--thr-p", type=float, default=None, help="THR-adjusted advantages with this p (e.g. 0.1)")
    ap.add_argument("--east-a", type=float, default=None, help="weight questions by EAST with exponent a")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    t0 = time.time()
    hist = train(steps=args.steps, questions=args.questions, group_size=args.group, lr=args.lr,
                 ppo_epochs=args.ppo_epochs, ratio=args.ratio, thr_p=args.thr_p, east_a=args.east_a,
                 entropy_coef=args.entropy_coef, seed=args.seed,
                 progress=not args.no_progress, log_every=max(args.steps // 10, 1))
    print(f"GRPO on 'a + b' digits: {args.steps} steps, {args.questions} questions x {args.group} samples, "
          f"ratio={args.ratio}, thr_p={args.thr_p}, east_a={args.east_a}  ({time.time() - t0:.1f} s)")
    print("mean reward (fraction of digits right):")
    print(curve(hist["reward"]))
    print("sampled accuracy (both digits right):")
    print(curve(hist["accuracy"]))
    print(f"answer-cluster entropy (nats): first {hist['answer_entropy'][0]:.2f}, last {hist['answer_entropy'][-1]:.2f}; "
          f"EAST weights (a={args.east_a if args.east_a is not None else 1.0}) last step: "
          f"min {hist['east_w_min'][-1]:.2f}, max {hist['east_w_max'][-1]:.2f}")
    if args.thr_p is not None:
        kept = [v for v in hist["thr_kept"] if not math.isnan(v)]
        print(f"THR: mean fraction of tokens trained on (high-|THR| or high-entropy) {sum(kept) / max(len(kept), 1):.2f}")
    print(f"greedy accuracy on all 100 prompts: {hist['greedy_accuracy']:.2f}")
    return hist


if __name__ == "__main__":
    main()
