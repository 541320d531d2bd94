"""The token inspector's renderer: per-token ``p_t``, ``H_t``, rank ``R_t``, the Relative Rank
Indicator ``I_t`` and a weighting's weight ``w_t``, rendered as a colour-coded self-contained
HTML page, a PNG in the layout of the RankTuner paper's Fig. 1/4 (rows of coloured tokens) and
a compact terminal table.

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

Colours (paper Fig. 4): blue = larger, red = smaller, white = the neutral middle; ``H_t`` and
``R_t`` are reversed (blue = low entropy / rank 1). ``p_t`` maps ``[0, 1]`` linearly;
``H_t`` maps ``[0, max H_t on the page]`` (relative magnitude, as in the paper); ``I_t`` maps
``log2 I_t`` over ``[-1, 1]`` (1 is white: normalised around the neutral value); ``R_t`` maps
``log2 R_t`` over ``[0, log2 max R_t]``; ``w_t`` maps ``log2(w_t / mean w)`` over ``[-2, 2]``
(white = the page's mean weight; a weighting with ``w = 1`` everywhere is all white).
"""

from __future__ import annotations

import html as _html
import math
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..token_loss import cross_entropy
from ..weightings import describe
from .indicator import model_logits, relative_rank_terms

__all__ = ["inspect", "Inspection"]


# ----------------------------------------------------------------------------- running models

def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- colour scales

_RED, _WHITE, _BLUE = (0.843, 0.188, 0.153), (0.969, 0.969, 0.969), (0.271, 0.459, 0.706)
_GREY = (0.85, 0.85, 0.85)


def _colour(t: float) -> tuple:
    """Red (t=0) -> white (0.5) -> blue (1); NaN -> grey."""
    if t is None or not math.isfinite(t):
        return _GREY
    t = min(max(t, 0.0), 1.0)
    a, b, u = (_RED, _WHITE, t * 2) if t < 0.5 else (_WHITE, _BLUE, t * 2 - 1)
    return tuple(x + (y - x) * u for x, y in zip(a, b))


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


