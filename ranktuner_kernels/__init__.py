"""ranktuner-kernels: fused Triton kernels for token-reweighted fine-tuning losses.

    import ranktuner_kernels as rk
    loss = rk.cross_entropy(logits, target, "ranktuner")
    loss = rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=rk.DFT())

Objectives and their math: ``SPEC.md`` and :mod:`ranktuner_kernels.objectives`.
The pure-torch reference is :mod:`ranktuner_kernels.reference`; the Triton kernels are
:mod:`ranktuner_kernels.kernels` (imported on first use, so Triton is optional on CPU).
"""


def _map_source_checkout() -> None:
    """In a source checkout the folders ``reference/`` and ``csrc_triton/`` sit beside this
    package; pyproject maps them to ``ranktuner_kernels.reference`` and
    ``ranktuner_kernels.kernels`` in a wheel. Mirror that mapping when the package is imported
    from the checkout (``python -m ranktuner_kernels`` in the repository root)."""
    import importlib.abc
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    folders = {}
    for sub, folder in (("reference", "reference"), ("kernels", "csrc_triton")):
        src = os.path.join(os.path.dirname(here), folder)
        if not os.path.isdir(os.path.join(here, sub)) and os.path.isfile(os.path.join(src, "__init__.py")):
            folders[f"{__name__}.{sub}"] = src
    if not folders:
        return  # an installed wheel: the subpackages are inside this folder

    class _CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            src = folders.get(fullname)
            if src is None:
                return None
            return importlib.util.spec_from_file_location(fullname, os.path.join(src, "__init__.py"),
                                                          submodule_search_locations=[src])

    sys.meta_path.append(_CheckoutFinder())


_map_source_checkout()

from . import objectives  # noqa: E402
from .token_loss import cross_entropy, token_stats  # noqa: E402
from .linear_loss import linear_cross_entropy  # noqa: E402
from .modules import LinearTokenReweightedLoss, TokenReweightedLoss  # noqa: E402
from .objectives import (  # noqa: E402
    DFT,
    EAFT,
    SFT,
    TALR,
    AlphaPower,
    EntropyReg,
    Focal,
    Objective,
    OverTone,
    RankTuner,
    Threshold,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "token_stats",
    "TokenReweightedLoss",
    "LinearTokenReweightedLoss",
    "objectives",
    "Objective",
    "SFT",
    "DFT",
    "RankTuner",
    "TALR",
    "EAFT",
    "OverTone",
    "AlphaPower",
    "Threshold",
    "EntropyReg",
    "Focal",
]
