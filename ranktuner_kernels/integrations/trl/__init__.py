"""TRL integration: TRL's fused LM head and trainers on this library's kernels.

    from ranktuner_kernels.integrations.trl import add_fused_lm_head   # TRL's signature and output
    from ranktuner_kernels.integrations.trl import SFTTrainer          # instead of: from trl import SFTTrainer

* :func:`add_fused_lm_head` (:mod:`.head`): TRL 1.16's ``trl.trainer.utils.add_fused_lm_head``,
  with the per-token statistics from :func:`rk.linear_logprobs` (:mod:`.statistics`); a call
  ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``.
* :class:`RLOOTrainer`, :class:`DPOTrainer`, :class:`KTOTrainer` (:mod:`.trainers`): TRL's
  trainers with that head wherever TRL installs its own.
* :class:`GRPOTrainer` (:mod:`.grpo`): the same for TRL's ``GRPOTrainer``, with two options:
  ``east=EASTOptions(...)`` (EAST prompt weights) and ``thr=THROptions(...)`` (THR-guided token
  advantages from the hidden states the head hands out).
* :class:`SFTTrainer` (:mod:`.sft`): TRL's ``SFTTrainer`` on the same head, training on a
  token-reweighted loss (``weighting=``), with TRL's metrics.

TRL is an optional dependency (the ``trl`` extra): importing this package imports neither TRL
nor transformers; the trainer classes import TRL when first asked for.
"""

from .grpo import EASTOptions, THROptions
from .head import add_fused_lm_head, fused_output_class

__all__ = ["add_fused_lm_head", "FusedCausalLMOutput", "SFTTrainer", "GRPOTrainer", "EASTOptions", "THROptions",
           "RLOOTrainer", "DPOTrainer", "KTOTrainer"]


def __getattr__(name):  # PEP 562: TRL (or transformers) is imported when a class is first asked for
    if name == "FusedCausalLMOutput":
        return fused_output_class()
    if name == "SFTTrainer":
        from .sft import _sft_trainer_class

        return _sft_trainer_class()
    if name == "GRPOTrainer":
        from .grpo import grpo_trainer_class

        return grpo_trainer_class()
    if name in ("RLOOTrainer", "DPOTrainer", "KTOTrainer"):
        from .trainers import BUILDERS

        return BUILDERS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
