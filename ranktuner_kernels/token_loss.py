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

import torch

from . import _call, _inputs, _ops, _schema, _terms
from ._params import LossParams
from .weightings import Terms

SPEC = _schema.TOKEN_LOSS


@_ops.function(SPEC)
class TokenLossFunction(torch.autograd.Function):
    """``logits [B, T, V]``, ``target [B*T]`` int64, ``scale [B*T]`` or None, ``norm`` (the
    divisor of ``"mean"``) -> the outputs of ``_schema.TOKEN_LOSS`` (``loss``, ``w``,
    ``z_loss``, the statistics); only ``loss`` is differentiable (w.r.t. ``logits``)."""

    @staticmethod
    def forward(ctx, logits, target, scale, norm, params: LossParams):
        keep = target != params.ignore_index
        stats, terms, z_loss, value = _terms.forward_terms(params, logits, target, keep, scale)
        loss = _terms.reduce(value, params.reduction, norm, params.shape)
        values = dict(logits=logits, target=target, norm=norm, loss=loss, w=terms.w, z_loss=z_loss, beta=terms.beta,
                      **stats.present())
        SPEC.save(ctx, values)
        ctx.params, ctx.backward_ran = params, False
        return SPEC.returns(ctx, values)

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.params
        if params.inplace_backward and ctx.backward_ran:
            raise RuntimeError("rk.cross_entropy(inplace_backward=True): the first backward overwrote the logits "
                               "with their gradient, so a second backward (retain_graph=True) cannot run; "
                               "use inplace_backward=False")
        saved = SPEC.saved_values(ctx)
        logits, target, w = saved["logits"], saved["target"], saved["w"]
        keep = target != params.ignore_index
        stats = _schema.stats_of(saved)
        g = _terms.upstream(SPEC.output_grads(grads)["loss"], params.reduction, saved["norm"], target.numel(), w.dtype)
        coefs = _terms.grad_coefs(params, stats, keep, Terms(None, w, saved["beta"]), g, params.vocab(logits.shape[-1]))
        out = logits if params.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        params.backend.row_grad(logits, target, stats, coefs, params, out)
        if params.inplace_backward:
            ctx.backward_ran = True
            # the kernels write through a raw pointer: tell autograd the logits changed, so that
            # an op that saved them for its own backward raises instead of reading the gradient
            torch.autograd.graph.increment_version(logits)
        return SPEC.input_grads({"logits": out})


def run(call: _call.Call) -> dict:
    """The one call site of :class:`TokenLossFunction`: its outputs by name."""
    return _call.checked(call, lambda: _ops.call(SPEC, call.input, call.target, call.scale, call.norm,
                                                 params=call.params))



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
    return_stats=False,
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
        weighting: a name of the registry ``rk.weightings.WEIGHTINGS`` (default ``"sft"``; the
            README's table of objectives lists them) or a config such as ``rk.RankTuner(xi="geo")``.
        softcap: Gemma-2 final-logit soft-capping ``z -> c tanh(z / c)`` before everything.
        temperature: ``z -> z / T`` (after the soft-cap) before everything.
        z_loss: ``lam``: adds ``lam * lse^2`` per kept token (PaLM), not reweighted.
        num_items_in_batch: the divisor of ``"mean"`` under gradient accumulation or data
            parallelism (a number or a one-element tensor; 0 divides by 1; NaN gives NaN).
        token_weight: per-token constants shaped like ``target`` (e.g. RL advantages).
        sequence_weight: ``[B]`` per-sequence constants (needs ``[B, T]`` targets).
        return_stats: also return a dict of per-token statistics shaped like ``target`` (NaN
            where ignored in the float ones): ``True`` for all of them, or a tuple/list of
            names for those only (the optional ones cost an extra accumulator each): ``p_t``,
            ``logp_t``, ``entropy`` (nats), ``entropy_bits``, ``p_max``, ``rank``, ``lse``,
            ``accuracy`` (the target attains the max logit: ties count as correct),
            ``logit_mean``, ``log_sum_p2`` (``log sum_i p_i^2``), ``is_top1`` (the target is
            ``argmax`` with torch's tie rule: the first maximal index wins), the ``weight``
            used, and ``z_loss`` with z-loss (``docs/SPEC.md``, "Returned statistics").
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
    call = _call.prepare(
        "cross_entropy", input, target, weighting=weighting, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, temperature=temperature, z_loss=z_loss,
        num_items_in_batch=num_items_in_batch, token_weight=token_weight, sequence_weight=sequence_weight,
        inplace_backward=inplace_backward, impl=impl, process_group=process_group, vocab_offset=vocab_offset,
        vocab_size=vocab_size, dp_group=dp_group, return_stats=return_stats)
    return _schema.loss_result(call, run(call))


@_inputs.eager
def token_stats(input: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, softcap=None,
                temperature: float = 1.0, impl: str = "auto", process_group=None, vocab_offset=None,
                vocab_size=None) -> dict:
    """Per-token ``p_t``, ``logp_t``, ``entropy`` (nats), ``entropy_bits``, ``p_max``, ``rank``,
    ``lse``, ``accuracy``, ``logit_mean``, ``log_sum_p2`` and ``is_top1`` (as
    :func:`cross_entropy`'s ``return_stats`` defines them) shaped like ``target``, without a loss
    (no gradient; O(N) memory), from one statistics pass. Ignored positions hold NaN (``rank``
    0, ``accuracy`` and ``is_top1`` False). ``process_group``, ``vocab_offset``,
    ``vocab_size``: a vocabulary shard, as in :func:`cross_entropy`."""
    call = _call.prepare("token_stats", input, target, ignore_index=ignore_index, reduction="none", softcap=softcap,
                         temperature=temperature, impl=impl, process_group=process_group, vocab_offset=vocab_offset,
                         vocab_size=vocab_size, return_stats=True)
    with torch.no_grad():
        stats, _ = _call.checked(call, lambda: call.params.backend.row_stats(call.input, call.target, call.params))
    return _schema.public_stats(call.stat_names, call.shape, call.keep, stats)
