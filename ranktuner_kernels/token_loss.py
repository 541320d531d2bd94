"""Token-reweighted cross-entropy on logits: ``rk.cross_entropy`` and its autograd Function.

Forward: one streaming pass per row computes the row statistics (``lse``, ``z_y``,
``max z``, entropy, rank); the objective's epilogue turns them into ``value``, ``w``,
``beta`` per token (O(N)). Backward: a second pass per row writes
``dz = g (w (p - onehot) + beta p (log p + H))`` into a new buffer, or over the logits
with ``inplace_backward=True``. Logits are read twice and the gradient written once.
"""

from __future__ import annotations

import torch

from . import _inputs
from ._backend import get_backend
from ._epilogue import reduce, upstream
from .objectives import LN2, resolve


class _Run:
    """The non-tensor settings of one call, carried from forward to backward."""

    def __init__(self, objective, ignore_index, reduction, shape, backend, inplace_backward):
        self.objective = objective
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shape = shape
        self.backend = backend
        self.inplace_backward = inplace_backward


class TokenLossFunction(torch.autograd.Function):
    """``logits [B, T, V]``, ``target [B*T]`` int64, ``scale [B*T]`` or None,
    ``num_items`` (``mean``'s divisor input) -> ``(loss, w, lse, z_y, max z, H, rank)``;
    only ``loss`` is differentiable (w.r.t. ``logits``)."""

    @staticmethod
    def forward(ctx, logits, target, scale, num_items, run: _Run):
        keep = target != run.ignore_index
        stats, value, w, beta = run.backend.token_terms(logits, target, run.ignore_index, run.objective, keep, run.shape, scale)
        norm = _inputs.normaliser(run.reduction, keep, num_items, value.dtype)
        loss = reduce(value, run.reduction, norm, run.shape).to(logits.dtype)  # as F.cross_entropy
        ctx.save_for_backward(logits, target, stats.lse, stats.entropy, w, beta, norm)
        ctx.run = run
        extras = (w, stats.lse, stats.target_logit, stats.max_logit, stats.entropy, stats.rank)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, target, lse, entropy, w, beta, norm = ctx.saved_tensors
        run = ctx.run
        g = upstream(grad_loss, run.reduction, norm, w.dtype)
        gb = None if beta is None else g * beta
        out = logits if run.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        run.backend.row_grad(logits, target, lse, entropy, g * w, gb, run.ignore_index, out)
        return out, None, None, None, None


def stats_dict(shape, w, lse, target_logit, max_logit, entropy, rank):
    """The per-token statistics returned by ``return_stats=True`` / ``token_stats``."""
    logp = target_logit - lse
    out = {
        "p_t": logp.exp(),
        "logp_t": logp,
        "entropy": entropy,
        "entropy_bits": entropy / LN2,
        "p_max": (max_logit - lse).exp(),
        "rank": rank,
        "lse": lse,
    }
    if w is not None:
        out["weight"] = w
    return {k: v.reshape(shape) for k, v in out.items()}


def prepare_logits(input: torch.Tensor):
    """``[N, V]`` or ``[B, T, V]`` -> a ``[B, T, V]`` view with unit last stride (copies only
    when the last stride is not 1)."""
    _inputs.check_float("input", input, dims=(2, 3))
    if input.shape[-1] == 0:
        raise ValueError("input: the vocabulary (last) dimension is empty")
    logits = input if input.dim() == 3 else input.unsqueeze(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def _target_checked(backend, flat_target, v_size, ignore_index, compute):
    """``compute()`` with the target range checked: before it on the reference (torch's
    indexing would fail first), after it on the Triton path, whose kernels clamp the index
    they load: the check's read-back then waits on work that was queued anyway."""
    if backend.name == "reference":
        _inputs.check_target_range(flat_target, v_size, ignore_index)
    out = compute()
    if backend.name == "triton":
        _inputs.check_target_range(flat_target, v_size, ignore_index)
    return out


@torch.compiler.disable
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weighting="ranktuner",
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    token_weight: torch.Tensor | None = None,
    sequence_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_backward: bool = False,
    impl: str = "auto",
):
    """Token-reweighted cross-entropy, a drop-in for ``F.cross_entropy`` on LM logits.

    Args:
        input: ``[N, V]`` or ``[B, T, V]`` logits (float32, bfloat16, float16; float64 on the
            reference). Any strides; statistics accumulate in float32.
        target: ``[N]`` or ``[B, T]`` integer class indices in ``[0, V)`` or ``ignore_index``.
        weighting: a name (``"ranktuner"``, ``"sft"``, ``"dft"``, ``"talr"``, ``"eaft"``,
            ``"overtone"``, ``"alpha_power"``, ``"threshold"``, ``"entropy_reg"``, ``"focal"``)
            or a config such as ``rk.RankTuner(xi="geo")``.
        ignore_index: targets equal to it contribute no value and no gradient.
        reduction: ``"mean"`` (sum / non-ignored count, or / ``num_items_in_batch``),
            ``"sum"`` or ``"none"`` (per-token values shaped like ``target``, 0 where ignored).
        num_items_in_batch: the divisor of ``"mean"`` under gradient accumulation.
        token_weight: per-token constants shaped like ``target`` (e.g. RL advantages).
        sequence_weight: ``[B]`` per-sequence constants (needs ``[B, T]`` targets).
        return_stats: also return a dict of per-token ``p_t``, ``logp_t``, ``entropy`` (nats),
            ``entropy_bits``, ``p_max``, ``rank``, ``lse`` and the ``weight`` used.
        inplace_backward: write the gradient over ``input``'s memory (saves N x V; the
            logits are destroyed by the backward pass).
        impl: ``"auto"`` (Triton on CUDA, reference otherwise), ``"triton"`` or ``"reference"``.

    Returns:
        the loss (a scalar, or ``[N]``/``[B, T]`` for ``"none"``), and the stats dict if asked.
    """
    objective = resolve(weighting)
    _inputs.check_reduction(reduction)
    logits = prepare_logits(input)
    shape = tuple(input.shape[:-1])
    flat_target = _inputs.check_target(target, shape, ignore_index, input, "input")
    scale = _inputs.caller_scale(token_weight, sequence_weight, shape, input)
    backend = get_backend(impl, input)
    run = _Run(objective, ignore_index, reduction, shape, backend, inplace_backward)
    loss, *extras = _target_checked(backend, flat_target, input.shape[-1], ignore_index,
                                    lambda: TokenLossFunction.apply(logits, flat_target, scale, num_items_in_batch, run))
    if return_stats:
        return loss, stats_dict(shape, *extras)
    return loss


@torch.compiler.disable
def token_stats(input: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, impl: str = "auto") -> dict:
    """Per-token ``p_t``, ``logp_t``, ``entropy`` (nats), ``entropy_bits``, ``p_max``, ``rank``
    and ``lse`` shaped like ``target``, without a loss (no gradient; O(N) memory)."""
    logits = prepare_logits(input)
    shape = tuple(input.shape[:-1])
    flat_target = _inputs.check_target(target, shape, ignore_index, input, "input")
    backend = get_backend(impl, input)
    with torch.no_grad():
        stats = _target_checked(backend, flat_target, input.shape[-1], ignore_index,
                                lambda: backend.row_stats(logits, flat_target, ignore_index))
    return stats_dict(shape, None, *stats)
