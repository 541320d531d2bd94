"""TRL integration: the one-line switch of an ``SFTTrainer`` run to a token-reweighted loss.

    from ranktuner_kernels.integrations.trl import SFTTrainer     # instead of: from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, weighting="ranktuner")
    trainer.train()          # logs loss, nll, entropy, mean_token_accuracy, num_tokens (and eval_*)

:class:`SFTTrainer` is TRL's ``trl.SFTTrainer`` with the model patched by
:func:`ranktuner_kernels.integrations.transformers.patch_model` (the fused loss), TRL's metrics
computed from the fused loss's per-token statistics, and the plain NLL logged next to the
objective. TRL is an optional dependency (the ``trl`` extra), imported on first use of the class.
"""

from __future__ import annotations

import inspect
import warnings

import torch

import ranktuner_kernels as rk

from .. import class_built_on_first_use
from .. import transformers as _rkt
from ..transformers.checks import _RESERVED_LINEAR, _check_weighting

__all__ = ["SFTTrainer"]

# patch_model's own keywords besides the options of rk.linear_cross_entropy
_PATCH_KEYWORDS = ("ignore_index", "eval_logits")


def _import_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError("ranktuner_kernels.integrations.trl.SFTTrainer needs TRL: "
                          'pip install "ranktuner-kernels[trl]" (the `trl` extra)') from e
    return trl


def _split_kwargs(trl_init, kwargs: dict) -> tuple[dict, dict]:
    """``(TRL's keyword arguments, patch_model's)``; a name that is neither raises TypeError."""
    trl_params = set(inspect.signature(trl_init).parameters) - {"self"}
    loss_params = set(inspect.signature(rk.linear_cross_entropy).parameters) - _RESERVED_LINEAR
    loss_params |= set(_PATCH_KEYWORDS)
    ours = {}
    for key in list(kwargs):
        if key in trl_params:
            continue
        if key not in loss_params:
            raise TypeError(f"{key}: neither an argument of trl.SFTTrainer nor a loss option (loss options: "
                            f"{', '.join(sorted(loss_params))})")
        ours[key] = kwargs.pop(key)
    return kwargs, ours


