"""``patch_model`` / ``unpatch_model``: one model instance's ``forward`` replaced by one that
computes the loss of a call with labels on the fused path (:mod:`.fused`) or, with
``eval_logits`` in eval mode, on the logits (:mod:`.logits`); every other call runs the
original forward."""

from __future__ import annotations

import copy
import functools
import inspect
import types
import warnings

import ranktuner_kernels as rk

from .. import _heads
from .checks import _RESERVED_LINEAR, _check_ignore_index, _check_options, _check_weighting, _unwrap, _weighting_name
from .fused import _fused_loss
from .logits import _logits_loss
from .meter import NLLMeter
from .reader import _plan, _reduce_transforms

_PATCH_ATTR = "_ranktuner_patch"
_MARK = "_ranktuner_patched_forward"


class _CopiedNotPickled:
    """Base of the state a patch keeps on a model instance (its replaced ``forward`` and options):
    ``copy.deepcopy`` of the model copies it (the copy is patched on its own: the bound forwards
    are rebound to the copy), pickling refuses it (``TypeError``).

    Pickle cannot keep such a patch: it stores a bound method as ``getattr(model, "forward")``
    and evaluates that while the loaded model's ``__dict__`` is still empty, which finds the
    class's ``forward``; the loaded model would run the plain forward (plain cross-entropy)
    while still carrying the patch's state. ``install`` names the call to redo after loading."""

    install = "patch_model"
    undo = "unpatch_model(model)"  # how to pickle the plain model, if there is a way

    def __reduce_ex__(self, protocol):
        undo = f"; or {self.undo} before pickling" if self.undo else ""
        raise TypeError(f"model: a model patched by {self.install} cannot be pickled (torch.save(model), "
                        f"pickle): the loaded model would run its class's plain forward without the patch. Save it "
                        f"with model.save_pretrained(path) (or torch.save(model.state_dict())), load it and call "
                        f"{self.install} again{undo}")

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class _PatchState(_CopiedNotPickled):
    """What :func:`patch_model` stored on the model (as ``model._ranktuner_patch``)."""

    def __init__(self, original, had_instance_forward, instance_forward, config, plan):
        self.original = original  # the bound forward at patch time (what calls without labels run)
        self.had_instance_forward = had_instance_forward
        self.instance_forward = instance_forward  # model.__dict__["forward"] before patching, if any
        self.config = config
        self.plan = plan  # what the model's forward does from its decoder to its loss
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



def check_model(model) -> None:
    """Raise the ValueError :func:`patch_model` would raise for ``model`` (naming its
    ``model_type`` and the part of its ``forward`` the fused loss cannot reproduce); return None
    if it can be patched. A PEFT model is checked through its inner model."""
    _plan(_unwrap(model))


