"""Hugging Face ``transformers`` integration: token-reweighted losses for causal LMs.

    import ranktuner_kernels as rk
    from ranktuner_kernels.integrations.transformers import patch_model, add_nll_logging

    patch_model(model, weighting="ranktuner")        # model(input_ids, labels=labels).loss is fused
    trainer = Trainer(model=model, args=args, ...)
    add_nll_logging(trainer)                         # logs "nll" / "eval_nll" next to "loss"

Three pieces, usable separately (``docs/integrations.md`` has the recipes):

* :func:`patch_model` / :func:`unpatch_model`: replace one model instance's ``forward`` so
  that a call with ``labels`` computes its loss with :func:`ranktuner_kernels.linear_cross_entropy`
  from the final hidden states and the LM head, without materialising the logits. Calls
  without labels (evaluation that wants logits, ``generate``) run the original forward.
* :func:`make_compute_loss_func`: a ``Trainer(compute_loss_func=...)`` that applies
  :func:`ranktuner_kernels.cross_entropy` to ``outputs.logits`` (any model with logits).
* :class:`NLLLoggingCallback` / :func:`add_nll_logging`: the plain mean NLL of the kept tokens
  in Trainer's train and eval logs, next to the objective's ``loss``.

``transformers`` is imported only inside these functions: importing this module (or
:mod:`ranktuner_kernels`) never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import types
import warnings

import torch

import ranktuner_kernels as rk

from . import _heads

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "make_compute_loss_func",
    "NLLMeter",
    "NLLLoggingCallback",
    "add_nll_logging",
]

#: ``config.model_type`` values :func:`patch_model` accepts. Their ``ForCausalLM.forward`` is
#: ``outputs = self.model(...)`` -> ``last_hidden_state`` -> ``slice_logits_to_keep`` ->
#: ``self.lm_head`` (-> ``final_logit_softcapping``) -> ``ForCausalLMLoss``; the patched
#: forward reproduces that with the fused loss. ``gemma3_text`` is ``Gemma3ForCausalLM``
#: (the text-only Gemma 3; the multimodal ``gemma3`` is not supported).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

_PATCH_ATTR = "_ranktuner_patch"
_MARK = "_ranktuner_patched_forward"
# arguments of the core losses that the integration sets itself (or that make no sense here)
_RESERVED_LINEAR = {"input", "linear_weight", "target", "linear_bias", "weighting", "reduction", "ignore_index",
                    "num_items_in_batch", "return_stats", "token_weight", "sequence_weight"}
_RESERVED_LOGITS = {"input", "target", "weighting", "reduction", "ignore_index", "num_items_in_batch",
                    "return_stats", "token_weight", "sequence_weight", "size_average", "reduce"}


# ----------------------------------------------------------------------------- helpers


def _weighting_name(weighting) -> str:
    """``"ranktuner"`` for ``"ranktuner"`` or ``rk.RankTuner(...)``."""
    if isinstance(weighting, str):
        return weighting
    return str(getattr(weighting, "name", type(weighting).__name__))


def _check_weighting(weighting) -> None:
    """Raise the core's ValueError/TypeError for an unknown weighting now, not at the first
    training step (a one-token probe on the CPU reference)."""
    if weighting is None:
        raise TypeError("weighting: expected a name such as 'ranktuner' or a config such as rk.RankTuner(), got None")
    rk.cross_entropy(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), weighting=weighting, impl="reference")


def _check_options(options: dict, fn, reserved: set, fn_name: str) -> None:
    """Every option must be a named parameter of ``fn`` that the integration does not set."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {k for k, p in inspect.signature(fn).parameters.items() if p.kind in named}
    for key in options:
        if key in reserved:
            raise TypeError(f"{key}: set by the integration itself, it cannot be passed as an option")
        if key not in params:
            raise TypeError(f"{key}: not an option of {fn_name} (options: {', '.join(sorted(params - reserved))})")


