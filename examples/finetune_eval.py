"""The evaluation of ``examples/finetune.py``: greedy exact match on the held-out problems
(:func:`evaluate`), and the noise-sensitivity diagnostic of the paper (App. B.3) on each model
(:func:`noise_diagnostics`). ``cfg`` is the run's ``finetune.Config``."""

from __future__ import annotations

import re

from tiny_lm import CharTokenizer, TinyLM

import ranktuner_kernels as rk

ANSWER = re.compile(r"A: (\d+)")


def evaluate(model: TinyLM, tok: CharTokenizer, problems: list, cfg) -> dict:
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


def noise_diagnostics(model: TinyLM, states: dict, data: dict, tok: CharTokenizer, cfg, say) -> dict:
    """``rk.noise_sensitivity`` of each model (``states``: label -> state dict, loaded into
    ``model`` in turn) on the first ``cfg.diag_n`` clean training pairs, as the paper does on
    its fine-tuning data (it corrupts 10% of them itself); each table goes to ``say``."""
    pairs = [(p, r) for p, r, _ in data["train"][: cfg.diag_n]]
    diagnostics = {}
    for label, state in states.items():
        model.load_state_dict(state)
        ns = rk.noise_sensitivity(model, pairs, data["sentences"], tok.encode, rho=0.1, seed=cfg.seed,
                                  max_length=cfg.max_len, prefix_ids=[tok.bos_id], pad_id=tok.pad_id, impl=cfg.impl)
        diagnostics[label] = ns
        say("\n" + ns.table(f"Noise sensitivity, {label} model"))
    return diagnostics
