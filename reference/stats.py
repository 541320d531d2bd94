"""The schema of the statistics pass and the types shared by the reference, the kernels'
launchers and the public package (a leaf module: it imports torch only).

:data:`ROW_STATS` declares every per-row output of the statistics pass once: its name, its
kind (float in the compute dtype, int64 or bool) and whether it is optional (computed only
when asked: an extra accumulator behind a ``tl.constexpr`` switch in the kernel).
:data:`ACCUMULATORS` declares the streaming sums the pass carries and how vocabulary shards
merge them. :class:`RowStats`, the ops' outputs, their fake implementations, what the
backward saves and the public stats dict are all derived from these two tables, by name.
``docs/ops.md`` has the recipe for adding a statistic.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

#: :attr:`Stat.kind` values: the compute dtype (float32, float64 for float64 logits), int64, bool
FLOAT, INT, BOOL = "float", "int64", "bool"


class Stat(NamedTuple):
    """One per-row output of the statistics pass: ``optional`` ones exist only when asked for."""

    name: str
    kind: str
    optional: bool
    doc: str


#: The per-row outputs of the statistics pass on ``z' = c tanh(z / c) / T`` (SPEC), in one place.
ROW_STATS = (
    Stat("lse", FLOAT, False, "log sum_i exp z'_i"),
    Stat("logp_t", FLOAT, False, "log p_t, from the non-target mass (SPEC, 'Confident tokens')"),
    Stat("target_logit", FLOAT, False, "z'_y"),
    Stat("max_logit", FLOAT, False, "max_i z'_i"),
    Stat("entropy", FLOAT, False, "-sum_i p_i log p_i (nats)"),
    Stat("rank", INT, False, "#{i : z_i >= z_y}, on the untransformed logits"),
    Stat("logit_mean", FLOAT, True, "mean_i z'_i (label smoothing needs it)"),
    Stat("log_sum_p2", FLOAT, True, "log sum_i p_i^2, keeping its relative precision as p_t -> 1"),
    Stat("is_top1", BOOL, True, "y is the first index of the row's maximum (torch.argmax), on the untransformed logits"),
)
STAT_NAMES = tuple(s.name for s in ROW_STATS)
OPTIONAL_STATS = tuple(s.name for s in ROW_STATS if s.optional)
_KIND = {s.name: s.kind for s in ROW_STATS}


class Accumulator(NamedTuple):
    """A streaming sum of the statistics pass, carried rescaled to the row's running max ``m``
    (SPEC, "Vocabulary shards"). ``merge``: how the shards' values combine at the group's max
    ``M``: ``"max"``; ``"sum"``; ``"scaled"`` (times ``e^{m_r - M}``); ``"scaled2"`` (times
    ``e^{2(m_r - M)}``); ``"entropy"`` (``(a + (m_r - M) u) e^{m_r - M}``). ``stat``: the optional
    statistic it serves (None: always carried)."""

    name: str
    merge: str
    stat: Optional[str]
    doc: str


ACCUMULATORS = (
    Accumulator("m", "max", None, "max_i z'_i"),
    Accumulator("u", "scaled", None, "sum_{i != y} e^{z'_i - m}: the non-target mass"),
    Accumulator("a", "entropy", None, "sum_{i != y} e^{z'_i - m} (z'_i - m)"),
    Accumulator("r", "sum", None, "#{i : z_i >= z_y}"),
    Accumulator("zsum", "sum", "logit_mean", "sum_i z'_i"),
    Accumulator("sum_e2", "scaled2", "log_sum_p2", "sum_{i != y} e^{2(z'_i - m)}"),
    Accumulator("ties", "sum", "is_top1", "#{i > y : z_i = z_y}: ties after the target"),
)


def accumulators_for(extra) -> tuple:
    """The accumulator names carried for the optional statistics ``extra``, in table order."""
    return tuple(a.name for a in ACCUMULATORS if a.stat is None or a.stat in extra)


def check_stat_names(extra) -> frozenset:
    """``extra`` as a frozenset of optional statistic names (ValueError on any other)."""
    extra = frozenset(extra)
    unknown = extra - set(OPTIONAL_STATS)
    if unknown:
        raise ValueError(f"unknown optional statistics {sorted(unknown)}; expected some of {OPTIONAL_STATS}")
    return extra


def kind_dtype(kind: str, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a statistic of ``kind`` when the float ones are ``float_dtype``."""
    return {FLOAT: float_dtype, INT: torch.int64, BOOL: torch.bool}[kind]


