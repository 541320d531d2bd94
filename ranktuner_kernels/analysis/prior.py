"""Prior strength: how much a model already knows of a fine-tuning set, before fine-tuning.

"Beyond Log Likelihood" (arXiv 2510.00526, Sec. 2 and App. C.1, Table 6) places a task on the
*model-capability continuum* by the **mean predicted probability of the training targets**
before fine-tuning (its Eq. 5: the mean of ``p_t`` over every response token of the training
set) and reports that the best objective depends on it: NLL at the model-weak end, the
prior-leaning ``-p`` (``dft``) and thresholded ``-log p`` (``threshold``) at the model-strong end,
no single winner in between. :func:`prior_strength` measures that proxy, with the mean entropy,
the top-1 agreement, the share of tokens with ``p_t < 0.2`` (the paper's threshold) and a
histogram, streaming over the data with the fused statistics (:func:`rk.linear_cross_entropy`
with ``return_stats=True`` under ``torch.no_grad()``): the ``N x V`` logits are never held.

    import ranktuner_kernels as rk
    res = rk.analysis.prior_strength(model, batches)        # a transformers causal LM
    res = rk.analysis.prior_strength(tiny.hidden, batches, head=tiny.lm_head)   # any decoder + head
    print(res.summary()); res.plot("prior.png")

Command line (a causal LM folder and a JSONL of prompt/response pairs)::

    python -m ranktuner_kernels.analysis.prior --model PATH --data train.jsonl --png prior.png

What each region's evidence says and what this library's own runs found: ``docs/choosing.md``.
"""

from __future__ import annotations

import argparse
import inspect as _inspect
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch

from ..linear_loss import linear_cross_entropy

__all__ = ["prior_strength", "PriorStrength", "REFERENCE_POINTS", "REGION_BOUNDS", "region_of", "LOW_P", "main"]

#: arXiv 2510.00526, App. C.1, Table 6: ``(mean predicted probability, base model, training
#: set, region)``. (Its Sec. 2 quotes LLaMA-3.1-8B on math at 0.76; Table 6 gives 0.80, and
#: 0.76 for DeepSeekMath-7B: the table is used here.)
REFERENCE_POINTS = (
    (0.80, "LLaMA-3.1-8B", "math (NuminaMath-CoT)", "model-strong"),
    (0.76, "DeepSeekMath-7B", "math (NuminaMath-CoT)", "model-strong"),
    (0.80, "Qwen2.5-Math-1.5B", "math (NuminaMath-CoT)", "model-strong"),
    (0.81, "Qwen2.5-Math-7B", "math (NuminaMath-CoT)", "model-strong"),
    (0.50, "LLaMA-3.2-3B", "medical reasoning (m23k)", "intermediate"),
    (0.53, "LLaMA-3.1-8B", "medical reasoning (m23k)", "intermediate"),
    (0.56, "Qwen2.5-1.5B", "medical reasoning (m23k)", "intermediate"),
    (0.59, "Qwen2.5-Math-7B", "medical reasoning (m23k)", "intermediate"),
    (0.01, "LLaMA-3.2-3B", "figfont puzzles", "model-weak"),
    (0.01, "LLaMA-3.1-8B", "figfont puzzles", "model-weak"),
    (0.01, "Qwen2.5-1.5B", "figfont puzzles", "model-weak"),
    (0.07, "Qwen2.5-7B", "figfont puzzles", "model-weak"),
)
REGIONS = ("model-weak", "intermediate", "model-strong")


def _bounds() -> tuple:
    lo = {r: min(v for v, *_, g in REFERENCE_POINTS if g == r) for r in REGIONS}
    hi = {r: max(v for v, *_, g in REFERENCE_POINTS if g == r) for r in REGIONS}
    return tuple(round((hi[a] + lo[b]) / 2, 6) for a, b in zip(REGIONS, REGIONS[1:]))


