"""Integrations with training frameworks, each imported on demand so that the framework stays
an optional dependency (importing :mod:`ranktuner_kernels` imports none of them):

* :mod:`ranktuner_kernels.integrations.transformers`: Hugging Face ``transformers`` (and TRL):
  ``patch_model``, ``make_compute_loss_func``, ``NLLLoggingCallback``. See ``docs/integrations.md``.
* :mod:`ranktuner_kernels.integrations.trl`: TRL's ``SFTTrainer`` on the fused loss, with TRL's
  metrics (``from ranktuner_kernels.integrations.trl import SFTTrainer``).
"""
