"""The token inspector's PNG output, in the layout of the RankTuner paper's Fig. 1/4: a panel
of coloured tokens per statistic (colours: :mod:`.style`), each with its colour bar
(:meth:`.render.Inspection.save_png`, written by ``rk.inspect(..., png=path)``). Needs
matplotlib, imported when a PNG is drawn."""

from __future__ import annotations

import textwrap
from typing import Sequence

from .style import BLUE, GREY, RED, WHITE, colour, display_text, row_scales


def layout(insp, line_chars: int):
    """``([(token index, line, column, text)], number of lines)``: the tokens of an
    :class:`~.render.Inspection` wrapped at ``line_chars`` columns; a newline token ends its
    line; a token longer than a line is split."""
    pieces, line, col = [], 0, 0
    for i, tok in enumerate(insp.tokens):
        text = display_text(tok)
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


def save_png(insp, path, rows: Sequence[str] = ("p_t", "entropy", "indicator"), line_chars: int = 100,
             fontsize: float = 10.0, dpi: int = 150) -> str:
    """Draw one panel per key in ``rows`` and save it to ``path``; returns the path as a string.
    ``ValueError`` for an unknown row or ``line_chars`` below 8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    scales = row_scales(insp)
    bad = [r for r in rows if r not in scales]
    if bad or not rows:
        raise ValueError(f"rows: expected some of {list(scales)}, got {list(rows)}")
    if not isinstance(line_chars, int) or line_chars < 8:
        raise ValueError(f"line_chars: expected an int >= 8, got {line_chars!r}")
    pieces, n_lines = layout(insp, line_chars)
    n_lines = max(n_lines, 1)
    char_w = 0.6021 * fontsize / 72  # DejaVu Sans Mono advance, inches
    line_h = 1.55 * fontsize / 72
    panel_h = n_lines * line_h
    head_h, bar_h, gap_h, margin = 0.32, 0.42, 0.18, 0.25
    cols = max(line_chars, 96)  # room for the panel notes and the title
    fw = cols * char_w + 2 * margin
    title = textwrap.wrap(f"{insp.title}  ({insp.weighting})", width=int(cols * 0.95)) or [""]
    title_h = 0.12 + 0.25 * len(title)
    height = len(rows) * (head_h + panel_h + bar_h + gap_h) + title_h
    fig = Figure(figsize=(fw, height), dpi=dpi)
    FigureCanvasAgg(fig)
    cmap = LinearSegmentedColormap.from_list("rk_rwb", [RED, WHITE, BLUE])
    fig.text(margin / fw, 1 - 0.08 / height, "\n".join(title), fontsize=fontsize + 1, va="top", ha="left",
             parse_math=False)
    y_top = height - title_h
    for key in rows:
        sc = scales[key]
        vals = insp.values(key)
        y_top -= head_h
        ax = fig.add_axes([margin / fw, (y_top - panel_h) / height, line_chars * char_w / fw, panel_h / height])
        ax.set_xlim(0, line_chars)
        ax.set_ylim(n_lines, 0)
        ax.axis("off")
        arrow = "↑" if key in ("p_t", "indicator", "weight") else "↓"
        ax.text(0, -0.25, f"{sc.label} {arrow}  {sc.note}", fontsize=fontsize - 1, va="bottom", ha="left",
                parse_math=False)
        for i, line, col, text in pieces:
            rgb = colour(sc.t(float(vals[i]))) if insp.kept[i] else GREY
            ax.add_patch(Rectangle((col, line + 0.06), len(text), 0.88, facecolor=rgb, edgecolor="none"))
            ax.text(col, line + 0.5, text, fontsize=fontsize, family="DejaVu Sans Mono", va="center", ha="left",
                    color="#555555" if not insp.kept[i] else "black", parse_math=False)
        y_top -= panel_h
        cax = fig.add_axes([margin / fw, (y_top - bar_h + 0.12) / height, min(3.0, line_chars * char_w) / fw, 0.12 / height])
        cb = ColorbarBase(cax, cmap=cmap, norm=Normalize(sc.lo, sc.hi), orientation="horizontal")
        cb.set_ticks([sc.transform(v) for v, _ in sc.ticks])
        cb.set_ticklabels([lbl for _, lbl in sc.ticks])
        cb.ax.tick_params(labelsize=fontsize - 3, length=2, pad=1)
        y_top -= bar_h + gap_h
    fig.savefig(path, dpi=dpi)
    return str(path)