def patch_model(model, weighting="sft", *, ignore_index: int = -100, eval_logits: bool = False, **options):
    """Make ``model(..., labels=labels)`` compute its loss with :func:`rk.linear_cross_entropy`.

    Only this model instance is changed (its ``forward`` attribute; the class is untouched);
    :func:`unpatch_model` restores it. Patch before handing the model to Trainer (accelerate
    wraps the forward it finds). A PEFT model is unwrapped: its inner transformers model is
    patched (PEFT calls that model's forward), and the PEFT model is returned.

    Which models: any whose ``forward`` follows transformers' causal-LM layout, read from the
    class's own source at patch time (``docs/integrations.md`` lists the families): a decoder
    call ``outputs = self.<decoder>(...)`` (``model``, ``transformer``, ``gpt_neox``,
    ``model.decoder``, a vision-language ``model``, ...), its ``last_hidden_state`` sliced by
    ``logits_to_keep``, the head ``get_output_embeddings()``, then only transforms the core
    reproduces (scales ``logits * s`` / ``logits / s``, soft-caps ``c * tanh(logits / c)``, folded
    into the core's ``softcap=`` / ``temperature=``), ``self.loss_function`` being transformers'
    ``ForCausalLMLoss``, and an MoE router auxiliary loss (``router_aux_loss_coef *
    load_balancing_loss_func(...)``, added with ``output_router_logits``, returned as
    ``aux_loss``). Anything else is refused with a ValueError naming the model type and the
    statement (:func:`check_model` tells without patching).

    A call with ``labels`` (``[B, T]`` token ids, ``-100`` ignored) or ``shift_labels`` runs the
    decoder as the model's forward does to the final hidden states ``[B, T, D]``, keeps the positions
    ``logits_to_keep`` selects, and returns the loss of the head ``model.get_output_embeddings()``
    (``[V, D]``, tied or not, with its bias if any) on the next-token targets:

    * the causal shift of transformers' ``ForCausalLMLoss``: position ``t`` predicts
      ``labels[t + 1]``, the last position is ignored; a ``shift_labels`` keyword (already
      shifted, e.g. from a context-parallel collator) is used as is;
    * ``reduction="mean"``: the sum over kept tokens divided by ``num_items_in_batch`` when the
      call passes it (Trainer does, for gradient accumulation), else by the kept count;
    * the model's logit transforms (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``,
      Granite's ``logits_scaling``, ...) as ``softcap=`` / ``temperature=`` (a caller's
      ``temperature`` divides the model's logits; a second soft-cap is refused);
    * under ``torch.autocast`` the head runs in the autocast dtype, as ``lm_head`` would;
    * ``logits_to_keep``: labels shaped like the kept positions are used as is; full-length
      labels are sliced like the hidden states.

    The output is the model's own output class (``CausalLMOutputWithPast``, ``MoeCausalLMOutputWithPast``
    with ``aux_loss`` and ``router_logits``, a VLM's output, ...) with ``loss`` (float32 scalar, differentiable),
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
        model: a transformers causal LM (or a PEFT model around one), see above.
        weighting: ``"sft"`` (plain cross-entropy, the default), another name (``"ranktuner"``,
            ``"dft"``, ...) or a config such as ``rk.RankTuner(xi="geo")``.
        ignore_index: the label that marks ignored positions (transformers uses -100).
        eval_logits: see above.
        **options: further keyword options of :func:`rk.linear_cross_entropy` (``chunk_size``,
            ``impl``, and what the core offers, e.g. ``temperature``, ``label_smoothing``,
            ``z_loss``); with ``eval_logits``, those :func:`rk.cross_entropy` takes are passed to it.

    ``copy.deepcopy(model)`` is patched on its own; pickling a patched model (``torch.save(model)``)
    raises ``TypeError``: save with ``save_pretrained`` (or the ``state_dict``), load, and patch again.

    Returns:
        ``model`` (patched in place). Patching a patched model replaces its options.

    Raises:
        ValueError: a model whose forward cannot be reproduced (the message names its
            ``model_type`` and the statement), or a ``softcap=`` on a model that soft-caps.
        TypeError: not a transformers model; an unknown option or weighting.
    """
    wrapper, model = model, _unwrap(model)
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits: expected a bool, got {type(eval_logits).__name__}")
    ignore_index = _check_ignore_index(ignore_index)
    _check_weighting(weighting)
    _check_options(options, rk.linear_cross_entropy, _RESERVED_LINEAR, "rk.linear_cross_entropy")
    plan = _plan(model)
    _heads.check_head(model.get_output_embeddings())  # an adapted head PEFT wraps: refused here, not at a step
    try:  # the model's logit transforms with the caller's softcap / temperature: one cap at most
        _reduce_transforms(plan.transforms, model, options.get("softcap"), options.get("temperature", 1.0))
    except ValueError as exc:
        raise ValueError(f"model: model_type {model.config.model_type!r} ({type(model).__name__}): {exc}") from None

    state = getattr(model, _PATCH_ATTR, None)
    if state is None or not state.active:
        had = "forward" in model.__dict__
        state = _PatchState(model.forward, had, model.__dict__.get("forward"), model.config, plan)
        cls_forward = type(model).forward

        @functools.wraps(cls_forward)  # keeps the signature: Trainer and generate() inspect it
        def forward(self, *args, **kwargs):
            return _patched_forward(self, *args, **kwargs)

        setattr(forward, _MARK, True)
        object.__setattr__(model, _PATCH_ATTR, state)
        model.forward = types.MethodType(forward, model)
    state.plan = plan
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
    if not state.active or "fused_lm_head" in kwargs:
        # a call for a fused LM head installed before the patch (add_fused_lm_head) goes to that head
        return state.original(*args, **kwargs)
    arguments = _bind(self, args, kwargs)
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return state.original(*args, **kwargs)
    if state.eval_logits and not self.training:
        return _logits_loss(self, state, arguments, labels, shift_labels)
    return _fused_loss(self, state, arguments, labels, shift_labels)