#: The region boundaries: halfway between the nearest reference points of neighbouring regions
#: (0.285 and 0.675). Our choice: the paper gives its points, not boundaries.
REGION_BOUNDS = _bounds()
#: The paper's threshold: its thresholded ``-log p`` leaves out tokens with ``p_t < 0.2``.
LOW_P = 0.2
#: One line per region: what arXiv 2510.00526 (Tables 2-4) found there.
EVIDENCE = {
    "model-weak": "NLL (sft) beat -p (dft) by wide margins (arXiv 2510.00526, Table 4)",
    "intermediate": "-p and NLL within each other's variation; no objective prevailed (arXiv 2510.00526, Table 3)",
    "model-strong": "-p (dft) and -log p with p < 0.2 left out (threshold) beat NLL (arXiv 2510.00526, Table 2)",
}


def region_of(mean_p: float) -> str:
    """``"model-weak"``, ``"intermediate"`` or ``"model-strong"`` for a mean target probability
    (boundaries :data:`REGION_BOUNDS`)."""
    if not isinstance(mean_p, (int, float)) or not 0 <= mean_p <= 1:
        raise ValueError(f"mean_p: expected a number in [0, 1], got {mean_p!r}")
    return REGIONS[sum(mean_p >= b for b in REGION_BOUNDS)]


