"""``add_fused_lm_head``: TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, TRL 1.16)
on the library's kernels.

    from ranktuner_kernels.integrations.trl import add_fused_lm_head

    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    out = model(input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs, out.entropy     # [B, T - 1], zero where the label is -100

Same signature, fields and conventions as TRL's (:func:`add_fused_lm_head` lists them); the
differences are where the numbers come from: the model's forward is read by ``patch_model``'s
reader (decoder call, logit scale and soft-cap, router auxiliary loss: the model's own
expressions, or a refusal naming the model type), and the statistics come from
:func:`rk.linear_logprobs` (:mod:`.statistics`), whose log-probabilities keep their relative
precision on near-certain tokens where a float32 ``z_y - logsumexp(z)`` rounds to 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import types
from typing import NamedTuple

import torch

import ranktuner_kernels as rk
import ranktuner_kernels.distributed  # noqa: F401 - rk.distributed.is_fsdp_module

from .. import _heads, class_built_on_first_use
from ..transformers.checks import _check_options, _check_weighting, _keeps_all, _unwrap
from ..transformers.fused import _router_aux, _run_decoder
from ..transformers.patch import _bind, _CopiedNotPickled
from ..transformers.reader import _plan, _reduce_transforms
from .statistics import CORE_NAMES, FIELDS, head_statistics

__all__ = ["add_fused_lm_head", "fused_output_class", "head_inputs_captured", "HeadInputs"]

_HEAD_ATTR = "_ranktuner_fused_head"
_MARK = "_ranktuner_fused_forward"
_HEAD_CALL = "_ranktuner_fused_head_call"
IGNORE_INDEX = -100  # TRL's fused head masks the labels equal to -100 (no other value)
# options of rk.linear_cross_entropy the head sets itself (an objective's loss options cannot)
_RESERVED = {"input", "linear_weight", "target", "linear_bias", "weighting", "reduction", "ignore_index",
             "num_items_in_batch", "return_stats", "token_weight", "sequence_weight", "temperature"}


class _HeadState(_CopiedNotPickled):
    """What :func:`add_fused_lm_head` stored on the model (as ``model._ranktuner_fused_head``)."""

    install = "add_fused_lm_head"
    undo = None

    def __init__(self, original, plan):
        self.original = original  # the bound forward before the head (what fused_lm_head=False runs)
        self.plan = plan
        self.temperature = 1.0
        self.cast_lm_head_to_fp32 = False
        self.outputs = ("log_probs",)
        self.weighting = None  # an objective for `loss` (the drop-in SFTTrainer's); None: TRL's NLL
        self.loss_options = {}
        self.capture = None  # a list while head_inputs_captured runs: each fused call appends its HeadInputs


class HeadInputs(NamedTuple):
    """What one fused call of the head projected (detached): ``hidden`` ``[B, T', D]`` at the
    scored positions (``T' = T - 1`` with ``labels``: position ``t`` predicts ``labels[:, t + 1]``;
    ``T`` with ``shift_labels``), the head's ``weight`` ``[V, D]`` and ``bias`` ``[V]`` (or None)
    as used (a LoRA head's effective ones, in the projection dtype), and the logit transform
    ``z' = softcap·tanh(z / softcap) / temperature`` (the model's scales folded in)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    temperature: float


@contextlib.contextmanager
def head_inputs_captured(model):
    """While the block runs, every ``fused_lm_head=True`` call of ``model`` (its head installed
    by :func:`add_fused_lm_head`) appends its :class:`HeadInputs` to the yielded list: the
    hidden states the head saw and the head itself, handed out by the forward that computed them
    (what THR needs, without the logits and without a second forward). Holds references (the
    hidden states' memory stays alive until the list is dropped)."""
    state = head_state(model)
    if state.capture is not None:
        raise RuntimeError("model: head_inputs_captured is already running on this model")
    state.capture = captured = []
    try:
        yield captured
    finally:
        state.capture = None


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head`` on this library's kernels: afterwards
    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``
    (:func:`fused_output_class`) without materialising the ``[B, T, V]`` logits.

    With ``labels`` ``[B, T]`` (``-100`` ignored) position ``t`` is scored on ``labels[t + 1]``
    and every per-token field is ``[B, T - 1]``; with ``shift_labels`` ``[B, T]`` (already
    shifted, as under context parallelism) the fields are ``[B, T]``. With ``z'`` the model's
    logits after its own scale and soft-cap, divided by ``temperature``, and ``p = softmax(z')``:

    * ``log_probs``: ``log p_y`` (differentiable; always computed);
    * ``entropy``: ``-Σ_v p_v log p_v`` (differentiable);
    * ``log_sum_sq_probs``: ``log Σ_v p_v²``; ``mean_logits``: the mean of ``z'`` over the
      vocabulary; ``is_top1``: the label is the argmax of the logits (the first index wins a tie);
      these three without gradient;
    * every per-token field is 0 (``False``) where the label is -100; the fields not named in
      ``outputs`` are None; ``label_mask``: ``labels != -100``;
    * ``loss``: ``-Σ log_probs / n`` with ``n`` the call's ``num_items_in_batch`` or, without it,
      the number of kept labels (at least 1: a micro-batch without a kept label gives a zero that
      backward accepts); plus ``router_aux_loss_coef * aux_loss`` when the model routes experts and
      router logits are requested (the config's ``output_router_logits``, or the call's);
    * ``aux_loss``: the MoE load-balancing loss, computed as the model's own forward computes it.

    ``fused_lm_head=False`` (the default) runs the model's forward as before (``generate()`` is
    unchanged). The decoder and the head (``get_output_embeddings()``) are looked up on each call,
    so PEFT and FSDP may replace them afterwards; a PEFT model is unwrapped to its inner model,
    and a LoRA (or ``modules_to_save``) LM head is applied exactly. An FSDP2 head that is its own
    ``fully_shard`` unit is gathered by FSDP around the computation; a DeepSpeed ZeRO-3
    partitioned head is gathered by ZeRO as for any parameter read inside the engine's forward; a
    head on another device than the decoder's output (``device_map``) gets the hidden states
    moved to it. Calling it again on the same model replaces the options.

    Args:
        model: a transformers causal LM that ``patch_model`` accepts (or a PEFT model around one);
            any other is refused with the ValueError that names its model type.
        temperature: the positive number the logits are divided by (after the model's scale and
            soft-cap).
        cast_lm_head_to_fp32: project in float32, outside autocast; otherwise in the autocast
            dtype under autocast, else in the head's dtype.
        outputs: the per-token fields to compute, among ``"log_probs"``, ``"entropy"``,
            ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"``.

    Differences from TRL's head: log-probabilities, entropies and their gradients keep float32's
    relative precision on near-certain tokens (``p = 1 - 1e-8``: TRL's ``log p`` is 0); model
    types whose forward ``patch_model`` cannot reproduce are refused instead of guessed from
    config names; the log-probabilities are float64 for a float64 model.
    """
    install_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)


def install_head(model, *, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",), weighting=None,
                 loss_options=None):
    """:func:`add_fused_lm_head`, with an optional objective: with ``weighting`` (a name or config
    of ``rk.weightings``), the ``loss`` of a fused call is that objective from
    :func:`rk.linear_cross_entropy` (``loss_options``: its further options but ``temperature``,
    which is the head's), summed over the kept tokens and divided as the NLL would be, without
    the router term (``aux_loss`` is still returned: the trainer weighs it, as TRL's SFTTrainer
    does); ``log_probs`` / ``entropy`` are then the objective's statistics, without gradient.
    Returns ``model``."""
    wrapper, model = model, _unwrap(model)
    temperature = _check_temperature(temperature)
    if not isinstance(cast_lm_head_to_fp32, bool):
        raise TypeError(f"cast_lm_head_to_fp32: expected a bool, got {type(cast_lm_head_to_fp32).__name__}")
    outputs = _check_outputs(outputs)
    loss_options = dict(loss_options or {})
    if weighting is not None:
        _check_weighting(weighting)
        _check_options(loss_options, rk.linear_cross_entropy, _RESERVED, "rk.linear_cross_entropy")
    elif loss_options:
        raise TypeError(f"loss_options: {', '.join(sorted(loss_options))} without a weighting")
    plan = _plan(model)  # the ValueError naming the model type and what cannot be reproduced
    _heads.check_head(model.get_output_embeddings())
    try:  # the model's logit transforms with the caller's: one soft-cap at most, positive scales
        _reduce_transforms(plan.transforms, model, loss_options.get("softcap"), temperature)
    except ValueError as exc:
        raise ValueError(f"model: model_type {model.config.model_type!r} ({type(model).__name__}): {exc}") from None
    state = model.__dict__.get(_HEAD_ATTR)
    if state is None:
        state = _HeadState(model.forward, plan)

        @functools.wraps(type(model).forward)  # keeps the signature: generate() and Trainer inspect it
        def forward(self, *args, fused_lm_head=False, **kwargs):
            return _forward(self, fused_lm_head, args, kwargs)

        setattr(forward, _MARK, True)
        object.__setattr__(model, _HEAD_ATTR, state)
        model.forward = types.MethodType(forward, model)
    state.plan = plan
    state.temperature = temperature
    state.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
    state.outputs = outputs
    state.weighting = weighting
    state.loss_options = loss_options
    return wrapper


def has_fused_lm_head(model) -> bool:
    """Whether :func:`add_fused_lm_head` (this library's) was called on ``model`` (or its PEFT
    inner model)."""
    return _HEAD_ATTR in _unwrap(model).__dict__


def head_state(model) -> _HeadState:
    """The options of the head installed on ``model`` (RuntimeError if there is none)."""
    state = _unwrap(model).__dict__.get(_HEAD_ATTR)
    if state is None:
        raise RuntimeError("model: no fused LM head of ranktuner_kernels (add_fused_lm_head) on it")
    return state


@functools.lru_cache(maxsize=None)
def fused_output_class():
    """TRL's ``trl.trainer.utils.FusedCausalLMOutput`` when TRL is importable, else a
    ``transformers`` ``ModelOutput`` with the same fields."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return _own_output_class()
    return FusedCausalLMOutput


@class_built_on_first_use
def _own_output_class():
    import dataclasses

    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class FusedCausalLMOutput(ModelOutput):
        """TRL's ``FusedCausalLMOutput`` (its fields, in its order), for use without TRL."""

        loss: torch.Tensor | None = None
        log_probs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        log_sum_sq_probs: torch.Tensor | None = None
        mean_logits: torch.Tensor | None = None
        is_top1: torch.Tensor | None = None
        label_mask: torch.Tensor | None = None
        aux_loss: torch.Tensor | None = None

    return FusedCausalLMOutput


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature}")
    return float(temperature)


def _check_outputs(outputs) -> tuple:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs: expected a tuple of field names such as ('log_probs', 'entropy'), "
                        f"got {type(outputs).__name__}")
    unknown = [o for o in outputs if o not in FIELDS]
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {', '.join(map(repr, unknown))}; expected some of "
                         f"{', '.join(FIELDS)}")
    return tuple(o for o in FIELDS if o in outputs or o == "log_probs")


