"""TRL's ``SFTTrainer`` on a token-reweighted loss, in one import.

    from ranktuner_kernels.integrations.trl import SFTTrainer     # instead of: from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, weighting="ranktuner")
    trainer.train()          # logs loss, nll, entropy, mean_token_accuracy, num_tokens (and eval_*)

TRL's ``SFTTrainer`` installs its fused LM head in ``__init__``; this one installs
:func:`.head.install_head` there instead (:func:`.trainers.heads_substituted`), with the
objective: a fused call's ``loss`` is ``weighting``'s loss from
:func:`rk.linear_cross_entropy` on the hidden states and the head, the logits never formed.
``compute_loss`` is TRL 1.16's with that loss in place of ``-Σ log_probs``.
"""

from __future__ import annotations

import inspect
import warnings

import torch

import ranktuner_kernels as rk

from .. import class_built_on_first_use
from ..transformers import add_nll_logging, is_patched
from ..transformers.checks import _check_weighting
from ..transformers.meter import NLLMeter
from .head import _RESERVED, head_state, install_head
from .trainers import heads_substituted, import_trl

__all__ = ["SFTTrainer"]


def _split_kwargs(trl_init, kwargs: dict) -> tuple[dict, dict]:
    """``(TRL's keyword arguments, the loss options)``; a name that is neither raises TypeError."""
    trl_params = set(inspect.signature(trl_init).parameters) - {"self"}
    loss_params = set(inspect.signature(rk.linear_cross_entropy).parameters) - (_RESERVED - {"temperature"})
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
    trl = import_trl("SFTTrainer")

    class SFTTrainer(trl.SFTTrainer):
        """TRL's ``SFTTrainer`` training on the fused, token-reweighted loss.

        Takes TRL's arguments (``model``, ``args``, ``train_dataset``, ``peft_config``, ...) plus:

        Args:
            weighting: the objective, a name (``"sft"``: plain cross-entropy, the default;
                ``"ranktuner"``, ``"dft"``, ...) or a config such as ``rk.RankTuner()``.
            **loss_options: the options of :func:`rk.linear_cross_entropy` (``chunk_size``,
                ``impl``, ``label_smoothing``, ``z_loss``, ``temperature``, ...).

        TRL's own set-up runs (a model name is loaded, a ``peft_config`` applied) with this
        library's fused LM head installed where TRL installs its own, carrying the objective.
        ``compute_loss`` is TRL 1.16's: the objective summed over the tokens whose label is not
        -100, divided by ``num_items_in_batch`` (or their count, at least 1), times the number
        of processes with ``average_tokens_across_devices``, plus the router auxiliary loss
        divided by the accumulation steps for a MoE model; and TRL's metrics from the same
        call: ``entropy``, ``mean_token_accuracy`` (the label is the first argmax),
        ``num_tokens``, ``aux_loss``, with the ``eval_`` prefix in evaluation. ``nll`` (and
        ``eval_nll``) next to ``loss``: the plain mean NLL, by
        :func:`~ranktuner_kernels.integrations.transformers.add_nll_logging`.

        Refused (``ValueError``): a ``compute_loss_func`` (the loss is the fused one), TRL's
        ``loss_type="dft"`` (use ``weighting="dft"``), ``label_smoothing_factor`` (use the
        ``label_smoothing=`` option), sequence parallelism, and a model patched by ``patch_model``
        (pass the weighting and options here instead).
        """

        def __init__(self, *args, weighting="sft", **kwargs):
            kwargs, loss_options = _split_kwargs(trl.SFTTrainer.__init__, kwargs)
            _check_weighting(weighting)
            if kwargs.get("compute_loss_func") is not None:
                raise ValueError("compute_loss_func: this SFTTrainer computes the loss with the fused, reweighted "
                                 "path; use trl.SFTTrainer for a loss function of your own")
            model = args[0] if args else kwargs.get("model")
            if isinstance(model, torch.nn.Module) and is_patched(model):
                raise ValueError("model: already patched with patch_model; pass weighting= and the loss options to "
                                 "SFTTrainer instead")
            loss_temperature = loss_options.pop("temperature", 1.0)  # the head's: it folds the model's scales

            def installer(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
                return install_head(model, temperature=temperature * loss_temperature,
                                    cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs, weighting=weighting,
                                    loss_options=loss_options)

            with heads_substituted(trl.SFTTrainer, installer):
                super().__init__(*args, **kwargs)
            if getattr(self.args, "loss_type", "nll") != "nll":
                raise ValueError(f"args.loss_type={self.args.loss_type!r}: TRL's own loss variant; leave it 'nll' "
                                 f"and pass weighting= (e.g. weighting='dft')")
            if getattr(self.args, "label_smoothing_factor", 0.0):
                raise ValueError(f"args.label_smoothing_factor={self.args.label_smoothing_factor}: needs the logits; "
                                 "pass the label_smoothing= loss option instead")
            parallelism = getattr(self.accelerator, "parallelism_config", None)
            if parallelism is not None and getattr(parallelism, "sp_enabled", False):
                raise ValueError("sequence parallelism: TRL reduces the model's own loss across ranks there; not "
                                 "supported by this SFTTrainer")
            self.nll_meter = NLLMeter()
            add_nll_logging(self, self.nll_meter)

        @property
        def loss_options(self) -> dict:
            """The weighting and loss options the trainer's fused head carries."""
            state = head_state(self.model)
            return {"weighting": state.weighting, "temperature": state.temperature, **state.loss_options}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            if self.aux_loss_enabled:
                inputs["output_router_logits"] = True
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            outputs = model(**inputs, fused_lm_head=True, **extra)
            loss = outputs.loss  # the objective / num_items_in_batch (or the kept count, at least 1), no router term
            # as TRL: num_items_in_batch counts every rank's tokens and DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if self.aux_loss_enabled:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            keep = outputs.label_mask
            self.nll_meter.record(mode, -outputs.log_probs.detach().float().sum(), keep.sum().float())
            # TRL's metrics, computed as TRL 1.16's compute_loss computes them
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(keep.sum()).sum()
            entropy_sum = gather(outputs.entropy.detach().sum()).sum()
            num_correct = gather(outputs.is_top1.sum()).sum()
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
            if self.aux_loss_enabled:
                self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss).mean().item())
            if not return_outputs:
                return loss
            # as TRL: compute_metrics / preprocess_logits_for_metrics need the logits the fused head never forms
            warnings.warn("compute_metrics / preprocess_logits_for_metrics need the logits, which the fused loss does "
                          "not form: they are recomputed with an extra forward pass", stacklevel=2)
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs

    return SFTTrainer


def __getattr__(name):  # PEP 562: TRL is imported when the class is first asked for (pickle finds it here)
    if name == "SFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
