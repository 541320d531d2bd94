"""ranktuner-kernels: fused Triton kernels for token-reweighted fine-tuning losses.

    import ranktuner_kernels as rk
    loss = rk.cross_entropy(logits, target)                          # F.cross_entropy
    loss = rk.cross_entropy(logits, target, weighting="ranktuner")
    loss = rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=rk.DFT())

Weightings and their math: ``docs/SPEC.md`` and :mod:`ranktuner_kernels.weightings` (its
registry ``WEIGHTINGS`` is the one list of them; their classes are exported here).
The pure-torch reference is :mod:`ranktuner_kernels.reference`; the Triton kernels are
:mod:`ranktuner_kernels.kernels` (imported on first use, so Triton is optional on CPU).
In the wheel both live inside this package; in a source checkout, ``pip install -e .`` maps
them the same way.
"""

import importlib.util as _importlib_util

if _importlib_util.find_spec(__name__ + ".reference") is None:  # reference/ is mapped in by the install
    raise ImportError(f"{__name__} is imported from a source checkout ({__path__[0]}) that is not installed: "
                      "run `pip install -e .` in the checkout's root first.")

from . import analysis, distributed, rl, weightings  # noqa: E402
from .analysis import inspect, noise_sensitivity  # noqa: E402
from .linear_loss import linear_cross_entropy  # noqa: E402
from .token_logprobs import linear_logprobs, logprobs  # noqa: E402
from .modules import LinearTokenReweightedLoss, TokenReweightedLoss  # noqa: E402
from .token_loss import cross_entropy, token_stats  # noqa: E402
from .weightings import WEIGHTINGS as _WEIGHTINGS  # noqa: E402
from .weightings import Weighting  # noqa: E402

# Every registered weighting's class, exported under its class name (rk.RankTuner, ...).
globals().update({_cls.__name__: _cls for _cls in _WEIGHTINGS.values()})

__version__ = "0.2.0"

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "token_stats",
    "logprobs",
    "linear_logprobs",
    "rl",
    "distributed",
    "analysis",
    "inspect",
    "noise_sensitivity",
    "TokenReweightedLoss",
    "LinearTokenReweightedLoss",
    "weightings",
    "Weighting",
    *(_cls.__name__ for _cls in _WEIGHTINGS.values()),
]


def __getattr__(name):
    """A weighting class registered after the import (``rk.weightings.register``), by its class name."""
    for cls in _WEIGHTINGS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {cls.__name__ for cls in _WEIGHTINGS.values()})
