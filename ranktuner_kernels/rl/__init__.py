"""Reinforcement-learning helpers built on the token losses.

* :mod:`ranktuner_kernels.rl.east`: EAST question weights from answer-cluster entropies.
* :mod:`ranktuner_kernels.rl.policy_loss`: clipped policy-gradient losses (PPO/GRPO token
  ratio, GSPO-token) on per-token log-probabilities, with k3 KL and entropy terms.
* :mod:`ranktuner_kernels.rl.thr`: Token Hidden Reward scores and the THR-guided advantage rule.
* :mod:`ranktuner_kernels.rl.thr_linear`: the same from hidden states and the LM head (no logits).

The math, edge cases and snippets: ``docs/rl.md``.
"""

from .east import answer_entropy, east_weights
from .policy_loss import AGGREGATIONS, RATIOS, aggregate, policy_loss
from .thr import thr_advantages, thr_guided_advantages, thr_pair_sums, token_hidden_reward
from .thr_linear import linear_thr_guided_advantages, linear_token_hidden_reward

__all__ = [
    "answer_entropy",
    "east_weights",
    "policy_loss",
    "aggregate",
    "AGGREGATIONS",
    "RATIOS",
    "token_hidden_reward",
    "thr_advantages",
    "thr_guided_advantages",
    "thr_pair_sums",
    "linear_token_hidden_reward",
    "linear_thr_guided_advantages",
]
