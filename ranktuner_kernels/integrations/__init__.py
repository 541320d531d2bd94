"""Integrations with training frameworks, each imported on demand so that the framework stays
an optional dependency (importing :mod:`ranktuner_kernels` imports none of them):

* :mod:`ranktuner_kernels.integrations.transformers`: Hugging Face ``transformers`` (and TRL):
  ``patch_model``, ``make_compute_loss_func``, ``NLLLoggingCallback``. See ``docs/integrations.md``.
* :mod:`ranktuner_kernels.integrations.trl`: TRL's fused LM head (``add_fused_lm_head``) on
  this library's kernels, and TRL's GRPO, RLOO, DPO, KTO and SFT trainers on it
  (``from ranktuner_kernels.integrations.trl import GRPOTrainer``; ``SFTTrainer`` takes
  ``weighting=``).
"""

import functools


def class_built_on_first_use(factory):
    """``factory`` (a function that defines and returns a subclass of an optional framework's
    class) as a getter that builds the class on its first call, once, named as if it were
    defined at the top of the factory's module (for a PEP 562 ``__getattr__``)."""

    @functools.lru_cache(maxsize=None)
    def get():
        cls = factory()
        cls.__module__ = factory.__module__
        cls.__qualname__ = cls.__name__
        return cls

    return get
