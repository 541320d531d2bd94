"""The paper's metric: the noise-sensitivity diagnostic of the RankTuner paper (App. B.3, Table 1).

Does a token-importance score surface injected, semantically irrelevant text? A fraction
``rho`` (0.1) of (prompt, response) pairs get a noise sentence inserted into the response at
the whitespace nearest its midpoint; a causal LM scores every response token with three
indicators,

    entropy   s = H_t                 (entropy-dominant)
    prob      s = -log p_t            (prob-dominant)
    ranktuner s = 1 / I_t             (the Relative Rank Indicator, see
                                        :func:`ranktuner_kernels.analysis.indicator.relative_rank_terms`)

and for each indicator:

* token noise precision / recall @ rho: rank all response tokens of all examples by score
  (descending), take the top ``K = ceil(rho |T|)``; precision = noise tokens among them / K,
  recall = / all noise tokens;
* sequence noise hit @ rho: score each example by the mean score over a span (the noise span
  of a corrupted example; for a clean one a *length-matched mid-span*
  ``t0 = prompt_len + floor((out_len - L) / 2)``), take the top ``ceil(rho N)`` examples,
  count the corrupted ones among them.

Lower is better for all three (the score should not be attracted by noise).

Layout: the pure metric functions (:func:`top_fraction`, :func:`token_precision_recall`,
:func:`mid_span`, :func:`sequence_hit`, :func:`noise_metrics`) work on score arrays and
noise masks and know nothing of models; :func:`build_examples` makes the corrupted data set;
:func:`score_tokens` runs a model; :func:`noise_sensitivity` does all of it.

Choices the paper leaves open, made here and documented:

* ``K = ceil(rho * n)`` is computed exactly (``ceil(0.1 * 30) = 3``, not 4).
* Ties at the top-K boundary (``ties="expected"``, default): every tied item counts with the
  fraction of the remaining slots, i.e. the expected value under a uniformly random order of
  the ties (order-independent; counts can be fractional). ``ties="first"``: a stable sort, the
  earlier item wins (integer counts).
* The corrupted examples are ``ceil(rho_corrupt * N)`` indices drawn with ``random.Random(seed)``;
  every example also draws its noise sentence (the first sentence of a random text from the
  pool). A corrupted example gets it inserted; a clean one uses its token length as ``L`` of
  its length-matched mid-span, so clean and noise spans have the same length distribution.
* The inserted text is ``" " + sentence`` at the chosen whitespace; all its tokens are noise.
  Each part (prompt, response before the insertion, the insertion, the rest) is encoded
  separately and the ids concatenated, so the noise tokens are exactly known for any
  tokenizer (``encode`` must add no special tokens; use ``prefix_ids`` for a BOS).
* Scores: entropy in nats (the ranking is unit-free), ``-log p_t`` in nats, ``1/I_t``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..token_loss import token_stats
from .indicator import model_logits, relative_rank_terms

__all__ = [
    "RHO",
    "METHODS",
    "top_k_count",
    "top_fraction",
    "token_precision_recall",
    "mid_span",
    "sequence_hit",
    "noise_metrics",
    "first_sentence",
    "insert_at_midpoint",
    "NoisyExample",
    "build_examples",
    "score_tokens",
    "NoiseSensitivity",
    "noise_sensitivity",
]

RHO = 0.1
#: The three indicators, in the paper's table order: (key, row label).
METHODS = (("entropy", "Entropy-dominant (H)"), ("prob", "Prob-dominant (-log p)"), ("ranktuner", "RankTuner (1/I)"))


# ----------------------------------------------------------------------------- pure metrics

def top_k_count(n: int, rho: float) -> int:
    """``ceil(rho * n)``, without float noise (``rho = 0.1, n = 30`` gives 3)."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho: expected 0 < rho <= 1, got {rho!r}")
    return min(n, math.ceil(round(rho * n, 9)))