@dataclass
class PriorStrength:
    """The statistics of :func:`prior_strength` over ``n_tokens`` scored tokens.

    ``mean_p``: the mean target probability (the paper's proxy); ``mean_entropy``: the mean
    entropy of the predicted distribution (nats); ``top1``: the share of tokens whose target has
    the largest logit; ``low_share``: the share with ``p_t < LOW_P``; ``hist_counts``: token
    counts of ``p_t`` in ``len(hist_edges) - 1`` equal bins over ``[0, 1]``."""

    mean_p: float
    mean_entropy: float
    top1: float
    low_share: float
    n_tokens: int
    n_sequences: int
    hist_edges: list = field(default_factory=list)
    hist_counts: list = field(default_factory=list)

    @property
    def region(self) -> str:
        return region_of(self.mean_p)

    def nearest_reference(self) -> tuple:
        """The reference point of :data:`REFERENCE_POINTS` closest to :attr:`mean_p`."""
        return min(REFERENCE_POINTS, key=lambda r: abs(r[0] - self.mean_p))

    def summary(self) -> str:
        v, model, data, _ = self.nearest_reference()
        return "\n".join([
            f"prior strength over {self.n_tokens} response tokens of {self.n_sequences} sequences",
            f"  mean target probability  {self.mean_p:.3f}   (arXiv 2510.00526's proxy, Eq. 5)",
            f"  mean entropy             {self.mean_entropy:.3f} nats",
            f"  top-1 agreement          {100 * self.top1:.1f} %",
            f"  tokens with p_t < {LOW_P:g}     {100 * self.low_share:.1f} %",
            f"  region: {self.region} (boundaries {REGION_BOUNDS[0]:.3f} / {REGION_BOUNDS[1]:.3f}); "
            f"nearest reference point: {model} on {data}, {v:.2f}",
            f"  the paper's evidence there: {EVIDENCE[self.region]}; see docs/choosing.md"])

    def to_dict(self) -> dict:
        return {**asdict(self), "region": self.region, "nearest_reference": list(self.nearest_reference())}

    def plot(self, path: str, title: Optional[str] = None) -> Optional[str]:
        """A PNG: the histogram of ``p_t`` (share of tokens per bin, the mean and the 0.2
        threshold marked) above the continuum (the paper's reference points and this mean).
        Returns ``path``, or ``None`` without matplotlib."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return None
        colours = {"model-weak": "#4393c3", "intermediate": "#999999", "model-strong": "#d6604d"}
        fig = Figure(figsize=(7.5, 4.6), dpi=110)
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]})
        edges, counts = self.hist_edges, self.hist_counts
        total = max(1, sum(counts))
        top.bar(edges[:-1], [100 * c / total for c in counts], width=[b - a for a, b in zip(edges, edges[1:])],
                align="edge", color=colours[self.region], alpha=0.8, edgecolor="white")
        top.axvline(self.mean_p, color="k", lw=1.5, label=f"mean p_t = {self.mean_p:.3f}")
        top.axvline(LOW_P, color="k", ls=":", lw=1, label=f"p_t < {LOW_P:g}: {100 * self.low_share:.1f} % of tokens")
        top.set_xlim(0, 1)
        top.set_ylabel("% of tokens")
        top.set_xlabel("target probability p_t before fine-tuning")
        top.legend(fontsize=8, loc="upper center")
        for v, model, data, reg in REFERENCE_POINTS:
            bottom.plot(v, 0, "o", color=colours[reg], ms=6, alpha=0.7)
        for reg, (lo, hi) in zip(REGIONS, zip((0.0, *REGION_BOUNDS), (*REGION_BOUNDS, 1.0))):
            bottom.axvspan(lo, hi, color=colours[reg], alpha=0.08)
            bottom.text((lo + hi) / 2, 0.55, reg, ha="center", fontsize=8)
        bottom.plot(self.mean_p, 0, "k*", ms=14)
        bottom.set_xlim(0, 1)
        bottom.set_ylim(-0.5, 1)
        bottom.set_yticks([])
        bottom.set_xlabel("mean target probability (star: this model on this data; dots: arXiv 2510.00526, "
                          "Table 6)", fontsize=8)
        fig.suptitle(title or f"Prior strength: {self.mean_p:.3f} ({self.region}), {self.n_tokens} tokens", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        return path


# ----------------------------------------------------------------------------- the statistic

def _logit_transforms(model) -> list:
    """Candidate ``(softcap, temperature)`` pairs from the config's known logit transforms,
    the identity last (each is checked against the model's own logits before use)."""
    configs = [model.config, *(getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k))]
    cap = temp = None
    for c in configs:
        for key in ("final_logit_softcapping", "logits_soft_cap"):
            if isinstance(getattr(c, key, None), (int, float)) and getattr(c, key) > 0:
                cap = float(getattr(c, key))
        for key, inverse in (("logit_scale", True), ("lm_head_multiplier", True), ("logits_scaling", False)):
            v = getattr(c, key, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v != 1:
                temp = 1.0 / float(v) if inverse else float(v)
    out = [(cap, temp or 1.0), (cap, 1.0), (None, temp or 1.0), (None, 1.0)]
    return list(dict.fromkeys(out))


def _apply(z: torch.Tensor, softcap, temperature) -> torch.Tensor:
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


class _Transformers:
    """A transformers causal LM: the decoder's final hidden states captured by a forward hook
    during a forward that computes the logits of the last position only (``logits_to_keep=1``);
    those logits check the head and the logit transforms read from the config."""

    def __init__(self, model, softcap, temperature):
        if "logits_to_keep" not in _inspect.signature(model.forward).parameters:
            raise ValueError(f"model: {type(model).__name__}.forward takes no logits_to_keep, so its logits would be "
                             "materialised; pass a callable ids -> hidden states and head= instead")
        self.model, self.head = model, model.get_output_embeddings()
        self.decoder = model.get_decoder()
        self.candidates = ([(softcap, temperature or 1.0)] if softcap is not None or temperature is not None
                           else _logit_transforms(model))
        self.chosen = None

    def __call__(self, ids, mask):
        captured = []
        hook = self.decoder.register_forward_hook(lambda mod, args, out: captured.append(
            out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
        try:
            out = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        finally:
            hook.remove()
        hidden = captured[-1]
        if hidden.shape[:2] != ids.shape:
            raise ValueError(f"model: its decoder returned hidden states {tuple(hidden.shape)} for ids "
                             f"{tuple(ids.shape)}; prior_strength needs every position")
        dtype = self.head.weight.dtype
        up = torch.float64 if dtype == torch.float64 else torch.float32
        bias = getattr(self.head, "bias", None)
        last = torch.nn.functional.linear(hidden[:, -1].to(up), self.head.weight.to(up), None if bias is None else bias.to(up))
        want = out.logits[:, -1].to(up)
        # the same product in the model's dtype, computed twice: a few units of its rounding
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2) * (1 + float(want.abs().max()))
        for cand in ([self.chosen] if self.chosen else self.candidates):
            if float((_apply(last, *cand) - want).abs().max()) <= tol:
                self.chosen = cand
                return hidden
        raise ValueError(f"model: {type(self.model).__name__}'s logits are not its head applied to its decoder's "
                         f"hidden states with the logit transforms tried ({self.candidates}: softcap, temperature); "
                         "pass softcap= / temperature=, or a callable ids -> hidden states and head=")


def prior_strength(model, batches: Iterable[dict], *, head=None, softcap: Optional[float] = None,
                   temperature: Optional[float] = None, bins: int = 20, progress: bool = False,
                   impl: str = "auto", total: Optional[int] = None) -> PriorStrength:
    """The prior strength of ``model`` on ``batches`` (see the module docstring), no gradient.

    Args:
        model: a transformers causal LM (its head ``get_output_embeddings()``, its final hidden
            states from ``get_decoder()``, its logit soft-cap / scale read from the config and
            checked against its own logits of the last position), or, with ``head``, a callable
            ``input_ids [B, T] -> hidden states [B, T, D]`` (e.g. ``TinyLM.hidden``).
        batches: an iterable of dicts with ``input_ids`` ``[B, T]``, ``labels`` ``[B, T]``
            (unshifted, as transformers takes them: position ``t`` predicts ``labels[t + 1]``;
            ``-100`` on the prompt and padding) and optionally ``attention_mask``.
        head: with a callable ``model``: an ``nn.Linear`` or its ``[V, D]`` weight.
        softcap, temperature: the logit transforms (``z -> softcap*tanh(z/softcap)``, then
            ``z / temperature``); by default read from a transformers config, else none.
        bins: histogram bins of ``p_t`` over ``[0, 1]``.
        progress: a tqdm bar over the batches (if tqdm is installed; ``total`` its length).
        impl: the fused loss's implementation (``"auto"``: Triton on CUDA).

    Returns:
        a :class:`PriorStrength`; the sums are accumulated in float64.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    if head is None:
        if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_decoder")):
            raise TypeError("model: expected a transformers causal LM, or a callable ids -> hidden states with head=")
        run = _Transformers(model, softcap, temperature)
        weight, bias, param = run.head.weight, getattr(run.head, "bias", None), run.head.weight
    else:
        if not callable(model):
            raise TypeError(f"model: with head=, expected a callable ids -> hidden states, got {type(model).__name__}")
        weight = head.weight if isinstance(head, torch.nn.Module) else head
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError("head: expected an nn.Linear or a [V, D] weight tensor")
        bias = getattr(head, "bias", None) if isinstance(head, torch.nn.Module) else None
        run, param = (lambda ids, mask: model(ids)), weight
    cap_temp = (softcap, 1.0 if temperature is None else temperature)
    bar = batches
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(batches, total=total, desc="prior strength", unit="batch")
        except ImportError:
            pass
    sums = torch.zeros(4, dtype=torch.float64)
    hist = torch.zeros(bins, dtype=torch.float64)
    n = n_seq = 0
    with torch.no_grad():
        for i, batch in enumerate(bar):
            if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
                raise ValueError(f"batches[{i}]: expected a dict with 'input_ids' and 'labels'")
            ids, labels = batch["input_ids"].to(param.device), batch["labels"].to(param.device)
            if ids.dim() != 2 or labels.shape != ids.shape:
                raise ValueError(f"batches[{i}]: input_ids and labels must both be [B, T], got "
                                 f"{tuple(ids.shape)} and {tuple(labels.shape)}")
            mask = batch.get("attention_mask")
            hidden = run(ids, None if mask is None else mask.to(param.device))
            if head is None:
                cap_temp = run.chosen
            target = labels[:, 1:]
            _, st = linear_cross_entropy(hidden[:, :-1].to(weight.dtype), weight, target, linear_bias=bias,
                                         reduction="none", return_stats=True, softcap=cap_temp[0],
                                         temperature=cap_temp[1], impl=impl)
            keep = target != -100
            p = st["p_t"][keep].double()
            sums += torch.stack([p.sum(), st["entropy"][keep].double().sum(), st["accuracy"][keep].double().sum(),
                                 (p < LOW_P).double().sum()]).cpu()
            hist += torch.histc(p, bins=bins, min=0.0, max=1.0).cpu()
            n += int(keep.sum())
            n_seq += int(keep.any(dim=1).sum())
    if n == 0:
        raise ValueError("batches: no scored token (every label is -100)")
    s = (sums / n).tolist()
    return PriorStrength(mean_p=s[0], mean_entropy=s[1], top1=s[2], low_share=s[3], n_tokens=n, n_sequences=n_seq,
                         hist_edges=[k / bins for k in range(bins + 1)], hist_counts=[int(c) for c in hist.tolist()])


# ----------------------------------------------------------------------------- command line

def read_rows(path: str, prompt_key: str = "prompt", response_key: str = "response",
              max_examples: Optional[int] = None) -> list:
    """The objects of a JSONL file, each with string ``prompt_key`` and ``response_key`` (other
    keys kept); a ValueError names the line at fault, an empty file raises too."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(prompt_key), str) \
                    or not isinstance(row.get(response_key), str):
                raise ValueError(f"{path}:{n}: expected an object with string {prompt_key!r} and {response_key!r}")
            rows.append(row)
            if max_examples is not None and len(rows) >= max_examples:
                break
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def read_pairs(path: str, prompt_key: str = "prompt", response_key: str = "response",
               max_examples: Optional[int] = None) -> list:
    """``[(prompt, response), ...]`` from a JSONL file (:func:`read_rows`)."""
    return [(row[prompt_key], row[response_key]) for row in read_rows(path, prompt_key, response_key, max_examples)]


def tokenized_batches(tokenizer, pairs: list, batch_size: int, max_length: int, eos: bool = True):
    """Batches for :func:`prior_strength`: the prompt's ids (with the tokenizer's special
    prefix, labels ``-100``), then the response's and ``<eos>`` (scored), right-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for i in range(0, len(pairs), batch_size):
        rows = []
        for prompt, response in pairs[i: i + batch_size]:
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"]
            r = r + ([tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else [])
            rows.append(((p + r)[:max_length], ([-100] * len(p) + r)[:max_length]))
        t = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), t), pad)
        labels = torch.full((len(rows), t), -100)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for j, (a, b) in enumerate(rows):
            ids[j, : len(a)], labels[j, : len(b)], mask[j, : len(a)] = torch.tensor(a), torch.tensor(b), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ranktuner_kernels.analysis.prior", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a causal LM folder (or hub id) that from_pretrained reads")
    ap.add_argument("--data", required=True, help="JSONL, one object a line with the prompt and the response")
    ap.add_argument("--prompt-key", default="prompt")
    ap.add_argument("--response-key", default="response")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-examples", type=int, default=None, help="the first N examples (default: all)")
    ap.add_argument("--max-length", type=int, default=2048, help="tokens per example (cut)")
    ap.add_argument("--no-eos", action="store_true", help="do not score an <eos> after each response")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--png", help="write the histogram PNG here (needs matplotlib)")
    ap.add_argument("--json", help="write the statistics as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or (args.max_examples is not None and args.max_examples < 1):
        ap.error("--batch-size and --max-examples must be positive")
    try:
        pairs = read_pairs(args.data, args.prompt_key, args.response_key, args.max_examples)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    res = prior_strength(model, tokenized_batches(tokenizer, pairs, args.batch_size, args.max_length, not args.no_eos),
                         progress=not args.quiet, total=math.ceil(len(pairs) / args.batch_size))
    print(res.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res.to_dict(), "model": args.model, "data": args.data}, f, indent=1)
        print(f"json: {args.json}")
    if args.png:
        print(f"png: {args.png}" if res.plot(args.png) else "matplotlib is not installed: no PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