def _forward(self, fused_lm_head, args, kwargs):
    state = self.__dict__[_HEAD_ATTR]
    if not fused_lm_head:
        return state.original(*args, **kwargs)
    return _fused(self, state, args, kwargs)


def _fused(self, state, args, kwargs):
    plan = state.plan
    arguments = _bind(self, args, kwargs)
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    arguments.pop("return_dict", None)  # the output is always a FusedCausalLMOutput, as TRL's
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if not _keeps_all(logits_to_keep):
        raise ValueError(f"logits_to_keep: {logits_to_keep!r} with fused_lm_head=True; the fused head scores the "
                         "positions whose label is not -100 (mask the others in labels)")
    if labels is None and shift_labels is None:
        raise ValueError("labels: fused_lm_head=True needs labels (or shift_labels)")
    if "use_cache" in plan.named or plan.var_kw is not None:
        arguments["use_cache"] = False
    if plan.aux is not None and arguments.get(plan.aux[0]) is None and getattr(
            self.config.get_text_config(), "output_router_logits", False):
        arguments[plan.aux[0]] = True  # as TRL: router logits when the config asks for them
    base = _run_decoder(self, plan, arguments)
    hidden = getattr(base, "last_hidden_state", None)
    if hidden is None and isinstance(base, (tuple, list)) and base:
        hidden = base[0]
    target, shift = _targets(hidden, labels, shift_labels)
    softcap, temperature = _reduce_transforms(plan.transforms, self, state.loss_options.get("softcap"),
                                              state.temperature)
    head = self.get_output_embeddings()
    fields, objective, mask = _on_head(head, _score, hidden, target, shift, state, softcap, temperature)
    out = {name: _scatter(mask, fields[name]) if name in fields else None for name in FIELDS}
    count = mask.sum()
    denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    aux_term, aux_loss = _router_aux(self, plan, arguments, base)
    if objective is not None:  # install_head's objective: the router term is left to the trainer
        loss = objective / denominator
    else:
        loss = -out["log_probs"].sum() / denominator
        if aux_term is not None:
            loss = loss + aux_term.to(loss.device)
    return fused_output_class()(loss=loss, **out, label_mask=mask, aux_loss=aux_loss)


