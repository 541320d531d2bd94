"""Token-reweighted cross-entropy on logits: ``rk.cross_entropy``, ``rk.token_stats`` and the
autograd Function.

Forward: one streaming pass per row computes the row statistics (``lse``, ``log p_t``,
``z'_y``, ``max z'``, entropy, rank); the weighting's formula turns them into ``value``,
``w``, ``beta`` per token (O(N); inside the statistics kernel on the Triton path). Backward:
a second pass per row writes the one gradient (``_terms``) into a new buffer, or over the
logits with ``inplace_backward=True``. Logits are read twice and the gradient written once.

With ``process_group`` the logits are a vocabulary shard: the statistics pass is a partial
pass merged across the group by three small all-reduces (``_distributed``), the gradient pass
is the same kernel on the shard. ``dp_group`` makes ``"mean"`` a data-parallel mean.
"""

from __future__ import annotations

import math

import torch

from . import _distributed, _inputs, _terms
from ._dispatch import get_backend
from ._params import LossParams, check_options
from .reference import RowStats, compute_dtype
from .weightings import LN2, Terms, resolve


def forward_terms(params: LossParams, logits, target, keep, scale):
    """``(stats, terms, z_loss, value)`` of ``[B, T, V]`` logits: the statistics, the
    weighting's terms (fused in the Triton kernel where row-local), and the token values."""
    backend, weighting = params.backend, params.weighting
    stats, fused = backend.row_stats(logits, target, params, weighting, scale)
    if fused is not None:
        value, w, beta = fused
        terms = Terms(value, w, beta if weighting.has_entropy_term else None)
    else:
        topk = backend.topk_entropy(logits, target, weighting.k, params) if weighting.needs_topk else None
        terms = _terms.weighting_terms(params, stats, keep, scale, topk)
    z_loss = _terms.z_loss_terms(params, stats, keep)
    return stats, terms, z_loss, _terms.total_value(params, stats, terms, z_loss)


class TokenLossFunction(torch.autograd.Function):
    """``logits [B, T, V]``, ``target [B*T]`` int64, ``scale [B*T]`` or None, ``norm`` (the
    divisor of ``"mean"``) -> ``(loss, w, z_loss, *RowStats)``; only ``loss`` is
    differentiable (w.r.t. ``logits``)."""

    @staticmethod
    def forward(ctx, logits, target, scale, norm, params: LossParams):
        keep = target != params.ignore_index
        stats, terms, z_loss, value = forward_terms(params, logits, target, keep, scale)
        loss = _terms.reduce(value, params.reduction, norm, params.shape)
        ctx.save_for_backward(logits, target, stats.lse, stats.logp_t, stats.entropy, stats.logit_mean,
                              terms.w, terms.beta, norm)
        ctx.params, ctx.backward_ran = params, False
        extras = (terms.w, z_loss, *stats)
        ctx.mark_non_differentiable(*(t for t in extras if t is not None))
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        params = ctx.params
        if params.inplace_backward and ctx.backward_ran:
            raise RuntimeError("rk.cross_entropy(inplace_backward=True): the first backward overwrote the logits "
                               "with their gradient, so a second backward (retain_graph=True) cannot run; "
                               "use inplace_backward=False")
        logits, target, lse, logp_t, entropy, logit_mean, w, beta, norm = ctx.saved_tensors
        keep = target != params.ignore_index
        stats = RowStats(lse, logp_t, None, None, entropy, None, logit_mean)
        g = _terms.upstream(grad_loss, params.reduction, norm, target.numel(), w.dtype)
        coefs = _terms.grad_coefs(params, stats, keep, Terms(None, w, beta), g, params.vocab(logits.shape[-1]))
        out = logits if params.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        params.backend.row_grad(logits, target, stats, coefs, params, out)
        if params.inplace_backward:
            ctx.backward_ran = True
            # the kernels write through a raw pointer: tell autograd the logits changed, so that
            # an op that saved them for its own backward raises instead of reading the gradient
            torch.autograd.graph.increment_version(logits)
        return out, None, None, None, None