def top_fraction(scores, k: int, ties: str = "expected") -> np.ndarray:
    """Membership of each item in the top ``k`` by descending score, as floats in ``[0, 1]``
    summing to ``k``. ``ties="expected"``: items tied at the boundary share the remaining
    slots equally; ``"first"``: the earlier index wins (0/1 memberships). NaN raises."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(s).any():
        raise ValueError("scores: NaN")
    n = s.size
    if not 0 <= k <= n:
        raise ValueError(f"k: expected 0 <= k <= {n}, got {k}")
    out = np.zeros(n)
    if k == 0:
        return out
    if ties == "first":
        out[np.argsort(-s, kind="stable")[:k]] = 1.0
        return out
    if ties != "expected":
        raise ValueError(f"ties: expected 'expected' or 'first', got {ties!r}")
    v = np.sort(s)[::-1][k - 1]
    above, tied = s > v, s == v
    out[above] = 1.0
    out[tied] = (k - above.sum()) / tied.sum()
    return out


def token_precision_recall(scores, noise_mask, rho: float = RHO, ties: str = "expected") -> tuple:
    """Token noise precision and recall @ ``rho`` over all response tokens ``T`` (flattened
    ``scores`` and a same-shaped boolean ``noise_mask``): ``K = ceil(rho |T|)``,
    precision = ``|top-K ∩ N| / K``, recall = ``|top-K ∩ N| / |N|`` (NaN without noise)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = np.asarray(noise_mask, dtype=bool).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"noise_mask: expected {s.size} entries like scores, got {m.size}")
    k = top_k_count(s.size, rho)
    hits = float((top_fraction(s, k, ties) * m).sum())
    n_noise = int(m.sum())
    return (hits / k if k else float("nan")), (hits / n_noise if n_noise else float("nan"))


def mid_span(prompt_len: int, out_len: int, span_len: int) -> tuple:
    """The length-matched mid-span of a clean example, ``[t0, t0 + L)`` with
    ``t0 = prompt_len + floor((out_len - L) / 2)`` (absolute token positions); ``L`` is
    clipped to ``out_len``."""
    if out_len < 0 or prompt_len < 0 or span_len < 0:
        raise ValueError("mid_span: lengths must be >= 0")
    length = min(span_len, out_len)
    t0 = prompt_len + (out_len - length) // 2
    return t0, t0 + length


def sequence_hit(span_scores, corrupted, rho: float = RHO, ties: str = "expected") -> float:
    """Sequence noise hit @ ``rho``: the number of corrupted examples among the top
    ``ceil(rho N)`` examples by span score (descending)."""
    s = np.asarray(span_scores, dtype=np.float64).reshape(-1)
    c = np.asarray(corrupted, dtype=bool).reshape(-1)
    if s.shape != c.shape:
        raise ValueError(f"corrupted: expected {s.size} entries like span_scores, got {c.size}")
    return float((top_fraction(s, top_k_count(s.size, rho), ties) * c).sum())


def noise_metrics(scores: Sequence, noise_spans: Sequence, span_lengths: Sequence, rho: float = RHO,
                  ties: str = "expected") -> dict:
    """Precision, recall and hit for one indicator.

    Args:
        scores: per example, the scores of its response tokens (position 0 = the first
            response token).
        noise_spans: per example, ``(start, end)`` of the injected noise within the response
            (same coordinates), or ``None`` for a clean example.
        span_lengths: per example, ``L_i``: used for the clean examples' mid-spans (ignored for
            corrupted ones, whose span is the noise).

    Returns ``{"precision", "recall", "hit", "hit_rate", "k_tokens", "k_examples"}``;
    ``hit_rate = hit / ceil(rho N)``. An example whose span is empty scores ``-inf``.
    """
    if not (len(scores) == len(noise_spans) == len(span_lengths)):
        raise ValueError("scores, noise_spans and span_lengths: one entry per example")
    flat, mask, span_scores, corrupted = [], [], [], []
    for sc, ns, length in zip(scores, noise_spans, span_lengths):
        sc = np.asarray(sc, dtype=np.float64).reshape(-1)
        m = np.zeros(sc.size, dtype=bool)
        if ns is not None:
            a, b = max(0, ns[0]), min(sc.size, ns[1])
            m[a:b] = True
            span = (a, b)
        else:
            span = mid_span(0, sc.size, int(length))
        flat.append(sc)
        mask.append(m)
        seg = sc[span[0]:span[1]]
        span_scores.append(float(seg.mean()) if seg.size else -math.inf)
        corrupted.append(ns is not None)
    flat_s = np.concatenate(flat) if flat else np.zeros(0)
    flat_m = np.concatenate(mask) if mask else np.zeros(0, dtype=bool)
    prec, rec = token_precision_recall(flat_s, flat_m, rho, ties)
    hit = sequence_hit(span_scores, corrupted, rho, ties)
    k_ex = top_k_count(len(span_scores), rho)
    return {"precision": prec, "recall": rec, "hit": hit, "hit_rate": hit / k_ex if k_ex else float("nan"),
            "k_tokens": top_k_count(flat_s.size, rho), "k_examples": k_ex}


# ----------------------------------------------------------------------------- building the data

_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s|$)")


