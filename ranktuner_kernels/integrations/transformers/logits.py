"""The objective on the logits with :func:`rk.cross_entropy`: the ``eval_logits`` path of the
patched forward (:func:`_logits_loss`) and :func:`make_compute_loss_func` (any model that
returns logits)."""

from __future__ import annotations

import inspect

import torch

import ranktuner_kernels as rk

from .checks import (_RESERVED_LOGITS, _align_targets, _check_ignore_index, _check_options, _check_weighting,
                     _shift, _targets, _weighting_name)
from .fused import _finish, _loss_args
from .meter import TOKEN_STATS, NLLMeter, _nll_terms, _token_metrics

def _logits_loss(self, state, arguments, labels, shift_labels):
    """``eval_logits=True`` in eval mode: the original forward's logits, then rk.cross_entropy."""
    logits_to_keep, num_items_in_batch, ignore_index, return_dict = _loss_args(state, arguments)
    out = state.original(**arguments, logits_to_keep=logits_to_keep, return_dict=True)
    logits = out.logits
    source = arguments.get("input_ids")
    if source is None:
        source = arguments.get("inputs_embeds")
    target = _targets(labels, shift_labels, ignore_index, tuple(source.shape[:2]), logits.shape[:-1],
                      logits_to_keep).to(logits.device)
    params = inspect.signature(rk.cross_entropy).parameters
    options = {k: v for k, v in state.options.items() if k in params}
    loss, stats = rk.cross_entropy(logits, target, weighting=state.weighting, ignore_index=ignore_index,
                                   reduction="mean", num_items_in_batch=num_items_in_batch,
                                   return_stats=TOKEN_STATS, **options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    aux_loss = getattr(out, "aux_loss", None)
    if aux_loss is not None and state.plan.aux is not None:  # the forward adds it only with labels
        loss = loss + state.plan.aux[2](self) * aux_loss.to(loss.device)
    return _finish(self, state, out, loss, logits, total, count, return_dict)


def make_compute_loss_func(weighting="sft", *, ignore_index: int = -100, **options):
    """A ``Trainer(compute_loss_func=...)`` computing the objective on ``outputs.logits``.

    The returned ``loss_func(outputs, labels, num_items_in_batch=None)`` (the signature
    transformers 5's ``Trainer.compute_loss`` calls) takes ``outputs.logits`` ``[B, T, V]`` and
    ``labels`` ``[B, T]``, shifts the labels as ``ForCausalLMLoss`` does (position ``t``
    predicts ``labels[t + 1]``), and returns ``rk.cross_entropy(logits, shifted, weighting=...,
    num_items_in_batch=num_items_in_batch)`` (a float32 scalar; the mean over kept tokens, or
    their sum over ``num_items_in_batch``). Trainer pops ``labels`` before calling the model, so
    the model (patched or not) returns its logits. Works with any causal LM that returns logits.

    The plain NLL of each call is recorded in ``loss_func.nll_meter`` (an :class:`NLLMeter`;
    ``"train"`` when autograd is enabled, ``"eval"`` under ``torch.no_grad()`` as in Trainer's
    evaluation), which :func:`add_nll_logging` finds on ``trainer.compute_loss_func``.

    Args:
        weighting: ``"sft"`` (the default), another name or a config such as ``rk.RankTuner()``.
        ignore_index: the ignored label (-100).
        **options: further keyword options of :func:`rk.cross_entropy` (``impl``,
            ``inplace_backward``, ...).
    """
    ignore_index = _check_ignore_index(ignore_index)
    _check_weighting(weighting)
    _check_options(options, rk.cross_entropy, _RESERVED_LOGITS, "rk.cross_entropy")
    meter = NLLMeter()

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.get("logits") if hasattr(outputs, "get") else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[0]
        if logits is None:
            raise ValueError("outputs: no logits (a patched model called with labels returns logits=None; "
                             "Trainer(compute_loss_func=...) calls the model without labels)")
        if labels is None:
            raise ValueError("labels: compute_loss_func needs the labels (the batch has no 'labels')")
        target = _align_targets(_shift(labels, ignore_index).to(logits.device), logits.shape[:-1],
                                logits.shape[:-1], 0)
        loss, stats = rk.cross_entropy(logits, target, weighting=weighting, ignore_index=ignore_index,
                                       reduction="mean", num_items_in_batch=num_items_in_batch,
                                       return_stats=("logp_t",), **options)
        total, count = _nll_terms(stats["logp_t"], target, ignore_index)
        meter.record("train" if torch.is_grad_enabled() else "eval", total, count)
        return loss

    compute_loss_func.nll_meter = meter
    compute_loss_func.objective = _weighting_name(weighting)
    return compute_loss_func