@class_built_on_first_use
def _sft_trainer_class():
    trl = _import_trl()
    import transformers

    class SFTTrainer(trl.SFTTrainer):
        """TRL's ``SFTTrainer`` training on the fused, token-reweighted loss.

        Takes TRL's arguments (``model``, ``args``, ``train_dataset``, ``peft_config``, ...) plus:

        Args:
            weighting: the objective, a name (``"sft"``: plain cross-entropy, the default;
                ``"ranktuner"``, ``"dft"``, ...) or a config such as ``rk.RankTuner()``.
            **loss_options: ``ignore_index``, ``eval_logits`` and the options of
                :func:`rk.linear_cross_entropy` (``chunk_size``, ``impl``, ``label_smoothing``,
                ``z_loss``, ``temperature``, ...), passed to ``patch_model``.

        After TRL's own set-up (which may load the model from a name and wrap it with PEFT), the
        model is patched (``patch_model(self.model, weighting, **loss_options)``): a call with
        labels computes the loss from the hidden states and the LM head without the logits.
        ``compute_loss`` is transformers' ``Trainer.compute_loss`` on that model (so gradient
        accumulation divides by ``num_items_in_batch`` as the model's own loss does), and records
        TRL's metrics the way TRL 1.16's ``SFTTrainer.compute_loss`` does, from the fused loss's
        per-token statistics:

        * ``entropy``: the mean entropy (nats) of the predicted distribution over the tokens with a
          label, per ``compute_loss`` call (gathered across processes), averaged by TRL's ``log``
          over the calls of the logging interval;
        * ``mean_token_accuracy``: the fraction of those tokens whose label has the largest logit
          (a tie counts as correct; TRL breaks ties by the first index);
        * ``num_tokens``: the running count of input tokens (``attention_mask`` sum, or the
          ``position_ids`` length when padding-free), across processes;
        * ``nll`` next to ``loss`` (and ``eval_nll``): the plain mean NLL, by
          :func:`~ranktuner_kernels.integrations.transformers.add_nll_logging`.

        In evaluation they get TRL's ``eval_`` prefix. Refused (``ValueError``): a
        ``compute_loss_func`` (the loss is the fused one), TRL's ``loss_type="dft"`` (use
        ``weighting="dft"``), ``label_smoothing_factor`` (use the ``label_smoothing=`` option), and a
        model already patched (pass the weighting and options here instead).
        """

        def __init__(self, *args, weighting="sft", **kwargs):
            kwargs, loss_options = _split_kwargs(trl.SFTTrainer.__init__, kwargs)
            _check_weighting(weighting)
            if kwargs.get("compute_loss_func") is not None:
                raise ValueError("compute_loss_func: this SFTTrainer computes the loss with the fused, reweighted "
                                 "path; use trl.SFTTrainer for a loss function of your own")
            model = args[0] if args else kwargs.get("model")
            if isinstance(model, torch.nn.Module) and _rkt.is_patched(model):
                raise ValueError("model: already patched with patch_model; pass weighting= and the loss options to "
                                 "SFTTrainer instead")
            super().__init__(*args, **kwargs)
            if getattr(self.args, "loss_type", "nll") != "nll":
                raise ValueError(f"args.loss_type={self.args.loss_type!r}: TRL's own loss variant; leave it 'nll' "
                                 f"and pass weighting= (e.g. weighting='dft')")
            if getattr(self.args, "label_smoothing_factor", 0.0):
                raise ValueError(f"args.label_smoothing_factor={self.args.label_smoothing_factor}: needs the logits; "
                                 "pass the label_smoothing= loss option instead")
            _rkt.patch_model(self.model, weighting, **loss_options)
            _rkt.add_nll_logging(self)

        def _patch_state(self):
            state = getattr(_rkt._unwrap(self.model), _rkt._PATCH_ATTR, None)
            if state is None or not state.active:
                raise RuntimeError("model: the ranktuner patch was removed (unpatch_model) from the trainer's model")
            return state

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            if self.aux_loss_enabled:
                inputs["output_router_logits"] = True
            state = self._patch_state()
            state.token_metrics = None
            loss, outputs = transformers.Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                              num_items_in_batch=num_items_in_batch)
            sums = state.token_metrics
            if sums is None:
                raise RuntimeError("model: the patched forward did not compute the loss (no labels in the batch?)")
            # as TRL: gather each sum across processes, then the per-call means
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(sums[2]).sum()
            entropy_sum = gather(sums[0]).sum()
            num_correct = gather(sums[1]).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(
                (num_correct / num_valid).item() if num_valid > 0 else 0.0)
            if mode == "train":
                if "attention_mask" in inputs:
                    num_tokens_in_batch = gather(inputs["attention_mask"].sum()).sum().item()
                elif "position_ids" in inputs:
                    local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                    num_tokens_in_batch = gather(local).sum().item()
                else:
                    raise ValueError("inputs: expected 'attention_mask' or 'position_ids'")
                self._total_train_tokens += num_tokens_in_batch // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            aux_loss = getattr(outputs, "aux_loss", None)
            if self.aux_loss_enabled and aux_loss is not None:
                self._metrics[mode]["aux_loss"].append(gather(aux_loss.detach()).mean().item())
            if not return_outputs:
                return loss
            if getattr(outputs, "logits", None) is None:
                # TRL does the same: the fused loss forms no logits, so compute_metrics needs another forward
                # (or patch with eval_logits=True, which computes the eval loss on the logits)
                warnings.warn("compute_metrics / preprocess_logits_for_metrics need the logits, which the fused loss "
                              "does not form: they are recomputed with an extra forward pass (pass eval_logits=True "
                              "to compute the eval loss on them instead)", stacklevel=2)
                with torch.no_grad():
                    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs

    return SFTTrainer
