"""EAST (entropy-based adaptive weighting for self-training) on both loss paths.

For each question the example samples several final answers from a toy "model", clusters them
(`rk.rl.answer_entropy`), maps the cluster entropies to question weights with the paper's
`f(h) = h^a N / sum h^a` (`rk.rl.east_weights`), and trains a tiny language model on the
self-generated responses with those weights as `sequence_weight`, once through
`rk.cross_entropy` on logits and once through `rk.linear_cross_entropy` on hidden states:
the two paths give the same loss and gradients.

    python examples/east_weights.py [--a 1.0] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch

import ranktuner_kernels as rk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=float, default=1.0, help="EAST exponent a (0: uniform weights)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    # 8 questions, 6 sampled final answers each: some questions are answered consistently
    # (low cluster entropy), others all over the place (high entropy)
    n_q, n_samples, vocab, seq, dim = 8, 6, 50, 12, 32
    spread = torch.linspace(0, 1, n_q)
    answers = [[int(torch.randint(0, 1 + int(5 * s), (1,), generator=g)) for _ in range(n_samples)] for s in spread]
    h = rk.rl.answer_entropy(answers)
    w = rk.rl.east_weights(h, args.a)
    print("question  answers              entropy  EAST weight")
    for i in range(n_q):
        print(f"{i:>8}  {str(answers[i]):<20} {float(h[i]):>7.3f}  {float(w[i]):>11.3f}")

    # the self-generated responses (token ids) of each question, next-token targets
    tokens = torch.randint(0, vocab, (n_q, seq + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[:, :3] = -100  # the question part of each sequence is not trained on
    emb = torch.nn.Embedding(vocab, dim)
    head = torch.nn.Linear(dim, vocab, bias=False)
    opt = torch.optim.Adam([*emb.parameters(), *head.parameters()], lr=3e-2)

    for step in range(args.steps):
        hidden = torch.tanh(emb(inputs))
        loss_logits = rk.cross_entropy(head(hidden), labels, weighting="sft", sequence_weight=w)
        g_logits = torch.autograd.grad(loss_logits, head.weight, retain_graph=True)[0]
        loss = rk.linear_cross_entropy(hidden, head.weight, labels, weighting="sft", sequence_weight=w)
        g_linear = torch.autograd.grad(loss, head.weight, retain_graph=True)[0]
        assert torch.allclose(loss, loss_logits, rtol=1e-5, atol=1e-6)
        assert torch.allclose(g_linear, g_logits, rtol=1e-4, atol=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:>3}: EAST-weighted loss {loss.item():.4f} (logits path {loss_logits.item():.4f})")
    return loss.item()


if __name__ == "__main__":
    main()
