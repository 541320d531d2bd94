"""Hugging Face ``transformers`` integration: token-reweighted losses for causal LMs.

    import ranktuner_kernels as rk
    from ranktuner_kernels.integrations.transformers import patch_model, add_nll_logging

    patch_model(model, weighting="ranktuner")        # model(input_ids, labels=labels).loss is fused
                                                     # (the default weighting is "sft": plain CE)
    trainer = Trainer(model=model, args=args, ...)
    add_nll_logging(trainer)                         # logs "nll" / "eval_nll" next to "loss"

Three pieces, usable separately (``docs/integrations.md`` has the recipes):

* :func:`patch_model` / :func:`unpatch_model`: replace one model instance's ``forward`` so
  that a call with ``labels`` computes its loss with :func:`ranktuner_kernels.linear_cross_entropy`
  from the final hidden states and the LM head, without materialising the logits. Calls
  without labels (evaluation that wants logits, ``generate``) run the original forward. Which
  models is read from the class's own ``forward`` (:func:`check_model`); what it does between
  the head and the loss is reproduced or the model is refused by name.
* :func:`make_compute_loss_func`: a ``Trainer(compute_loss_func=...)`` that applies
  :func:`ranktuner_kernels.cross_entropy` to ``outputs.logits`` (any model with logits).
* :class:`NLLLoggingCallback` / :func:`add_nll_logging`: the plain mean NLL of the kept tokens
  in Trainer's train and eval logs, next to the objective's ``loss``.

``transformers`` is imported only inside these functions: importing this module (or
:mod:`ranktuner_kernels`) never imports it.

Modules, one concern each: :mod:`.checks` (arguments, the causal shift), :mod:`.meter` (the NLL
meter), :mod:`.reader` (the forward reader), :mod:`.fused` (the fused path), :mod:`.logits` (the
objective on the logits: the eval path and ``make_compute_loss_func``), :mod:`.patch`
(patch/unpatch), :mod:`.nll_logging` (the Trainer callback).
"""

from .checks import _unwrap
from .logits import make_compute_loss_func
from .meter import NLLMeter
from .nll_logging import _callback_class, add_nll_logging
from .patch import _PATCH_ATTR, check_model, is_patched, patch_model, unpatch_model

__all__ = [
    "check_model",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "make_compute_loss_func",
    "NLLMeter",
    "NLLLoggingCallback",
    "add_nll_logging",
]


def __getattr__(name):  # PEP 562: the TrainerCallback subclass is built on first use
    if name == "NLLLoggingCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