def stats_dict(shape, keep, w, z_loss, stats: RowStats):
    """The per-token statistics returned by ``return_stats=True`` / ``token_stats``, shaped like
    the target. Ignored positions: NaN in every float statistic, ``rank`` 0, ``accuracy``
    False, ``weight`` and ``z_loss`` 0 (what they contributed)."""

    def nan_ignored(x):
        return torch.where(keep, x, math.nan)

    out = {
        "p_t": nan_ignored(stats.logp_t.exp()),
        "logp_t": nan_ignored(stats.logp_t),
        "entropy": nan_ignored(stats.entropy),
        "entropy_bits": nan_ignored(stats.entropy / LN2),
        "p_max": nan_ignored(stats.p_max),
        "rank": stats.rank,
        "lse": nan_ignored(stats.lse),
        "accuracy": keep & (stats.target_logit >= stats.max_logit),
    }
    if w is not None:
        out["weight"] = w
    if z_loss is not None:
        out["z_loss"] = z_loss
    return {k: v.reshape(shape) for k, v in out.items()}


def prepare_logits(input: torch.Tensor):
    """``[V]``, ``[N, V]``, ``[B, T, V]`` or ``[B, d1, ..., V]`` -> a ``[B, T, V]`` view with unit
    last stride (copies only when the last stride is not 1, or to flatten ``d1, ...``)."""
    if isinstance(input, torch.Tensor) and input.dim() == 0:
        raise ValueError("input: expected logits with the class dimension last, got a 0-D tensor")
    _inputs.check_float("input", input)
    if input.shape[-1] == 0:
        raise ValueError("input: the vocabulary (last) dimension is empty")
    if input.dim() < 3:
        logits = input.reshape((1,) * (3 - input.dim()) + tuple(input.shape))
    else:
        logits = input.reshape(input.shape[0], -1, input.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def checked_range(backend, flat_target, v_size, ignore_index, num_items, compute, checked=False):
    """``compute()`` with the target range checked: before it on the reference (torch's
    indexing would fail first), after it on the Triton path, whose kernels clamp the index
    they load: the check's read-back then waits on work that was queued anyway. ``checked``:
    the caller checked already (a vocabulary shard's targets are shard-local by now)."""
    if backend.name == "reference" and not checked:
        _inputs.check_range(flat_target, v_size, ignore_index, num_items)
    out = compute()
    if backend.name == "triton" and not checked:
        _inputs.check_range(flat_target, v_size, ignore_index, num_items)
    return out


def _shard(process_group, v_local, flat_target, vocab_offset, vocab_size, device):
    """The vocabulary shard of a vocabulary-parallel call, else None."""
    if process_group is None:
        if vocab_offset is not None or vocab_size is not None:
            raise ValueError("vocab_offset / vocab_size: only with process_group (a vocabulary shard)")
        return None
    return _distributed.vocab_shard(process_group, v_local, flat_target, vocab_offset, vocab_size, device)


def normaliser(reduction, keep, num_items_in_batch, dtype, weight_per_token, dp_group):
    """The divisor of ``"mean"`` (over a data-parallel group where given)."""
    if dp_group is None:
        return _inputs.normaliser(reduction, keep, num_items_in_batch, dtype, weight_per_token)
    return _distributed.normaliser(reduction, keep, num_items_in_batch, dtype, weight_per_token, dp_group)


def _legacy(size_average, reduce):
    if size_average is not None or reduce is not None:
        raise ValueError("size_average / reduce: deprecated in torch and not supported; use reduction=")


@_inputs.compilable
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    weighting="sft",
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    num_items_in_batch=None,
    token_weight: torch.Tensor | None = None,
    sequence_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_backward: bool = False,
    impl: str = "auto",
    process_group=None,
    vocab_offset: int | None = None,
    vocab_size: int | None = None,
    dp_group=None,
):
    """Token-reweighted cross-entropy with ``F.cross_entropy``'s signature and defaults: with no
    ``weighting`` it is plain cross-entropy; ``weighting="ranktuner"`` (or any other) reweights.

    Args:
        input: ``[N, V]``, ``[B, T, V]`` (or more leading dimensions, or unbatched ``[V]``)
            logits, class dimension LAST (unlike torch's ``[N, C, d1, ...]``: use
            ``x.movedim(1, -1)``); float32, bfloat16, float16 (float64 on the reference). Any
            strides; statistics accumulate in float32.
        target: the logits' leading shape (``[N]``, ``[B, T]``, ``[]``, ...): integer class
            indices in ``[0, V)`` or ``ignore_index`` (class probabilities are refused).
        weight: ``[V]`` per-class rescaling as in ``F.cross_entropy`` (``"mean"`` divides by the
            sum of ``weight[y]`` over the kept tokens). Not with ``label_smoothing``.
        ignore_index: targets equal to it contribute no value and no gradient.
        reduction: ``"mean"`` (sum / kept count, or / ``num_items_in_batch``), ``"sum"`` or
            ``"none"`` (per-token values shaped like ``target``, 0 where ignored).
        label_smoothing: ``eps`` in ``[0, 1]``, as ``F.cross_entropy`` defines it; with a
            weighting, the smoothing term is weighted by the token's ``w`` (SPEC).
        weighting: a name (``"sft"``, ``"ranktuner"``, ``"dft"``, ``"talr"``, ``"eaft"``,
            ``"overtone"``, ``"alpha_power"``, ``"threshold"``, ``"entropy_reg"``, ``"focal"``)
            or a config such as ``rk.RankTuner(xi="geo")``.
        softcap: Gemma-2 final-logit soft-capping ``z -> c tanh(z / c)`` before everything.
        temperature: ``z -> z / T`` (after the soft-cap) before everything.
        z_loss: ``lam``: adds ``lam * lse^2`` per kept token (PaLM), not reweighted.
        num_items_in_batch: the divisor of ``"mean"`` under gradient accumulation or data
            parallelism (a number or a one-element tensor; 0 divides by 1; NaN gives NaN).
        token_weight: per-token constants shaped like ``target`` (e.g. RL advantages).
        sequence_weight: ``[B]`` per-sequence constants (needs ``[B, T]`` targets).
        return_stats: also return a dict of per-token ``p_t``, ``logp_t``, ``entropy`` (nats),
            ``entropy_bits``, ``p_max``, ``rank``, ``lse``, ``accuracy`` (the target attains the
            max logit), the ``weight`` used, and ``z_loss`` with z-loss; NaN where ignored.
        inplace_backward: write the gradient over ``input``'s memory (saves N x V; the
            logits are destroyed by the backward pass, which can run once).
        impl: ``"auto"`` (Triton on CUDA, reference otherwise), ``"triton"`` or ``"reference"``.
        process_group: vocabulary parallelism: ``input`` is this rank's contiguous shard
            ``[..., V_r]`` of the logits (shards in rank order, uneven sizes allowed; every rank
            holds the same tokens and targets, which are global class indices). Loss, statistics
            and the gradient of the shard equal the unsharded call's; ``weight`` is the whole
            ``[V]``. A DTensor ``input`` sharded on its last dimension names its group itself.
        vocab_offset, vocab_size: the shard's first column and the whole vocabulary's size
            (both or neither); by default all-gathered from ``process_group``.
        dp_group: data parallelism: ``"mean"`` divides by the group's number of kept tokens (or
            ``num_items_in_batch``, the global count) over the group's size, so that the ranks'
            average (DDP's, FSDP's gradient average) is the single-process mean; TALR's median
            runs over the group's sequences. See ``docs/distributed.md``.

    Returns:
        the loss in float32 (float64 for float64 input): a scalar, or shaped like ``target`` for
        ``"none"``; and the stats dict if asked.
    """
    _legacy(size_average, reduce)
    input, process_group = _distributed.vocab_local(input, -1, "input", process_group)
    target = _distributed.replicated(target, "target")
    weighting = resolve(weighting)
    ignore_index = _inputs.check_ignore_index(ignore_index)
    tr, label_smoothing, z_loss = check_options(reduction, softcap, temperature, label_smoothing, z_loss)
    logits = prepare_logits(input)
    shape = tuple(input.shape[:-1])
    flat_target = _inputs.check_target(target, shape, input, "input")
    shard = _shard(process_group, input.shape[-1], flat_target, vocab_offset, vocab_size, input.device)
    v_size = input.shape[-1] if shard is None else shard.v_global
    scale = _inputs.caller_scale(token_weight, sequence_weight, shape, input)
    cw = _inputs.class_weight(weight, v_size, flat_target, ignore_index, input)
    if cw is not None:
        if label_smoothing > 0:
            raise ValueError("weight: a class weight with label_smoothing is not supported")
        scale = cw if scale is None else scale * cw
    if inplace_backward and torch._debug_has_internal_overlap(logits) != 0:
        raise ValueError("input: inplace_backward=True needs logits whose elements do not share memory "
                         "(this one is expanded or overlapping)")
    backend = get_backend(impl, input)
    keep = flat_target != ignore_index
    norm = normaliser(reduction, keep, num_items_in_batch, compute_dtype(input.dtype), cw, dp_group)
    params = LossParams(weighting, backend, shape, ignore_index, reduction, tr, label_smoothing, z_loss,
                        inplace_backward=inplace_backward, shard=shard, dp_group=dp_group)
    if shard is not None:  # checked once against the whole vocabulary, then shard-local indices
        _inputs.check_range(flat_target, v_size, ignore_index, num_items_in_batch)
        flat_target = _distributed.local_target(flat_target, shard, ignore_index)
    from . import _ops  # TokenLossFunction.apply, or its custom op under torch.compile

    loss, w, zl, *stats = checked_range(backend, flat_target, v_size, ignore_index, num_items_in_batch,
                                        lambda: _ops.token_loss(logits, flat_target, scale, norm, params),
                                        checked=shard is not None)
    if return_stats:
        return loss, stats_dict(shape, keep, w, zl, RowStats(*stats))
    return loss


