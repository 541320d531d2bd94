"""The fused path of the patched forward: the decoder run as the model's forward runs it, the
kept hidden states and the LM head into :func:`rk.linear_cross_entropy` (the logits never
materialised), the router auxiliary loss, and the model's own output class."""

from __future__ import annotations

import dataclasses

import torch

import ranktuner_kernels as rk
import ranktuner_kernels.distributed  # noqa: F401 - rk.distributed.head_cross_entropy

from .. import _heads
from .checks import _check_ignore_index, _slice_to_keep, _targets
from .meter import TOKEN_STATS, _nll_terms, _token_metrics
from .reader import _decoder, _reduce_transforms

def _loss_args(state, arguments) -> tuple:
    """Pop what belongs to the loss from the call's arguments: ``(logits_to_keep,
    num_items_in_batch, ignore_index, return_dict)``; the rest goes to the model."""
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    ignore_index = _check_ignore_index(arguments.pop("ignore_index", state.ignore_index))
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(state.config, "return_dict", True)
    return logits_to_keep, num_items_in_batch, ignore_index, True if return_dict is None else bool(return_dict)


def _output_fields(output_cls) -> tuple:
    """``output_cls``'s field names but ``loss`` and ``logits``. Marked as having a constant
    result (what ``torch._dynamo.assume_constant_result`` sets, without importing dynamo):
    ``torch.compile`` calls it at trace time instead of tracing ``dataclasses.fields`` (a graph
    break)."""
    return tuple(f.name for f in dataclasses.fields(output_cls) if f.name not in ("loss", "logits"))


_output_fields._dynamo_marked_constant = True


def _finish(self, state, base, loss, logits, nll_total, nll_count, return_dict, extra=None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    nll = state.meter.record("train" if self.training else "eval", nll_total, nll_count)
    output_cls = state.plan.output_cls or CausalLMOutputWithPast  # the class the model's forward returns
    fields = {name: getattr(base, name, None) for name in _output_fields(output_cls)}
    fields.update(extra or {})
    out = output_cls(loss=loss, logits=logits, **fields)
    # attributes, not keys: to_tuple() and Trainer's prediction_step see only the standard fields
    object.__setattr__(out, "nll", nll)
    object.__setattr__(out, "objective", state.objective)
    return out if return_dict else out.to_tuple()


def _run_decoder(self, plan, arguments):
    """Call the decoder as the model's forward does: the same arguments (the defaults it resolves
    from the config resolved here), ``**kwargs`` if it passes them."""
    for name, default in plan.resolve:
        if arguments.get(name) is None:
            arguments[name] = default(self)
    arguments.update(plan.fixed)
    args = [arguments.get(n, plan.defaults.get(n)) for n in plan.base_args]
    kwargs = {k: arguments.get(v, plan.defaults.get(v)) for k, v in plan.base_kw.items()}
    kwargs.update(plan.base_const)
    if plan.base_var_kw:
        kwargs.update((k, v) for k, v in arguments.items() if k not in plan.named)
    return _decoder(self, plan)(*args, **kwargs)


def _router_aux(self, plan, arguments, base):
    """``(coef * aux_loss, aux_loss)`` of an MoE model's router auxiliary loss, computed as its
    forward does when ``output_router_logits`` is on; ``(None, None)`` otherwise."""
    if plan.aux is None:
        return None, None
    flag, aux_fn, coef_fn = plan.aux
    if not arguments.get(flag):
        return None, None
    aux_loss = aux_fn(self, base, arguments.get("attention_mask"))
    return coef_fn(self) * aux_loss, aux_loss


def _fused_loss(self, state, arguments, labels, shift_labels):
    plan = state.plan
    logits_to_keep, num_items_in_batch, ignore_index, return_dict = _loss_args(state, arguments)
    base = _run_decoder(self, plan, arguments)
    hidden = getattr(base, "last_hidden_state", None)
    if hidden is None and isinstance(base, (tuple, list)) and base:
        hidden = base[0]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"model: {type(self).__name__}.{plan.base_attr} returned {type(base).__name__} without "
                        "last_hidden_state; expected the decoder's BaseModelOutputWithPast")
    kept = _slice_to_keep(hidden, logits_to_keep)
    target = _targets(labels, shift_labels, ignore_index, hidden.shape[:-1], kept.shape[:-1], logits_to_keep)
    # the model's logit transforms (soft-cap, scales) with the caller's, as the core's softcap / temperature
    softcap, temperature = _reduce_transforms(plan.transforms, self, state.options.get("softcap"),
                                              state.options.get("temperature", 1.0))
    options = {**state.options, "softcap": softcap, "temperature": temperature,
               "weighting": state.weighting, "ignore_index": ignore_index, "reduction": "mean",
               "num_items_in_batch": num_items_in_batch, "return_stats": TOKEN_STATS}
    head = self.get_output_embeddings()
    if rk.distributed.is_fsdp_module(head):
        # the head is its own FSDP2 unit: outside its forward its weight is a sharded DTensor; the
        # loss runs as one of its FSDP forward methods (gathered before, resharded after)
        loss, stats = rk.distributed.head_cross_entropy(head, kept, target, **options)
    else:
        kept, weight, bias = _heads.linear_operands(head, kept)
        kept = kept.to(weight.device)  # a model split across devices can end elsewhere than its head
        target = target.to(weight.device)
        device_type = weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):  # the dtype is explicit: the one lm_head would use
            loss, stats = rk.linear_cross_entropy(
                kept.to(dtype), weight.to(dtype), target,
                linear_bias=None if bias is None else bias.to(dtype), **options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    aux_term, aux_loss = _router_aux(self, plan, arguments, base)
    if aux_term is not None:
        loss = loss + aux_term.to(loss.device)
    extra = {} if aux_loss is None else {"aux_loss": aux_loss}
    return _finish(self, state, base, loss, None, total, count, return_dict, extra)
