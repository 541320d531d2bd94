"""The token inspector's terminal output: a compact text table, one row per position
(:meth:`.render.Inspection.table`, printed by ``rk.inspect(..., print_table=True)``)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def table(insp, max_rows: Optional[int] = 60) -> str:
    """The table of an :class:`~.render.Inspection`: position, token, ``p_t``, ``H`` in bits,
    rank, ``s(H)``, ``I_t`` and the weight, for the first ``max_rows`` positions (``None``:
    all), then the means over the scored tokens."""
    head = f"{'pos':>5}  {'token':<12} {'p_t':>7} {'H_bits':>7} {'rank':>6} {'s(H)':>6} {'I_t':>6} {'weight':>8}"
    lines = [f"{insp.title}: weighting {insp.weighting}, {int(insp.kept.sum())} of {len(insp)} tokens scored",
             head, "-" * len(head)]
    n = len(insp) if max_rows is None else min(len(insp), max_rows)
    for i in range(n):
        tok = repr(insp.tokens[i])[1:-1]
        tok = tok if len(tok) <= 12 else tok[:11] + "…"
        if insp.kept[i]:
            lines.append(f"{i:>5}  {tok:<12} {insp.p_t[i]:>7.4f} {insp.entropy_bits[i]:>7.3f} {int(insp.rank[i]):>6d} "
                         f"{insp.s[i]:>6.2f} {insp.indicator[i]:>6.3f} {insp.weight[i]:>8.4f}")
        else:
            lines.append(f"{i:>5}  {tok:<12} {'-':>7} {'-':>7} {'-':>6} {'-':>6} {'-':>6} {'-':>8}")
    if n < len(insp):
        lines.append(f"  ... {len(insp) - n} more positions (max_rows={max_rows})")
    if insp.kept.any():
        k = insp.kept
        lines.append(f"mean over scored tokens: p_t {np.mean(insp.p_t[k]):.4f}  H {np.mean(insp.entropy_bits[k]):.3f} bits  "
                     f"I_t {np.mean(insp.indicator[k]):.3f}  weight {np.mean(insp.weight[k]):.4f}")
    return "\n".join(lines)
