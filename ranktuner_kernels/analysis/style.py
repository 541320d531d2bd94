"""How the token inspector shows a token, shared by its HTML page (:mod:`.render_html`) and its
PNG (:mod:`.render_png`): the colour scale of each row and a token's display text.

Colours (paper Fig. 4): blue = larger, red = smaller, white = the neutral middle; ``H_t`` and
``R_t`` are reversed (blue = low entropy / rank 1). ``p_t`` maps ``[0, 1]`` linearly;
``H_t`` maps ``[0, max H_t on the page]`` (relative magnitude, as in the paper); ``I_t`` maps
``log2 I_t`` over ``[-1, 1]`` (1 is white: normalised around the neutral value); ``R_t`` maps
``log2 R_t`` over ``[0, log2 max R_t]``; ``w_t`` maps ``log2(w_t / mean w)`` over ``[-2, 2]``
(white = the page's mean weight; a weighting with ``w = 1`` everywhere is all white).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

RED, WHITE, BLUE = (0.843, 0.188, 0.153), (0.969, 0.969, 0.969), (0.271, 0.459, 0.706)
#: an unscored position
GREY = (0.85, 0.85, 0.85)


def colour(t: float) -> tuple:
    """Red (t=0) -> white (0.5) -> blue (1); NaN -> grey."""
    if t is None or not math.isfinite(t):
        return GREY
    t = min(max(t, 0.0), 1.0)
    a, b, u = (RED, WHITE, t * 2) if t < 0.5 else (WHITE, BLUE, t * 2 - 1)
    return tuple(x + (y - x) * u for x, y in zip(a, b))


def hex_colour(rgb) -> str:
    """``(r, g, b)`` in ``[0, 1]`` -> ``"#rrggbb"``."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


@dataclass
class Scale:
    """The colour scale of one row: ``transform`` maps a value into ``[lo, hi]`` (lo = red,
    hi = blue); ``ticks`` are ``(value, label)`` pairs of its colour bar."""

    key: str
    label: str          # plain text
    note: str           # what the colours mean
    lo: float
    hi: float
    transform: Callable  # value -> scale coordinate in [lo, hi]; lo = red, hi = blue
    ticks: list = field(default_factory=list)  # (value, label)

    def t(self, value: float) -> float:
        """``value``'s place on the scale, ``[0, 1]`` (NaN for a missing value)."""
        if value is None or not math.isfinite(value):
            return float("nan")
        x = self.transform(value)
        return (x - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.5


def row_scales(insp) -> dict:
    """``{row key: Scale}`` of an :class:`~.render.Inspection`, for ``p_t``, ``entropy``,
    ``indicator``, ``rank`` and ``weight`` (the ranges of the last three from the page's
    scored tokens)."""
    kept = insp.kept
    h_max = float(np.nanmax(insp.entropy_bits[kept])) if kept.any() else 1.0
    h_max = max(h_max, 1e-3)
    r_max = float(np.nanmax(insp.rank[kept])) if kept.any() else 2.0
    lr_max = max(math.log2(max(r_max, 2.0)), 1e-3)
    w_mean = float(np.nanmean(insp.weight[kept])) if kept.any() else 1.0
    w_mean = w_mean if w_mean > 0 and math.isfinite(w_mean) else 1.0

    def log_w(w):
        return math.log2(w / w_mean) if w > 0 else -2.0

    return {
        "p_t": Scale("p_t", "p_t", "target probability; blue = larger", 0.0, 1.0, lambda v: v,
                     [(0.0, "0"), (0.5, "0.5"), (1.0, "1")]),
        "entropy": Scale("entropy", "H_t (bits)", f"entropy, reversed: blue = low; red = the page's max {h_max:.2f} bits",
                         0.0, 1.0, lambda v: 1.0 - v / h_max,
                         [(0.0, "0"), (h_max / 2, f"{h_max / 2:.2g}"), (h_max, f"{h_max:.2g}")]),
        "indicator": Scale("indicator", "I_t", "Relative Rank Indicator, log scale around the neutral 1; blue = larger",
                           -1.0, 1.0, lambda v: math.log2(v) if v > 0 else -1.0,
                           [(0.5, "0.5"), (1.0, "1"), (2.0, "2")]),
        "rank": Scale("rank", "R_t", f"target rank, log scale, reversed: blue = rank 1; red = the page's max {r_max:g}",
                      0.0, 1.0, lambda v: 1.0 - math.log2(max(v, 1.0)) / lr_max,
                      [(1.0, "1"), (max(r_max, 2.0), f"{max(r_max, 2.0):g}")]),
        "weight": Scale("weight", f"w_t ({insp.weighting})",
                        f"weight, log2(w / mean w) over [-2, 2]; white = the mean {w_mean:.3g}; blue = larger",
                        -2.0, 2.0, log_w,
                        [(w_mean / 4, f"{w_mean / 4:.2g}"), (w_mean, f"{w_mean:.2g}"), (w_mean * 4, f"{w_mean * 4:.2g}")]),
    }


def display_text(tok: str) -> str:
    """A token as shown: line breaks as ``↵``, tabs as ``⇥``, the empty token as ``∅``."""
    return (tok.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")) if tok else "∅"
