"""The plain NLL next to the objective: what one call with labels records (:func:`_nll_terms`,
:func:`_token_metrics`) and :class:`NLLMeter`, the running sums the logging callback reads."""

from __future__ import annotations

import torch

#: the ``return_stats`` names a call with labels reads (:func:`_nll_terms`, :func:`_token_metrics`):
#: asking for these only keeps the optional accumulators of the statistics pass off
TOKEN_STATS = ("logp_t", "entropy", "accuracy")


def _nll_terms(logp_t: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """``(sum of -logp_t over kept tokens, kept count)``, float32, detached. Ignored positions
    are masked here, whatever the statistics hold there (zero or NaN)."""
    keep = target != ignore_index
    neg = torch.where(keep, -logp_t.detach().float(), torch.zeros((), dtype=torch.float32, device=logp_t.device))
    return neg.sum(), keep.sum().to(torch.float32)


def _token_metrics(stats: dict, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[sum of entropy, correct, kept]`` over the kept tokens of one call (float32, detached):
    what TRL's ``entropy`` and ``mean_token_accuracy`` average (``integrations.trl``)."""
    keep = target != ignore_index
    zero = torch.zeros((), device=keep.device)
    entropy, correct = (torch.where(keep, stats[k].detach().float(), zero).sum() for k in ("entropy", "accuracy"))
    return torch.stack([entropy, correct, keep.sum().float()])


def _mean_nll(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``; NaN when every token is ignored (like ``F.cross_entropy``'s mean)."""
    return total / count


class NLLMeter:
    """Running sums of the plain NLL for logging: ``(sum of -log p_t, kept tokens)``.

    The patched forward (and the function from :func:`make_compute_loss_func`) feed it once per
    call with labels, into ``"train"`` or ``"eval"``; :class:`NLLLoggingCallback` reads it. The
    sums stay on the model's device (no host sync per step); the train side is grouped by
    optimizer step (:meth:`end_step`) so that :meth:`pop_train` averages per-step means, the way
    Trainer averages its logged ``loss`` over the steps of a logging interval. Memory is O(1)
    per step between two logs. The callback takes eval calls one by one
    (:meth:`take_last_eval`, once per evaluation batch); :meth:`pop_eval` is the token mean of
    every eval call since the last pop, for use without Trainer.
    """

    def __init__(self):
        self._current = {"train": None, "eval": None}
        self._steps = []
        self._last_eval = None
        from ... import _ops

        self._id = _ops.register_meter(self)  # how compiled code names this meter (record)

    def __setstate__(self, state):  # a copy (deepcopy, pickle) is a meter of its own
        from ... import _ops

        self.__dict__.update(state)
        self._id = _ops.register_meter(self)

    def record(self, mode: str, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """:meth:`add`, and return the batch's mean NLL ``total / count``. Inside
        ``torch.compile`` the meter is updated by a custom op when the compiled code runs, so
        that its state (None before the first batch, the running sums after) is never read
        while tracing: no guard on it, no recompilation on later steps."""
        if torch.compiler.is_compiling():
            if mode not in ("train", "eval"):  # not self._current: reading it would guard on its state
                raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
            from ... import _ops

            return _ops.nll_record_op(total, count, self._id, mode)
        self.add(mode, total, count)
        return _mean_nll(total, count)

    def add(self, mode: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add one batch's ``total`` (sum of NLL) and ``count`` (kept tokens) to ``mode``."""
        if mode not in self._current:
            raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
        dtype = torch.float32 if total.device.type == "mps" else torch.float64
        pair = torch.stack([total.detach().to(dtype), count.detach().to(dtype)])
        cur = self._current[mode]
        self._current[mode] = pair if cur is None else cur + pair
        if mode == "eval":
            self._last_eval = pair

    def take_last_eval(self) -> torch.Tensor | None:
        """The ``[sum, count]`` of the latest eval-mode call, once (None if taken or none)."""
        pair, self._last_eval = self._last_eval, None
        return pair

    def end_step(self) -> None:
        """Close the current optimizer step of the train side."""
        cur = self._current["train"]
        if cur is not None:
            self._steps.append(cur)
            self._current["train"] = None

    def reset(self, mode: str | None = None) -> None:
        """Drop what was recorded (of ``mode`` only, if given)."""
        if mode == "eval":
            self._current["eval"] = self._last_eval = None
            return
        if mode == "train":
            self._current["train"] = None
            self._steps = []
            return
        if mode is not None:
            raise ValueError(f"mode: expected 'train', 'eval' or None, got {mode!r}")
        self._current = {"train": None, "eval": None}
        self._steps = []
        self._last_eval = None

    def pop_train(self) -> float | None:
        """Mean over the closed steps (and an open one) of each step's mean NLL, then reset the
        train side; None if nothing was recorded. Summed across ranks under torch.distributed."""
        self.end_step()
        steps, self._steps = self._steps, []
        if not steps:
            return None
        sums = _all_reduce(torch.stack(steps))  # [steps, 2]
        sums = sums[sums[:, 1] > 0]
        if sums.shape[0] == 0:
            return None
        return float((sums[:, 0] / sums[:, 1]).mean())

    def pop_eval(self) -> float | None:
        """Token-weighted mean NLL of every eval-mode call since the last pop, then reset the
        eval side; None if nothing was recorded."""
        cur, self._current["eval"] = self._current["eval"], None
        if cur is None:
            return None
        return _token_mean(cur)


def _token_mean(pair: torch.Tensor | None) -> float | None:
    """``sum / count`` of a ``[sum, count]`` pair summed across ranks; None if no token."""
    if pair is None:
        return None
    pair = _all_reduce(pair)
    return float(pair[0] / pair[1]) if float(pair[1]) > 0 else None


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

