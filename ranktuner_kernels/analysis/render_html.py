"""The token inspector's HTML output: one self-contained page (inline CSS, no scripts, no
external resources), a row of coloured tokens per statistic (colours: :mod:`.style`), every
token's numbers in its tooltip and in a table at the end (:meth:`.render.Inspection.to_html`,
written by ``rk.inspect(..., html=path)``)."""

from __future__ import annotations

import html as _html
from typing import Sequence

from .style import BLUE, RED, WHITE, colour, display_text, hex_colour, row_scales


def tooltip(insp, i: int) -> str:
    """Every number of position ``i``, as one line."""
    if not insp.kept[i]:
        return f"#{i} {insp.tokens[i]!r}: not scored"
    return (f"#{i} {insp.tokens[i]!r}  p_t={insp.p_t[i]:.4g}  H={insp.entropy_bits[i]:.4g} bits  "
            f"R={int(insp.rank[i])}  s(H)={insp.s[i]:.4g}  I_t={insp.indicator[i]:.4g}  w={insp.weight[i]:.4g}")


def to_html(insp, rows: Sequence[str] = ("p_t", "entropy", "indicator", "rank", "weight")) -> str:
    """The page of an :class:`~.render.Inspection` as one string, a panel per key in ``rows``;
    every token's text is HTML-escaped."""
    esc = _html.escape
    scales = row_scales(insp)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(insp.title)}</title>",
        "<style>",
        "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;max-width:70em;color:#222}",
        ".row{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;"
        "white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid #ddd;padding:.5em;border-radius:4px}",
        ".row span{border-radius:2px;padding:1px 0}",
        ".ign{color:#888;background:#e6e6e6}",
        ".bar{display:inline-block;width:16em;height:.9em;vertical-align:middle;border:1px solid #aaa;"
        f"background:linear-gradient(to right,{hex_colour(RED)},{hex_colour(WHITE)},{hex_colour(BLUE)})}}",
        "table{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}",
        "td,th{border:1px solid #ddd;padding:1px 6px;text-align:right}td.tok{text-align:left}",
        "h2{font-size:1.05em;margin:1.2em 0 .3em}.note{color:#555;font-size:.9em}",
        "</style></head><body>",
        f"<h1>{esc(insp.title)}</h1>",
        f"<p class=\"note\">weighting <b>{esc(insp.weighting)}</b>; {int(insp.kept.sum())} of {len(insp)} tokens scored "
        f"(grey: no prediction or ignored target); vocabulary {insp.vocab_size}. Hover a token for all its numbers. "
        "I<sub>t</sub> = 2^(f(R<sub>t</sub>) &minus; f(s(H<sub>t</sub>))), f(x) = 1/log<sub>2</sub>(x+1) "
        "(paper Eq. 2 with E[R] replaced by its entropy bound s(H)).</p>",
    ]
    for key in rows:
        sc = scales[key]
        vals = insp.values(key)
        parts.append(f"<h2>{esc(sc.label)} <span class=\"note\">{esc(sc.note)}</span></h2>")
        ticks = " ".join(esc(lbl) for _, lbl in sc.ticks)
        parts.append(f"<div class=\"note\"><span class=\"bar\"></span> {ticks}</div>")
        spans = []
        for i, tok in enumerate(insp.tokens):
            text = esc(display_text(tok))
            if tok and "\n" in tok:
                text += "<br>"
            title = esc(tooltip(insp, i), quote=True)
            if insp.kept[i]:
                spans.append(f'<span style="background:{hex_colour(colour(sc.t(float(vals[i]))))}" title="{title}">{text}</span>')
            else:
                spans.append(f'<span class="ign" title="{title}">{text}</span>')
        parts.append('<div class="row">' + "".join(spans) + "</div>")
    parts.append("<details><summary>All numbers</summary><table><tr><th>pos</th><th>token</th><th>target id</th>"
                 "<th>p_t</th><th>H (bits)</th><th>R</th><th>s(H)</th><th>I_t</th><th>w</th></tr>")
    for i, tok in enumerate(insp.tokens):
        cells = ([f"{insp.p_t[i]:.4g}", f"{insp.entropy_bits[i]:.4g}", f"{int(insp.rank[i])}", f"{insp.s[i]:.4g}",
                  f"{insp.indicator[i]:.4g}", f"{insp.weight[i]:.4g}"] if insp.kept[i] else ["-"] * 6)
        parts.append(f"<tr><td>{i}</td><td class=\"tok\">{esc(repr(tok))}</td><td>{int(insp.target[i])}</td>"
                     + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table></details></body></html>")
    return "\n".join(parts)


def save_html(insp, path) -> str:
    """Write :func:`to_html` to ``path`` (UTF-8); returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_html(insp))
    return str(path)