def first_sentence(text: str) -> str:
    """The text up to and including the first ``.``, ``!`` or ``?`` followed by whitespace or
    the end (the whole stripped text if there is none)."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    return text[: m.start()] if m else text


def insert_at_midpoint(response: str, noise: str) -> tuple:
    """``(pre, inserted, post)`` with ``pre + inserted + post`` the noisy response: the
    insertion ``" " + noise`` goes at the whitespace character nearest ``len(response) / 2``
    (the earlier one on a tie), before it; without whitespace, at the end."""
    ws = [i for i, c in enumerate(response) if c.isspace()]
    mid = len(response) / 2
    cut = min(ws, key=lambda i: (abs(i - mid), i)) if ws else len(response)
    return response[:cut], " " + noise, response[cut:]


@dataclass
class NoisyExample:
    """One tokenised example: ``ids`` (prefix + prompt + response, truncated), the prompt's
    length in tokens (prefix included), the response's (after truncation), the noise span
    within the response (``None`` when clean) and ``span_len`` (``L_i``)."""

    ids: list
    prompt_len: int
    out_len: int
    noise_span: Optional[tuple]
    span_len: int
    noise_text: str = ""


def build_examples(pairs: Sequence, noise_sentences: Sequence[str], encode: Callable, *, rho: float = RHO,
                   seed: int = 0, max_length: Optional[int] = None, prefix_ids: Sequence[int] = (),
                   take_first_sentence: bool = True) -> list:
    """Tokenised examples, ``ceil(rho N)`` of them corrupted (see the module docstring)."""
    if not noise_sentences:
        raise ValueError("noise_sentences: empty")
    n = len(pairs)
    rng = random.Random(seed)
    corrupted = set(rng.sample(range(n), top_k_count(n, rho))) if n else set()
    examples = []
    for i, (prompt, response) in enumerate(pairs):
        noise = rng.choice(noise_sentences)
        noise = first_sentence(noise) if take_first_sentence else noise.strip()
        p_ids = list(prefix_ids) + list(encode(prompt))
        if i in corrupted:
            pre, ins, post = insert_at_midpoint(response, noise)
            a, b, c = list(encode(pre)), list(encode(ins)), list(encode(post))
            r_ids = a + b + c
            span = (len(a), len(a) + len(b))
            span_len = len(b)
        else:
            r_ids = list(encode(response))
            span = None
            span_len = len(encode(" " + noise))
        ids = p_ids + r_ids
        if max_length is not None:
            ids = ids[:max_length]
        prompt_len = min(len(p_ids), len(ids))
        out_len = len(ids) - prompt_len
        if span is not None:
            span = (min(span[0], out_len), min(span[1], out_len))
            span_len = span[1] - span[0]
        examples.append(NoisyExample(ids, prompt_len, out_len, span, span_len, noise if i in corrupted else ""))
    return examples


# ----------------------------------------------------------------------------- running a model

def score_tokens(model, examples: Sequence[NoisyExample], *, batch_size: int = 32, pad_id: int = 0,
                 device=None, impl: str = "auto") -> list:
    """Per example, ``{"entropy", "prob", "ranktuner"}`` score arrays over its response tokens
    (token ``t`` scored by the logits of position ``t - 1``). Sequences are right-padded with
    ``pad_id`` (harmless for a causal LM) and batched; no gradient."""

    if device is None:
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) and any(
            True for _ in model.parameters()) else torch.device("cpu")
    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    out = []
    try:
        for b0 in range(0, len(examples), batch_size):
            batch = examples[b0:b0 + batch_size]
            t = max(len(e.ids) for e in batch)
            ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
            tgt = torch.full((len(batch), t), -100, dtype=torch.long)
            for r, e in enumerate(batch):
                if e.prompt_len == 0 and e.out_len:
                    raise ValueError("an example has no prompt token: nothing predicts its first response token")
                ids[r, : len(e.ids)] = torch.tensor(e.ids)
                tgt[r, e.prompt_len: len(e.ids)] = torch.tensor(e.ids[e.prompt_len:])
            with torch.no_grad():
                logits = model_logits(model, ids.to(device))
                st = token_stats(logits[:, :-1], tgt[:, 1:].to(logits.device), impl=impl)
                terms = relative_rank_terms(st)
            ent = st["entropy"].double().cpu().numpy()
            nlp = (-st["logp_t"]).double().cpu().numpy()
            inv_i = (1.0 / terms["indicator"]).double().cpu().numpy()
            for r, e in enumerate(batch):
                sl = slice(e.prompt_len - 1, len(e.ids) - 1)  # rows predicting the response tokens
                out.append({"entropy": ent[r, sl].copy(), "prob": nlp[r, sl].copy(), "ranktuner": inv_i[r, sl].copy()})
    finally:
        if was_training:
            model.train()
    return out


@dataclass
class NoiseSensitivity:
    """The diagnostic's numbers; :meth:`table` prints them in the paper's format (Table 1)."""

    rho: float
    n_examples: int
    n_corrupted: int
    n_tokens: int
    n_noise_tokens: int
    rows: dict = field(default_factory=dict)  # method key -> noise_metrics(...) dict
    ties: str = "expected"

    def table(self, title: str = "Noise sensitivity") -> str:
        pct = f"{100 * self.rho:g}%"
        cols = (f"TOK PREC@{pct} (↓)", f"TOK REC@{pct} (↓)", f"SEQ HIT@{pct} (↓)")
        w = max(len(lbl) for _, lbl in METHODS)
        k_ex = top_k_count(self.n_examples, self.rho)
        lines = [f"{title}: {self.n_examples} examples, {self.n_corrupted} corrupted, {self.n_tokens} response tokens, "
                 f"{self.n_noise_tokens} noise tokens; top {pct} = {top_k_count(self.n_tokens, self.rho)} tokens / {k_ex} examples",
                 f"{'METHOD':<{w}}  {cols[0]:>17}  {cols[1]:>17}  {cols[2]:>24}"]
        for key, lbl in METHODS:
            r = self.rows[key]
            hit = f"{100 * r['hit_rate']:.0f}% ({r['hit']:g}/{k_ex})"
            lines.append(f"{lbl:<{w}}  {100 * r['precision']:>16.2f}%  {100 * r['recall']:>16.2f}%  {hit:>24}")
        base_p = self.n_noise_tokens / self.n_tokens if self.n_tokens else float("nan")
        base_hit = self.n_corrupted / self.n_examples if self.n_examples else float("nan")
        lines.append(f"{'(random scores)':<{w}}  {100 * base_p:>16.2f}%  {100 * min(1.0, self.rho):>16.2f}%  "
                     f"{f'{100 * base_hit:.0f}% (expected)':>24}")
        return "\n".join(lines)

    def markdown(self) -> str:
        pct = f"{100 * self.rho:g}%"
        k_ex = top_k_count(self.n_examples, self.rho)
        lines = [f"| method | tok prec@{pct} (↓) | tok rec@{pct} (↓) | seq hit@{pct} (↓) |", "|---|---|---|---|"]
        for key, lbl in METHODS:
            r = self.rows[key]
            lines.append(f"| {lbl} | {100 * r['precision']:.2f}% | {100 * r['recall']:.2f}% | "
                         f"{100 * r['hit_rate']:.0f}% ({r['hit']:g}/{k_ex}) |")
        base_p = self.n_noise_tokens / self.n_tokens if self.n_tokens else float("nan")
        lines.append(f"| (random scores) | {100 * base_p:.2f}% | {100 * self.rho:.2f}% | "
                     f"{100 * self.n_corrupted / max(self.n_examples, 1):.0f}% |")
        return "\n".join(lines)


def noise_sensitivity(model, pairs: Sequence, noise_sentences: Sequence[str], encode: Callable, *,
                      rho: float = RHO, corrupt_rho: Optional[float] = None, seed: int = 0,
                      max_length: Optional[int] = None, prefix_ids: Sequence[int] = (), pad_id: int = 0,
                      batch_size: int = 32, device=None, impl: str = "auto", ties: str = "expected",
                      take_first_sentence: bool = True) -> NoiseSensitivity:
    """The paper's App. B.3 diagnostic on ``model`` (a causal LM: ids ``[B, T]`` -> logits
    ``[B, T, V]`` or an object with ``.logits``) over ``pairs`` of (prompt, response) strings,
    corrupting ``ceil(corrupt_rho N)`` of them (``corrupt_rho`` defaults to ``rho``) with the
    first sentence of a random text from ``noise_sentences``; ``encode(str) -> list[int]``
    adds no special tokens (``prefix_ids``, e.g. ``[bos_id]``, start every sequence);
    ``max_length`` truncates. Returns a :class:`NoiseSensitivity`; ``.table()`` prints it."""
    examples = build_examples(pairs, noise_sentences, encode, rho=rho if corrupt_rho is None else corrupt_rho,
                              seed=seed, max_length=max_length, prefix_ids=prefix_ids,
                              take_first_sentence=take_first_sentence)
    scores = score_tokens(model, examples, batch_size=batch_size, pad_id=pad_id, device=device, impl=impl)
    spans = [e.noise_span for e in examples]
    lengths = [e.span_len for e in examples]
    rows = {key: noise_metrics([s[key] for s in scores], spans, lengths, rho, ties) for key, _ in METHODS}
    return NoiseSensitivity(rho=rho, n_examples=len(examples), n_corrupted=sum(s is not None for s in spans),
                            n_tokens=sum(e.out_len for e in examples),
                            n_noise_tokens=sum(s[1] - s[0] for s in spans if s is not None), rows=rows, ties=ties)
