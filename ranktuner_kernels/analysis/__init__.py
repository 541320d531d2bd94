"""Looking at a model through the per-token statistics, beside the losses (nothing here is on
a training path):

* :mod:`.render`, the token inspector: ``rk.inspect`` (per-token ``p_t``, ``H_t``, rank, the
  Relative Rank Indicator and a weighting's weight), one module per output: :mod:`.render_html`,
  :mod:`.render_png`, :mod:`.render_table` (the first two share :mod:`.style`, the colours);
* :mod:`.cli`, its command line: ``python -m ranktuner_kernels.analysis.cli --help``;
* :mod:`.noise_metric`, the paper's metric: ``rk.noise_sensitivity``, the noise-sensitivity
  diagnostic of the RankTuner paper (App. B.3);
* :mod:`.prior`, the prior strength of a model on a fine-tuning set (arXiv 2510.00526's
  proxy: the mean target probability before fine-tuning): ``rk.analysis.prior_strength`` and
  ``python -m ranktuner_kernels.analysis.prior``;
* :mod:`.indicator`, the scores the two share (the Relative Rank Indicator, a model's logits).
"""

from .indicator import model_logits, relative_rank_indicator, relative_rank_terms
from .noise_metric import NoiseSensitivity, noise_sensitivity
from .prior import PriorStrength, prior_strength
from .render import Inspection, inspect

__all__ = ["inspect", "Inspection", "noise_sensitivity", "NoiseSensitivity", "relative_rank_indicator",
           "relative_rank_terms", "model_logits", "prior_strength", "PriorStrength"]