@_inputs.eager
def token_stats(input: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, softcap=None,
                temperature: float = 1.0, impl: str = "auto", process_group=None, vocab_offset=None,
                vocab_size=None) -> dict:
    """Per-token ``p_t``, ``logp_t``, ``entropy`` (nats), ``entropy_bits``, ``p_max``, ``rank``,
    ``lse`` and ``accuracy`` shaped like ``target``, without a loss (no gradient; O(N) memory).
    Ignored positions hold NaN (``rank`` 0, ``accuracy`` False). ``process_group``,
    ``vocab_offset``, ``vocab_size``: a vocabulary shard, as in :func:`cross_entropy`."""
    input, process_group = _distributed.vocab_local(input, -1, "input", process_group)
    target = _distributed.replicated(target, "target")
    ignore_index = _inputs.check_ignore_index(ignore_index)
    tr, _, _ = check_options("none", softcap, temperature, 0.0, 0.0)
    logits = prepare_logits(input)
    shape = tuple(input.shape[:-1])
    flat_target = _inputs.check_target(target, shape, input, "input")
    shard = _shard(process_group, input.shape[-1], flat_target, vocab_offset, vocab_size, input.device)
    keep = flat_target != ignore_index
    if shard is not None:
        _inputs.check_range(flat_target, shard.v_global, ignore_index)
        flat_target = _distributed.local_target(flat_target, shard, ignore_index)
    backend = get_backend(impl, input)
    params = LossParams(resolve("sft"), backend, shape, ignore_index, transform=tr, shard=shard)
    with torch.no_grad():
        stats, _ = checked_range(backend, flat_target, input.shape[-1], ignore_index, None,
                                 lambda: backend.row_stats(logits, flat_target, params), checked=shard is not None)
    return stats_dict(shape, keep, None, None, stats)