def stat_dtype(name: str, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistic ``name`` when the float ones are ``float_dtype``."""
    return kind_dtype(_KIND[name], float_dtype)


def stat_names(extra) -> tuple:
    """The statistics computed with the optional ones ``extra``, in schema order."""
    return tuple(s.name for s in ROW_STATS if not s.optional or s.name in extra)


class _RowStatsMethods:
    """The methods of :class:`RowStats` (its fields come from :data:`ROW_STATS`)."""

    @property
    def p_max(self) -> torch.Tensor:
        return torch.exp(self.max_logit - self.lse)

    def present(self) -> dict:
        """``{name: tensor}`` of the statistics this holds, in schema order."""
        return {n: t for n in STAT_NAMES if (t := getattr(self, n)) is not None}

    def map(self, fn) -> "RowStats":
        """``fn`` applied to every statistic held (e.g. a row slice)."""
        return RowStats(**{n: fn(t) for n, t in self.present().items()})

    @classmethod
    def allocate(cls, names, n: int, float_dtype: torch.dtype, device) -> "RowStats":
        """Zero-filled ``[n]`` buffers for the statistics ``names``."""
        return RowStats(**{k: torch.zeros(n, dtype=stat_dtype(k, float_dtype), device=device) for k in names})

    def write(self, rows, part: "RowStats") -> None:
        """Copy ``part``'s statistics into rows ``rows`` of these buffers."""
        for name, buf in self.present().items():
            buf[rows] = getattr(part, name)


#: Per-token statistics ``[N]`` (float ones in the compute dtype), one field per :data:`ROW_STATS`
#: entry, keyword-only; an optional one not computed is None; ignored tokens hold zeros (False).
RowStats = dataclasses.make_dataclass(
    "RowStats", [(s.name, Optional[torch.Tensor], dataclasses.field(default=None)) for s in ROW_STATS],
    bases=(_RowStatsMethods,), frozen=True, kw_only=True, eq=False)
RowStats.__module__ = __name__
RowStats.__doc__ = "Per-token statistics of the transformed logits, each ``[N]`` or None:\n\n" + "\n".join(
    f"* ``{s.name}`` ({s.kind}{', optional' if s.optional else ''}): {s.doc}" for s in ROW_STATS)


class GradCoefs(NamedTuple):
    """Per-token coefficients ``[N]`` of the one gradient (SPEC, "One mechanism"), each named
    after what it multiplies:

        dz'_i = p * p_i - onehot * 1[i = y] - uniform + entropy * p_i * (log p_i + H)

    ``onehot`` None means ``onehot = p``; ``uniform`` and ``entropy`` None mean 0. The target's
    element is formed as ``(p - onehot) p_t - onehot (1 - p_t) - uniform + ...`` with
    ``1 - p_t`` from ``logp_t``.
    """

    p: torch.Tensor
    onehot: Optional[torch.Tensor] = None
    uniform: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None

    def map(self, fn) -> "GradCoefs":
        """``fn`` applied to every coefficient that is not None."""
        return GradCoefs(**{k: None if v is None else fn(v) for k, v in self._asdict().items()})


class Transform(NamedTuple):
    """The map applied to the logits before every statistic: ``z' = c tanh(z / c) / T``
    (``softcap`` c None: no capping; ``temperature`` T = 1: no scaling)."""

    softcap: Optional[float] = None
    temperature: float = 1.0