def _targets(hidden, labels, shift_labels):
    """``(targets, shift)``: ``labels[:, 1:]`` with ``shift=True`` (the last position is dropped
    from the hidden states), or ``shift_labels`` as given."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise TypeError("model: its decoder did not return [B, T, D] hidden states (last_hidden_state)")
    given = labels if shift_labels is None else shift_labels
    name = "labels" if shift_labels is None else "shift_labels"
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(given).__name__}")
    if tuple(given.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{name}: expected [B, T] = {tuple(hidden.shape[:2])} (the input's), got {tuple(given.shape)}")
    return (labels[:, 1:], True) if shift_labels is None else (shift_labels, False)


def _scatter(mask, values):
    """``values`` ``[K]`` put at the True positions of ``mask``, zero (False) elsewhere;
    differentiable, and connected to the graph even when ``K == 0``."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _on_head(head, fn, *args):
    """``fn(head, *args)``, run as one of the head's FSDP2 forward methods where the head is its
    own ``fully_shard`` unit (FSDP all-gathers its weight before, reshards after, and
    reduce-scatters the weight's gradient, as around the head's own forward)."""
    if not rk.distributed.is_fsdp_module(head):
        return fn(head, *args)
    if _HEAD_CALL not in head.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        object.__setattr__(head, _HEAD_CALL, types.MethodType(lambda self, f, *a: f(self, *a), head))
        register_fsdp_forward_method(head, _HEAD_CALL)
    return getattr(head, _HEAD_CALL)(fn, *args)


