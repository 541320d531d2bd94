"""The token inspector: per-token ``p_t``, ``H_t``, rank ``R_t``, the Relative Rank Indicator
``I_t`` and a weighting's weight ``w_t`` (:func:`inspect`, ``rk.inspect``), computed into an
:class:`Inspection` and rendered by one module per output: a colour-coded self-contained HTML
page (:mod:`.render_html`), a PNG in the layout of the RankTuner paper's Fig. 1/4, rows of
coloured tokens (:mod:`.render_png`), and a compact terminal table (:mod:`.render_table`); the
two graphical outputs share their colour scales (:mod:`.style`).

    import ranktuner_kernels as rk
    res = rk.inspect(model, token_ids, tokens, labels=labels, weighting=rk.RankTuner(),
                     html="tokens.html", png="tokens.png")

Command line: ``python -m ranktuner_kernels.analysis.cli --help`` (:mod:`.cli`).

The Relative Rank Indicator (paper Def. 4.2, Eq. 2) compares the realised rank of the target
with its expected rank: ``I_t = g(f(R_t) - f(E[R_t]))`` with ``f(x) = 1 / log2(x + 1)`` and
``g(x) = 2^x``. The statistics the kernels return hold ``R_t`` but not ``E[R_t]``; as in the
paper's Algorithm 1 (and SPEC.md), ``E[R_t]`` is replaced by its entropy lower bound ``s(H_t)``
(paper Eq. 5), see :func:`.indicator.relative_rank_terms`. ``I_t = 1`` is the neutral value (the target
ranks where the entropy says it should); ``I_t > 1``: the target ranks better than expected;
``I_t < 1``: worse. Since ``R_t >= 1`` and ``s >= 1``, ``I_t`` lies in ``(1/2, 2]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..token_loss import cross_entropy
from ..weightings import describe
from . import render_html, render_png, render_table
from .indicator import model_logits, relative_rank_terms
from .style import display_text, row_scales

__all__ = ["inspect", "Inspection"]


# ----------------------------------------------------------------------------- running models

def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the result

@dataclass
class Inspection:
    """Per-position results of :func:`inspect`; arrays have one entry per shown token, NaN
    where the position has no prediction (the first token of a causal text) or its target is
    ignored. Its outputs: :meth:`table` (terminal), :meth:`to_html` / :meth:`save_html`,
    :meth:`save_png`."""

    tokens: list
    target: np.ndarray        # int64, ignore_index where not scored
    kept: np.ndarray          # bool
    p_t: np.ndarray
    entropy_bits: np.ndarray
    rank: np.ndarray
    s: np.ndarray             # s(H_t)
    indicator: np.ndarray     # I_t
    weight: np.ndarray        # w_t of the weighting
    weighting: str
    vocab_size: int
    title: str = "Token inspection"
    html_path: Optional[str] = None
    png_path: Optional[str] = None

    #: a token as the HTML and the PNG show it (:func:`.style.display_text`)
    _display = staticmethod(display_text)

    def __len__(self):
        return len(self.tokens)

    def scales(self) -> dict:
        """The colour scale of each row (:func:`.style.row_scales`)."""
        return row_scales(self)

    def values(self, key: str) -> np.ndarray:
        return {"p_t": self.p_t, "entropy": self.entropy_bits, "indicator": self.indicator,
                "rank": self.rank, "weight": self.weight}[key]

    def table(self, max_rows: Optional[int] = 60) -> str:
        """A compact text table, one row per position (the first ``max_rows``, ``None``: all)."""
        return render_table.table(self, max_rows)

    def to_html(self, rows: Sequence[str] = ("p_t", "entropy", "indicator", "rank", "weight")) -> str:
        """The whole page as one string: inline CSS, no scripts, no external resources; every
        token's text is HTML-escaped."""
        return render_html.to_html(self, rows)

    def save_html(self, path) -> str:
        self.html_path = render_html.save_html(self, path)
        return self.html_path

    def _layout(self, line_chars: int):
        """The PNG's token pieces and line count (:func:`.render_png.layout`)."""
        return render_png.layout(self, line_chars)

    def save_png(self, path, rows: Sequence[str] = ("p_t", "entropy", "indicator"), line_chars: int = 100,
                 fontsize: float = 10.0, dpi: int = 150) -> str:
        """The paper's layout (Fig. 4): one panel of coloured tokens per row in ``rows``
        (default ``p_t``, ``H_t``, ``I_t``; add ``"weight"`` or ``"rank"``), each with its
        colour bar; long texts wrap at ``line_chars`` columns. Needs matplotlib."""
        require_matplotlib()
        self.png_path = render_png.save_png(self, path, rows, line_chars, fontsize, dpi)
        return self.png_path