def _check_ignore_index(ignore_index) -> int:
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index`` back to the input's length, as
    transformers' ``ForCausalLMLoss`` does: position ``t`` predicts token ``t + 1``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
    if labels.dim() < 1:
        raise ValueError("labels: expected [B, T] (or [T]) token ids, got a scalar")
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0


def _slice_to_keep(x: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` on ``[B, T, ...]``: an int keeps the last
    ``logits_to_keep`` positions (0: all), a 1-D tensor those positions, a 2-D integer tensor
    per-sample positions, a 2-D bool tensor the True positions (flattened to ``[K, ...]``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 2:
            if logits_to_keep.dtype == torch.bool:
                return x[logits_to_keep]
            idx = logits_to_keep.reshape(*logits_to_keep.shape, *([1] * (x.dim() - 2)))
            return torch.take_along_dim(x, idx, dim=1)
        if logits_to_keep.dim() != 1:
            raise ValueError(f"logits_to_keep: expected an int or a 1-D/2-D tensor, got {logits_to_keep.dim()}-D")
        return x[:, logits_to_keep]
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep: expected an int >= 0 or a tensor, got {logits_to_keep!r}")
    return x[:, -logits_to_keep:] if logits_to_keep else x


def _align_targets(shift_labels: torch.Tensor, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    """The next-token targets of the kept positions.

    ``shift_labels`` shaped like the kept positions is used as is; shaped like the whole
    sequence (``[B, T]``) while ``logits_to_keep`` keeps fewer positions, it is sliced the same
    way as the hidden states (transformers itself raises there); any other layout with as many
    elements is flattened onto the kept positions, like ``ForCausalLMLoss``'s ``view(-1)``."""
    kept_shape = tuple(kept_shape)
    if tuple(shift_labels.shape) == kept_shape:
        return shift_labels
    if not _keeps_all(logits_to_keep) and tuple(shift_labels.shape) == tuple(full_shape):
        return _slice_to_keep(shift_labels.unsqueeze(-1), logits_to_keep).squeeze(-1)
    if shift_labels.numel() == int(torch.Size(kept_shape).numel()):
        return shift_labels.reshape(kept_shape)
    raise ValueError(f"labels: shape {tuple(shift_labels.shape)} does not match the {kept_shape} positions whose "
                     f"logits are kept (sequence {tuple(full_shape)}, logits_to_keep={logits_to_keep!r})")


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


# ----------------------------------------------------------------------------- the NLL meter


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


# ----------------------------------------------------------------------------- patch_model


class _PatchState:
    """What :func:`patch_model` stored on the model (as ``model._ranktuner_patch``)."""

    def __init__(self, original, had_instance_forward, instance_forward, config, softcap):
        self.original = original  # the bound forward at patch time (what calls without labels run)
        self.had_instance_forward = had_instance_forward
        self.instance_forward = instance_forward  # model.__dict__["forward"] before patching, if any
        self.config = config
        self.softcap = softcap
        self.active = True
        self.meter = NLLMeter()
        self.weighting = None
        self.options = {}
        self.ignore_index = -100
        self.eval_logits = False
        self.token_metrics = None  # [entropy sum, correct, kept] of the latest call with labels

    @property
    def objective(self) -> str:
        return _weighting_name(self.weighting)


def _unwrap(model):
    """A PEFT model's inner transformers model (PEFT's forward calls the inner model's
    ``forward``, so patching that instance is enough); any other model as is."""
    get_base_model = getattr(type(model), "get_base_model", None)
    if callable(get_base_model) and not hasattr(type(model), "get_output_embeddings"):
        return model.get_base_model()
    return model


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"model: expected a transformers causal LM with a config, got {type(model).__name__}")
    return model_type


def patch_model(model, weighting="ranktuner", *, ignore_index: int = -100, eval_logits: bool = False, **options):
    """Make ``model(..., labels=labels)`` compute its loss with :func:`rk.linear_cross_entropy`.

    Only this model instance is changed (its ``forward`` attribute; the class is untouched);
    :func:`unpatch_model` restores it. Patch before handing the model to Trainer (accelerate
    wraps the forward it finds). A PEFT model is unwrapped: its inner transformers model is
    patched (PEFT calls that model's forward), and the PEFT model is returned.

    A call with ``labels`` (``[B, T]`` token ids, ``-100`` ignored) or ``shift_labels`` runs the
    base model (``model.model``) to the final hidden states ``[B, T, D]``, keeps the positions
    ``logits_to_keep`` selects, and returns the loss of the head ``model.get_output_embeddings()``
    (``[V, D]``, tied or not, with its bias if any) on the next-token targets:

    * the causal shift of transformers' ``ForCausalLMLoss``: position ``t`` predicts
      ``labels[t + 1]``, the last position is ignored; a ``shift_labels`` keyword (already
      shifted, e.g. from a context-parallel collator) is used as is;
    * ``reduction="mean"``: the sum over kept tokens divided by ``num_items_in_batch`` when the
      call passes it (Trainer does, for gradient accumulation), else by the kept count;
    * ``config.final_logit_softcapping`` (Gemma 2/3) is passed as ``softcap=``;
    * under ``torch.autocast`` the head runs in the autocast dtype, as ``lm_head`` would;
    * ``logits_to_keep``: labels shaped like the kept positions are used as is; full-length
      labels are sliced like the hidden states.

    The output is a ``CausalLMOutputWithPast`` with ``loss`` (float32 scalar, differentiable),
    ``logits=None`` (the logits are never materialised), the base model's ``cache``,
    ``hidden_states`` and ``attentions``, and two attributes (not keys, so ``to_tuple()`` and
    Trainer's evaluation loop see the standard fields): ``outputs.nll``, the plain mean NLL of the
    kept tokens (float32, detached; NaN if every token is ignored) and ``outputs.objective``,
    the weighting's name. ``return_dict=False`` gives ``(loss, ...)`` without the logits.

    A call without labels runs the original forward unchanged (logits as usual). With
    ``eval_logits=True``, calls with labels in eval mode (``model.eval()``) also run the
    original forward and compute the same objective with :func:`rk.cross_entropy` on its
    logits (for ``compute_metrics`` that needs the logits); the output then has the logits.

    Args:
        model: a transformers causal LM whose ``config.model_type`` is in
            :data:`SUPPORTED_MODEL_TYPES`.
        weighting: a name (``"ranktuner"``, ``"sft"``, ``"dft"``, ...) or a config such as
            ``rk.RankTuner(xi="geo")``.
        ignore_index: the label that marks ignored positions (transformers uses -100).
        eval_logits: see above.
        **options: further keyword options of :func:`rk.linear_cross_entropy` (``chunk_size``,
            ``impl``, and what the core offers, e.g. ``temperature``, ``label_smoothing``,
            ``z_loss``); with ``eval_logits``, those :func:`rk.cross_entropy` takes are passed to it.

    Returns:
        ``model`` (patched in place). Patching a patched model replaces its options.

    Raises:
        ValueError: a model type not in :data:`SUPPORTED_MODEL_TYPES` (the message names it), or
            soft-capping on a core without ``softcap=``.
        TypeError: not a transformers model; an unknown option or weighting.
    """
    wrapper, model = model, _unwrap(model)
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: model_type {model_type!r} ({type(model).__name__}) is not supported by "
                         f"patch_model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
                         "make_compute_loss_func works with any model that returns logits.")
    for attr in ("model", "get_output_embeddings"):
        if not hasattr(model, attr):
            raise TypeError(f"model: {type(model).__name__} has no `{attr}`; expected a *ForCausalLM model")
    _heads.check_head(model.get_output_embeddings())  # an adapted head PEFT wraps: refused here, not at a step
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits: expected a bool, got {type(eval_logits).__name__}")
    ignore_index = _check_ignore_index(ignore_index)
    _check_weighting(weighting)
    _check_options(options, rk.linear_cross_entropy, _RESERVED_LINEAR, "rk.linear_cross_entropy")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        if options.get("softcap") is not None:
            raise ValueError(f"softcap: the model's config.final_logit_softcapping={softcap} already sets it")
        if "softcap" not in inspect.signature(rk.linear_cross_entropy).parameters:
            raise ValueError(f"model: config.final_logit_softcapping={softcap} needs rk.linear_cross_entropy("
                             "softcap=...), which this version of ranktuner_kernels lacks")

    state = getattr(model, _PATCH_ATTR, None)
    if state is None or not state.active:
        had = "forward" in model.__dict__
        state = _PatchState(model.forward, had, model.__dict__.get("forward"), model.config, softcap)
        cls_forward = type(model).forward

        @functools.wraps(cls_forward)  # keeps the signature: Trainer and generate() inspect it
        def forward(self, *args, **kwargs):
            return _patched_forward(self, *args, **kwargs)

        setattr(forward, _MARK, True)
        object.__setattr__(model, _PATCH_ATTR, state)
        model.forward = types.MethodType(forward, model)
    state.softcap = softcap
    state.weighting = weighting
    state.options = dict(options)
    state.ignore_index = ignore_index
    state.eval_logits = eval_logits
    return wrapper


def is_patched(model) -> bool:
    """Whether :func:`patch_model` is in effect on ``model``."""
    state = getattr(_unwrap(model), _PATCH_ATTR, None)
    return state is not None and state.active


def unpatch_model(model):
    """Undo :func:`patch_model`: ``model.forward`` is again exactly what it was before (the
    class's forward, or the instance attribute that was there). If something wrapped the
    patched forward afterwards (the wrapper is kept), the patch is switched off instead: every
    call then goes straight to the original forward. Returns ``model``; a model that is not
    patched is returned unchanged."""
    wrapper, model = model, _unwrap(model)
    state = getattr(model, _PATCH_ATTR, None)
    if state is None or not state.active:
        return wrapper
    current = model.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), _MARK, False):
        if state.had_instance_forward:
            model.__dict__["forward"] = state.instance_forward
        else:
            del model.__dict__["forward"]
        object.__delattr__(model, _PATCH_ATTR)
    else:
        warnings.warn("unpatch_model: model.forward was wrapped after patching; the patch is switched off and "
                      "calls pass through to the original forward", stacklevel=2)
    state.active = False
    return wrapper


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bind(self, args, kwargs) -> dict:
    """The call's arguments by name (``**kwargs`` flattened in), following the class's
    signature, so that ``labels`` is found whether passed by keyword or by position."""
    sig = _signature(type(self))
    arguments = dict(sig.bind(self, *args, **kwargs).arguments)
    arguments.pop(next(iter(sig.parameters)))  # self
    for name, p in sig.parameters.items():
        if name not in arguments:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            if arguments.pop(name):
                raise TypeError(f"{type(self).__name__}.forward: unexpected extra positional arguments")
    return arguments


def _patched_forward(self, *args, **kwargs):
    state = getattr(self, _PATCH_ATTR, None)
    if state is None:
        raise RuntimeError("patched forward called on a model without ranktuner patch state")
    if not state.active:
        return state.original(*args, **kwargs)
    arguments = _bind(self, args, kwargs)
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return state.original(*args, **kwargs)
    if state.eval_logits and not self.training:
        return _logits_loss(self, state, arguments, labels, shift_labels)
    return _fused_loss(self, state, arguments, labels, shift_labels)


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


def _targets(labels, shift_labels, ignore_index, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    elif not isinstance(shift_labels, torch.Tensor):
        raise TypeError(f"shift_labels: expected a tensor, got {type(shift_labels).__name__}")
    return _align_targets(shift_labels, full_shape, kept_shape, logits_to_keep)


def _finish(self, state, base, loss, logits, nll_total, nll_count, return_dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    state.meter.add("train" if self.training else "eval", nll_total, nll_count)
    fields = {f.name: getattr(base, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)
              if f.name not in ("loss", "logits")}
    out = CausalLMOutputWithPast(loss=loss, logits=logits, **fields)
    # attributes, not keys: to_tuple() and Trainer's prediction_step see only the standard fields
    object.__setattr__(out, "nll", _mean_nll(nll_total, nll_count))
    object.__setattr__(out, "objective", state.objective)
    return out if return_dict else out.to_tuple()


def _fused_loss(self, state, arguments, labels, shift_labels):
    logits_to_keep, num_items_in_batch, ignore_index, return_dict = _loss_args(state, arguments)
    base = self.model(**arguments)
    hidden = getattr(base, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(f"model: {type(self).__name__}.model returned {type(base).__name__} without "
                        "last_hidden_state; expected the decoder's BaseModelOutputWithPast")
    kept = _slice_to_keep(hidden, logits_to_keep)
    target = _targets(labels, shift_labels, ignore_index, hidden.shape[:-1], kept.shape[:-1], logits_to_keep)
    kept, weight, bias = _heads.linear_operands(self.get_output_embeddings(), kept)
    kept = kept.to(weight.device)  # a model split across devices can end elsewhere than its head
    target = target.to(weight.device)
    device_type = weight.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    extra = {} if state.softcap is None else {"softcap": state.softcap}  # else from the options, if any
    with torch.autocast(device_type, enabled=False):  # the dtype is explicit: the one lm_head would use
        loss, stats = rk.linear_cross_entropy(
            kept.to(dtype), weight.to(dtype), target,
            linear_bias=None if bias is None else bias.to(dtype),
            weighting=state.weighting, ignore_index=ignore_index, reduction="mean",
            num_items_in_batch=num_items_in_batch, return_stats=True, **extra, **state.options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    return _finish(self, state, base, loss, None, total, count, return_dict)


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
                                   reduction="mean", num_items_in_batch=num_items_in_batch, return_stats=True,
                                   **options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    return _finish(self, state, out, loss, logits, total, count, return_dict)


# ----------------------------------------------------------------------------- compute_loss_func


def make_compute_loss_func(weighting="ranktuner", *, ignore_index: int = -100, **options):
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
        weighting: a name or a config such as ``rk.RankTuner()``.
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
                                       return_stats=True, **options)
        total, count = _nll_terms(stats["logp_t"], target, ignore_index)
        meter.add("train" if torch.is_grad_enabled() else "eval", total, count)
        return loss

    compute_loss_func.nll_meter = meter
    compute_loss_func.objective = _weighting_name(weighting)
    return compute_loss_func


# ----------------------------------------------------------------------------- logging


def _find_meter(source) -> NLLMeter | None:
    if source is None:
        return None
    if isinstance(source, NLLMeter):
        return source
    meter = getattr(source, "nll_meter", None)
    if isinstance(meter, NLLMeter):
        return meter
    if isinstance(source, torch.nn.Module):
        for module in source.modules():
            state = getattr(module, _PATCH_ATTR, None)
            if state is not None and state.active:
                return state.meter
    return None


def _make_callback_class():
    from transformers import TrainerCallback

    class NLLLoggingCallback(TrainerCallback):
        """Adds the plain mean NLL of the kept tokens to Trainer's logs: ``nll`` next to the
        train ``loss`` (the mean over the logging interval's optimizer steps of each step's
        token mean, as Trainer averages ``loss``) and ``eval_nll`` next to ``eval_loss`` (the
        token-weighted mean over the evaluation; ``{prefix}_nll`` for another
        ``metric_key_prefix``), in ``trainer.state.log_history``, in the dict ``evaluate()``
        returns, and for the callbacks after this one (use :func:`add_nll_logging` to run it
        before the reporting integrations); ``predict()``'s metrics get ``test_nll``.

        Args:
            source: where the NLL is recorded: a model patched with :func:`patch_model`, the
                function from :func:`make_compute_loss_func`, or an :class:`NLLMeter`. Default:
                the patched model (or a patched submodule) Trainer passes to the callbacks.
        """

        def __init__(self, source=None):
            if source is not None and _find_meter(source) is None and not isinstance(source, torch.nn.Module):
                raise TypeError(f"source: expected a patched model, a make_compute_loss_func function or an NLLMeter, "
                                f"got {type(source).__name__}")
            self.source = source
            self._eval = None  # [sum, count] of the current evaluation's prediction steps

        def _meter(self, model):
            return _find_meter(self.source if self.source is not None else model)

        def _pop_eval(self):
            pair, self._eval = self._eval, None
            return _token_mean(pair)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter = self._meter(model)
            if meter is not None:
                meter.reset()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            meter = self._meter(model)
            if meter is not None:
                meter.end_step()

        def on_prediction_step(self, args, state, control, model=None, **kwargs):
            # Trainer's evaluation loop calls the model once per batch: take that call's NLL
            # (eval-mode calls made outside the loop are not counted)
            meter = self._meter(model)
            pair = None if meter is None else meter.take_last_eval()
            if pair is not None:
                self._eval = pair if self._eval is None else self._eval + pair

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            meter = self._meter(model)
            if meter is None or logs is None:
                return
            added = {}
            if "loss" in logs:
                value = meter.pop_train()
                if value is not None:
                    added["nll"] = value
            prefixes = [k[:-len("_loss")] for k in logs if k.endswith("_loss") and k != "train_loss"]
            if prefixes and f"{prefixes[0]}_runtime" in logs:
                value = self._pop_eval()
                if value is not None:
                    added[f"{prefixes[0]}_nll"] = value
            if not added:
                return
            history = state.log_history[-1] if state.log_history else None
            if history is not None and all(history.get(k) == v for k, v in logs.items()):
                history.update(added)
            logs.update(added)

        def on_evaluate(self, args, state, control, **kwargs):
            self._eval = None  # on_log took it; nothing carries over to the next evaluation

        def on_predict(self, args, state, control, metrics=None, **kwargs):
            value = self._pop_eval()
            prefixes = [k[:-len("_loss")] for k in (metrics or {}) if k.endswith("_loss")]
            if value is not None and prefixes:
                metrics[f"{prefixes[0]}_nll"] = value  # the dict predict() returns

    NLLLoggingCallback.__module__ = __name__
    NLLLoggingCallback.__qualname__ = "NLLLoggingCallback"
    return NLLLoggingCallback


@functools.lru_cache(maxsize=None)
def _callback_class():
    return _make_callback_class()


def __getattr__(name):  # PEP 562: the TrainerCallback subclass is built on first use
    if name == "NLLLoggingCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_nll_logging(trainer, source=None):
    """Add a :class:`NLLLoggingCallback` to ``trainer`` as its first callback, so that every
    logger after it (console, TensorBoard, W&B, ...) sees ``nll`` / ``eval_nll``. ``source``
    defaults to ``trainer.compute_loss_func`` when it is one of :func:`make_compute_loss_func`'s,
    else the patched ``trainer.model``. Returns the callback."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        raise TypeError(f"trainer: expected a transformers Trainer, got {type(trainer).__name__}")
    if source is None:
        source = trainer.compute_loss_func if _find_meter(getattr(trainer, "compute_loss_func", None)) else None
    if source is None and _find_meter(trainer.model) is None:
        raise ValueError("trainer: its model is not patched (patch_model) and its compute_loss_func is not from "
                         "make_compute_loss_func, so no NLL is recorded")
    callback = _callback_class()(source)
    handler.callbacks.insert(0, callback)
    return callback
