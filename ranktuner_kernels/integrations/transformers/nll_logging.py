"""The plain NLL in Trainer's logs: :class:`NLLLoggingCallback` (a ``TrainerCallback`` built on
first use) and :func:`add_nll_logging`."""

from __future__ import annotations

import torch

from .. import class_built_on_first_use
from .meter import NLLMeter, _token_mean
from .patch import _PATCH_ATTR

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


@class_built_on_first_use
def _callback_class():
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

    return NLLLoggingCallback


def __getattr__(name):  # PEP 562: the TrainerCallback subclass is built on first use (and found by pickle here)
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
