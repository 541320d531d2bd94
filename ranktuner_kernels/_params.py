"""The non-tensor settings of one loss call, carried from forward to backward (one frozen
dataclass for both paths instead of long positional ``apply`` calls), and their checks."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

from ._dispatch import Backend
from .reference import Transform
from .weightings import Weighting

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossParams:
    """``shape``: the target's shape; ``transform``: softcap and temperature; ``rows``: rows
    per chunk of the fused linear path; ``grad_enabled``: grad mode at the call
    (``ctx.needs_input_grad`` ignores ``torch.no_grad()``); ``batch_gather``: the group hook
    of batch-level statistics (``weightings.Batch.gather``; set for ``dp_group=``, else None);
    ``reduce_input_grad``: a vocabulary-sharded fused path all-reduces ``dh`` over the shard's
    group; ``asked_stats``: the optional statistics (``reference.stats.OPTIONAL_STATS``) the
    caller's ``return_stats`` needs. A vocabulary-parallel call has a sharded ``backend``
    (``_distributed.ShardedBackend``)."""

    weighting: Weighting
    backend: Backend
    shape: tuple
    ignore_index: int = -100
    reduction: str = "mean"
    transform: Transform = Transform()
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    inplace_backward: bool = False
    rows: Optional[int] = None
    acc_policy: str = "accurate"
    grad_enabled: bool = True
    batch_gather: Optional[Callable] = None
    reduce_input_grad: bool = True
    asked_stats: frozenset = frozenset()

    @property
    def extra_stats(self) -> frozenset:
        """The optional statistics the statistics pass computes: those asked for, and
        ``logit_mean`` for label smoothing."""
        return self.asked_stats | ({"logit_mean"} if self.label_smoothing > 0 else set())

    def vocab(self, v_local: int) -> int:
        """The whole vocabulary's size (the shards' sum on a vocabulary-parallel call)."""
        return self.backend.vocab(v_local)


def _real(name, v):
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def check_options(reduction, softcap, temperature, label_smoothing, z_loss) -> tuple:
    """``(Transform, label_smoothing, z_loss)`` after checking each option by name."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and _real("softcap", softcap) <= 0:
        raise ValueError(f"softcap: must be > 0 (or None for no capping), got {softcap!r}")
    if _real("temperature", temperature) <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")
    if not 0 <= _real("label_smoothing", label_smoothing) <= 1:
        raise ValueError(f"label_smoothing: must be in [0, 1], got {label_smoothing!r}")
    if _real("z_loss", z_loss) < 0:
        raise ValueError(f"z_loss: must be >= 0, got {z_loss!r}")
    tr = Transform(None if softcap is None else float(softcap), float(temperature))
    return tr, float(label_smoothing), float(z_loss)