def _whole(t):
    """A DTensor parameter (a tensor-parallel head) as its full tensor (differentiable)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _score(head, hidden, target, shift, state, softcap, temperature):
    """``(fields of the kept rows, objective sum or None, kept mask)`` of the head on ``hidden``
    ``[B, T, D]`` and ``target`` ``[B, T']``."""
    device = next(head.parameters()).device
    hidden = hidden.to(device)  # a model split across devices can end elsewhere than its head
    target = target.to(device)
    hidden, weight, bias = _heads.linear_operands(head, hidden)  # the whole sequence: PEFT's dropout draws
    if shift:
        hidden = hidden[:, :-1]
    weight, bias = _whole(weight), _whole(bias)
    if state.cast_lm_head_to_fp32:
        dtype = torch.float32
    else:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    mask = target != IGNORE_INDEX
    with torch.autocast(device.type, enabled=False):  # the dtype is explicit
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if state.capture is not None:
            state.capture.append(HeadInputs(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                            softcap, temperature))
        if state.weighting is None:
            fields = head_statistics(hidden[mask], weight, bias, target[mask], softcap=softcap,
                                     temperature=temperature, wanted=state.outputs)
            return fields, None, mask
        options = {k: v for k, v in state.loss_options.items() if k != "softcap"}
        names = tuple(CORE_NAMES[k] for k in state.outputs)  # only the statistics the fields read: one pass
        objective, stats = rk.linear_cross_entropy(
            hidden, weight, target, linear_bias=bias, weighting=state.weighting, reduction="sum",
            ignore_index=IGNORE_INDEX, softcap=softcap, temperature=temperature, return_stats=names, **options)
        return {k: stats[CORE_NAMES[k]][mask] for k in state.outputs}, objective, mask