# ----------------------------------------------------------------------------- the function

def _as_1d_long(x, name) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name}: expected one sequence ([T] or [1, T]), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids, got {t.dtype}")
    return t.long()


def _token_strings(ids: list, tokens, decode, n: int, name: str) -> list:
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if len(tokens) != n:
            raise ValueError(f"tokens: expected {n} strings (one per {name}), got {len(tokens)}")
        return tokens
    if decode is not None:
        out = []
        for i in ids:
            if i < 0:
                out.append("")
                continue
            try:
                out.append(str(decode([i])))
            except TypeError:
                out.append(str(decode(i)))
        return out
    return [f"[{i}]" if i >= 0 else "" for i in ids]


def require_matplotlib() -> None:
    """Import matplotlib (the PNG needs it), or raise an ImportError naming the extra to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError('png: writing the PNG needs matplotlib, which is not installed: '
                          'pip install "ranktuner-kernels[examples]" (or pip install matplotlib)') from e


def inspect(
    source,
    token_ids=None,
    tokens: Optional[Sequence[str]] = None,
    *,
    target=None,
    decode: Optional[Callable] = None,
    labels=None,
    weighting="sft",
    ignore_index: int = -100,
    html=None,
    png=None,
    png_rows: Sequence[str] = ("p_t", "entropy", "indicator"),
    line_chars: int = 100,
    print_table: bool = True,
    max_table_rows: Optional[int] = 60,
    title: str = "Token inspection",
    impl: str = "auto",
    file=None,
) -> Inspection:
    """Per-token ``p_t``, ``H_t``, rank, ``I_t`` and the weight of ``weighting``, as HTML, PNG
    and a terminal table.

    Two ways to give the text:

    * **causal** (``token_ids`` given): ``source`` is a causal LM (any callable taking
      ``[1, T]`` ids and returning logits ``[1, T, V]``, or an object with ``.logits``) or its
      logits for these ids, ``[T, V]`` / ``[1, T, V]`` (row ``t`` predicts token ``t + 1``) or
      already shifted ``[T - 1, V]``. Token ``t >= 1`` is scored against its prefix; token 0
      is shown unscored. ``labels`` (``[T]``, Hugging Face style: the ids, with
      ``ignore_index`` at positions not to score, e.g. the prompt) selects what is scored.
      ``tokens`` has one string per id.
    * **aligned** (``target`` given): ``source`` is logits ``[N, V]`` whose row ``i`` is scored
      against ``target[i]`` (exactly what ``rk.cross_entropy`` takes; ``ignore_index`` entries
      are shown unscored). ``tokens`` has one string per target.

    Token strings come from ``tokens``, else from ``decode`` (called as ``decode([id])``, or
    ``decode(id)`` if that raises ``TypeError``), else ``[id]``.

    Args:
        weighting: any weighting ``rk.cross_entropy`` takes (``"ranktuner"``, ``rk.DFT()``, ...);
            its per-token weight ``w_t`` is shown. Default ``"sft"``, as at every entry point of
            the library (``w = 1``: the weight panel is then all white).
        html, png: paths to write (``None``: not written). The PNG needs matplotlib (the
            ``examples`` extra); without it a ``png`` raises ImportError, before anything is written.
        png_rows: panels of the PNG, from ``"p_t"``, ``"entropy"``, ``"indicator"``, ``"rank"``,
            ``"weight"`` (default: the paper's three rows).
        line_chars: wrap width of the PNG, in characters.
        print_table: print :meth:`Inspection.table` (to ``file``, default stdout).
        max_table_rows: rows of that table (``None``: all).
        impl: the statistics' implementation (``"auto"``, ``"reference"``, ``"triton"``).

    Returns:
        an :class:`Inspection` (numbers per position, ``to_html()``, ``save_png()``, ``table()``).
    """
    if (token_ids is None) == (target is None):
        raise ValueError("give exactly one of token_ids (causal text) and target (logits aligned with targets)")
    if png is not None:
        require_matplotlib()  # before any work, and before the HTML is written

    if token_ids is not None:
        ids = _as_1d_long(token_ids, "token_ids")
        t = ids.numel()
        if t < 2:
            raise ValueError("token_ids: need at least 2 tokens (the first is never scored)")
        lab = ids if labels is None else _as_1d_long(labels, "labels")
        if lab.numel() != t:
            raise ValueError(f"labels: expected {t} entries like token_ids, got {lab.numel()}")
        if isinstance(source, torch.Tensor):
            logits = source[0] if source.dim() == 3 and source.shape[0] == 1 else source
            if logits.dim() != 2 or logits.shape[0] not in (t, t - 1):
                raise ValueError(f"logits: expected [T, V] or [T-1, V] with T={t}, got {tuple(source.shape)}")
            logits = logits[: t - 1]
        elif callable(source):
            device = _model_device(source)
            with torch.no_grad():
                out = model_logits(source, ids[None].to(device))
            if out.dim() != 3 or out.shape[1] != t:
                raise ValueError(f"model: expected logits [1, {t}, V], got {tuple(out.shape)}")
            logits = out[0, : t - 1]
        else:
            raise TypeError(f"source: expected a causal LM (callable) or a logits tensor, got {type(source).__name__}")
        tgt = lab[1:].to(logits.device)
        shown_ids = ids.tolist()
        strings = _token_strings(shown_ids, tokens, decode, t, "token id")
        # position 0 is unscored; position t >= 1 gets row t - 1
        row_of_pos = list(range(-1, t - 1))
    else:
        if not isinstance(source, torch.Tensor):
            raise TypeError("target given: source must be a logits tensor [N, V]")
        logits = source[0] if source.dim() == 3 and source.shape[0] == 1 else source
        tgt = _as_1d_long(target, "target").to(logits.device)
        if logits.dim() != 2 or logits.shape[0] != tgt.numel():
            raise ValueError(f"logits: expected [N, V] with N={tgt.numel()} (len(target)), got {tuple(source.shape)}")
        strings = _token_strings(tgt.tolist(), tokens, decode, tgt.numel(), "target")
        row_of_pos = list(range(tgt.numel()))

    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits: expected a floating dtype, got {logits.dtype}")
    if logits.dtype == torch.float64 and logits.device.type == "cuda":
        logits = logits.float()
    with torch.no_grad():
        _, st = cross_entropy(logits.detach()[None], tgt[None], weighting=weighting, ignore_index=ignore_index,
                              reduction="none", return_stats=True, impl=impl)
    keep_rows = (tgt != ignore_index).cpu().numpy()
    terms = relative_rank_terms(st)

    def per_pos(x, fill=np.nan, dtype=np.float64):
        x = x.reshape(-1).detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x).reshape(-1)
        out = np.full(len(row_of_pos), fill, dtype=dtype)
        for pos, row in enumerate(row_of_pos):
            if row >= 0 and keep_rows[row]:
                out[pos] = x[row]
        return out

    kept = np.zeros(len(row_of_pos), dtype=bool)
    target_pos = np.full(len(row_of_pos), ignore_index, dtype=np.int64)
    tgt_np = tgt.cpu().numpy()
    for pos, row in enumerate(row_of_pos):
        if row >= 0:
            target_pos[pos] = tgt_np[row]
            kept[pos] = bool(keep_rows[row])

    res = Inspection(
        tokens=strings, target=target_pos, kept=kept,
        p_t=per_pos(st["p_t"]), entropy_bits=per_pos(st["entropy_bits"]), rank=per_pos(st["rank"]),
        s=per_pos(terms["s"]), indicator=per_pos(terms["indicator"]), weight=per_pos(st["weight"]),
        weighting=describe(weighting), vocab_size=int(logits.shape[-1]), title=title,
    )
    if html is not None:
        res.save_html(html)
    if png is not None:
        res.save_png(png, rows=png_rows, line_chars=line_chars)
    if print_table:
        print(res.table(max_table_rows), file=file or sys.stdout)
    return res