@dataclass
class _Scale:
    key: str
    label: str          # plain text
    note: str           # what the colours mean
    lo: float
    hi: float
    transform: Callable  # value -> scale coordinate in [lo, hi]; lo = red, hi = blue
    ticks: list = field(default_factory=list)  # (value, label)

    def t(self, value: float) -> float:
        if value is None or not math.isfinite(value):
            return float("nan")
        x = self.transform(value)
        return (x - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.5


# ----------------------------------------------------------------------------- the result

@dataclass
class Inspection:
    """Per-position results of :func:`inspect`; arrays have one entry per shown token, NaN
    where the position has no prediction (the first token of a causal text) or its target is
    ignored."""

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

    def __len__(self):
        return len(self.tokens)

    # -- scales
    def scales(self) -> dict:
        kept = self.kept
        h_max = float(np.nanmax(self.entropy_bits[kept])) if kept.any() else 1.0
        h_max = max(h_max, 1e-3)
        r_max = float(np.nanmax(self.rank[kept])) if kept.any() else 2.0
        lr_max = max(math.log2(max(r_max, 2.0)), 1e-3)
        w_mean = float(np.nanmean(self.weight[kept])) if kept.any() else 1.0
        w_mean = w_mean if w_mean > 0 and math.isfinite(w_mean) else 1.0

        def log_w(w):
            return math.log2(w / w_mean) if w > 0 else -2.0

        return {
            "p_t": _Scale("p_t", "p_t", "target probability; blue = larger", 0.0, 1.0, lambda v: v,
                          [(0.0, "0"), (0.5, "0.5"), (1.0, "1")]),
            "entropy": _Scale("entropy", "H_t (bits)", f"entropy, reversed: blue = low; red = the page's max {h_max:.2f} bits",
                              0.0, 1.0, lambda v: 1.0 - v / h_max,
                              [(0.0, "0"), (h_max / 2, f"{h_max / 2:.2g}"), (h_max, f"{h_max:.2g}")]),
            "indicator": _Scale("indicator", "I_t", "Relative Rank Indicator, log scale around the neutral 1; blue = larger",
                                -1.0, 1.0, lambda v: math.log2(v) if v > 0 else -1.0,
                                [(0.5, "0.5"), (1.0, "1"), (2.0, "2")]),
            "rank": _Scale("rank", "R_t", f"target rank, log scale, reversed: blue = rank 1; red = the page's max {r_max:g}",
                           0.0, 1.0, lambda v: 1.0 - math.log2(max(v, 1.0)) / lr_max,
                           [(1.0, "1"), (max(r_max, 2.0), f"{max(r_max, 2.0):g}")]),
            "weight": _Scale("weight", f"w_t ({self.weighting})",
                             f"weight, log2(w / mean w) over [-2, 2]; white = the mean {w_mean:.3g}; blue = larger",
                             -2.0, 2.0, log_w,
                             [(w_mean / 4, f"{w_mean / 4:.2g}"), (w_mean, f"{w_mean:.2g}"), (w_mean * 4, f"{w_mean * 4:.2g}")]),
        }

    def values(self, key: str) -> np.ndarray:
        return {"p_t": self.p_t, "entropy": self.entropy_bits, "indicator": self.indicator,
                "rank": self.rank, "weight": self.weight}[key]

    # -- terminal
    def table(self, max_rows: Optional[int] = 60) -> str:
        """A compact text table, one row per position (the first ``max_rows``, ``None``: all)."""
        head = f"{'pos':>5}  {'token':<12} {'p_t':>7} {'H_bits':>7} {'rank':>6} {'s(H)':>6} {'I_t':>6} {'weight':>8}"
        lines = [f"{self.title}: weighting {self.weighting}, {int(self.kept.sum())} of {len(self)} tokens scored",
                 head, "-" * len(head)]
        n = len(self) if max_rows is None else min(len(self), max_rows)
        for i in range(n):
            tok = repr(self.tokens[i])[1:-1]
            tok = tok if len(tok) <= 12 else tok[:11] + "…"
            if self.kept[i]:
                lines.append(f"{i:>5}  {tok:<12} {self.p_t[i]:>7.4f} {self.entropy_bits[i]:>7.3f} {int(self.rank[i]):>6d} "
                             f"{self.s[i]:>6.2f} {self.indicator[i]:>6.3f} {self.weight[i]:>8.4f}")
            else:
                lines.append(f"{i:>5}  {tok:<12} {'-':>7} {'-':>7} {'-':>6} {'-':>6} {'-':>6} {'-':>8}")
        if n < len(self):
            lines.append(f"  ... {len(self) - n} more positions (max_rows={max_rows})")
        if self.kept.any():
            k = self.kept
            lines.append(f"mean over scored tokens: p_t {np.mean(self.p_t[k]):.4f}  H {np.mean(self.entropy_bits[k]):.3f} bits  "
                         f"I_t {np.mean(self.indicator[k]):.3f}  weight {np.mean(self.weight[k]):.4f}")
        return "\n".join(lines)

    # -- HTML
    def _tooltip(self, i: int) -> str:
        if not self.kept[i]:
            return f"#{i} {self.tokens[i]!r}: not scored"
        return (f"#{i} {self.tokens[i]!r}  p_t={self.p_t[i]:.4g}  H={self.entropy_bits[i]:.4g} bits  "
                f"R={int(self.rank[i])}  s(H)={self.s[i]:.4g}  I_t={self.indicator[i]:.4g}  w={self.weight[i]:.4g}")

    @staticmethod
    def _display(tok: str) -> str:
        return (tok.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")) if tok else "∅"

    def to_html(self, rows: Sequence[str] = ("p_t", "entropy", "indicator", "rank", "weight")) -> str:
        """The whole page as one string: inline CSS, no scripts, no external resources; every
        token's text is HTML-escaped."""
        esc = _html.escape
        scales = self.scales()
        parts = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            "<style>",
            "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;max-width:70em;color:#222}",
            ".row{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;"
            "white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid #ddd;padding:.5em;border-radius:4px}",
            ".row span{border-radius:2px;padding:1px 0}",
            ".ign{color:#888;background:#e6e6e6}",
            ".bar{display:inline-block;width:16em;height:.9em;vertical-align:middle;border:1px solid #aaa;"
            f"background:linear-gradient(to right,{_hex(_RED)},{_hex(_WHITE)},{_hex(_BLUE)})}}",
            "table{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}",
            "td,th{border:1px solid #ddd;padding:1px 6px;text-align:right}td.tok{text-align:left}",
            "h2{font-size:1.05em;margin:1.2em 0 .3em}.note{color:#555;font-size:.9em}",
            "</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f"<p class=\"note\">weighting <b>{esc(self.weighting)}</b>; {int(self.kept.sum())} of {len(self)} tokens scored "
            f"(grey: no prediction or ignored target); vocabulary {self.vocab_size}. Hover a token for all its numbers. "
            "I<sub>t</sub> = 2^(f(R<sub>t</sub>) &minus; f(s(H<sub>t</sub>))), f(x) = 1/log<sub>2</sub>(x+1) "
            "(paper Eq. 2 with E[R] replaced by its entropy bound s(H)).</p>",
        ]
        for key in rows:
            sc = scales[key]
            vals = self.values(key)
            parts.append(f"<h2>{esc(sc.label)} <span class=\"note\">{esc(sc.note)}</span></h2>")
            ticks = " ".join(esc(lbl) for _, lbl in sc.ticks)
            parts.append(f"<div class=\"note\"><span class=\"bar\"></span> {ticks}</div>")
            spans = []
            for i, tok in enumerate(self.tokens):
                text = esc(self._display(tok))
                if tok and "\n" in tok:
                    text += "<br>"
                title = esc(self._tooltip(i), quote=True)
                if self.kept[i]:
                    spans.append(f'<span style="background:{_hex(_colour(sc.t(float(vals[i]))))}" title="{title}">{text}</span>')
                else:
                    spans.append(f'<span class="ign" title="{title}">{text}</span>')
            parts.append('<div class="row">' + "".join(spans) + "</div>")
        parts.append("<details><summary>All numbers</summary><table><tr><th>pos</th><th>token</th><th>target id</th>"
                     "<th>p_t</th><th>H (bits)</th><th>R</th><th>s(H)</th><th>I_t</th><th>w</th></tr>")
        for i, tok in enumerate(self.tokens):
            cells = ([f"{self.p_t[i]:.4g}", f"{self.entropy_bits[i]:.4g}", f"{int(self.rank[i])}", f"{self.s[i]:.4g}",
                      f"{self.indicator[i]:.4g}", f"{self.weight[i]:.4g}"] if self.kept[i] else ["-"] * 6)
            parts.append(f"<tr><td>{i}</td><td class=\"tok\">{esc(repr(tok))}</td><td>{int(self.target[i])}</td>"
                         + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table></details></body></html>")
        return "\n".join(parts)

    def save_html(self, path) -> str:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        self.html_path = str(path)
        return self.html_path

    # -- PNG
    def _layout(self, line_chars: int):
        """``[(token index, line, column, text)]`` pieces, wrapping at ``line_chars``
        columns; a newline token ends its line; a token longer than a line is split."""
        pieces, line, col = [], 0, 0
        for i, tok in enumerate(self.tokens):
            text = self._display(tok)
            if col > 0 and col + len(text) > line_chars:
                line, col = line + 1, 0
            while len(text) > line_chars:
                pieces.append((i, line, col, text[:line_chars]))
                text, line, col = text[line_chars:], line + 1, 0
            pieces.append((i, line, col, text))
            col += len(text)
            if tok and "\n" in tok:
                line, col = line + 1, 0
        return pieces, (line + 1 if col > 0 or not pieces else line)

    def save_png(self, path, rows: Sequence[str] = ("p_t", "entropy", "indicator"), line_chars: int = 100,
                 fontsize: float = 10.0, dpi: int = 150) -> str:
        """The paper's layout (Fig. 4): one panel of coloured tokens per row in ``rows``
        (default ``p_t``, ``H_t``, ``I_t``; add ``"weight"`` or ``"rank"``), each with its
        colour bar; long texts wrap at ``line_chars`` columns. Needs matplotlib."""
        require_matplotlib()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colorbar import ColorbarBase
        from matplotlib.colors import LinearSegmentedColormap, Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        scales = self.scales()
        bad = [r for r in rows if r not in scales]
        if bad or not rows:
            raise ValueError(f"rows: expected some of {list(scales)}, got {list(rows)}")
        if not isinstance(line_chars, int) or line_chars < 8:
            raise ValueError(f"line_chars: expected an int >= 8, got {line_chars!r}")
        pieces, n_lines = self._layout(line_chars)
        n_lines = max(n_lines, 1)
        char_w = 0.6021 * fontsize / 72  # DejaVu Sans Mono advance, inches
        line_h = 1.55 * fontsize / 72
        panel_h = n_lines * line_h
        head_h, bar_h, gap_h, margin = 0.32, 0.42, 0.18, 0.25
        cols = max(line_chars, 96)  # room for the panel notes and the title
        fw = cols * char_w + 2 * margin
        title = textwrap.wrap(f"{self.title}  ({self.weighting})", width=int(cols * 0.95)) or [""]
        title_h = 0.12 + 0.25 * len(title)
        height = len(rows) * (head_h + panel_h + bar_h + gap_h) + title_h
        fig = Figure(figsize=(fw, height), dpi=dpi)
        FigureCanvasAgg(fig)
        cmap = LinearSegmentedColormap.from_list("rk_rwb", [_RED, _WHITE, _BLUE])
        fig.text(margin / fw, 1 - 0.08 / height, "\n".join(title), fontsize=fontsize + 1, va="top", ha="left",
                 parse_math=False)
        y_top = height - title_h
        for key in rows:
            sc = scales[key]
            vals = self.values(key)
            y_top -= head_h
            ax = fig.add_axes([margin / fw, (y_top - panel_h) / height, line_chars * char_w / fw, panel_h / height])
            ax.set_xlim(0, line_chars)
            ax.set_ylim(n_lines, 0)
            ax.axis("off")
            arrow = "↑" if key in ("p_t", "indicator", "weight") else "↓"
            ax.text(0, -0.25, f"{sc.label} {arrow}  {sc.note}", fontsize=fontsize - 1, va="bottom", ha="left",
                    parse_math=False)
            for i, line, col, text in pieces:
                rgb = _colour(sc.t(float(vals[i]))) if self.kept[i] else _GREY
                ax.add_patch(Rectangle((col, line + 0.06), len(text), 0.88, facecolor=rgb, edgecolor="none"))
                ax.text(col, line + 0.5, text, fontsize=fontsize, family="DejaVu Sans Mono", va="center", ha="left",
                        color="#555555" if not self.kept[i] else "black", parse_math=False)
            y_top -= panel_h
            cax = fig.add_axes([margin / fw, (y_top - bar_h + 0.12) / height, min(3.0, line_chars * char_w) / fw, 0.12 / height])
            cb = ColorbarBase(cax, cmap=cmap, norm=Normalize(sc.lo, sc.hi), orientation="horizontal")
            cb.set_ticks([sc.transform(v) for v, _ in sc.ticks])
            cb.set_ticklabels([lbl for _, lbl in sc.ticks])
            cb.ax.tick_params(labelsize=fontsize - 3, length=2, pad=1)
            y_top -= bar_h + gap_h
        fig.savefig(path, dpi=dpi)
        self.png_path = str(path)
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
