"""Triton kernels (``@triton.jit``) and their launchers; mapped to ``ranktuner_kernels.kernels``.

Importing this module needs Triton. Set ``TRITON_INTERPRET=1`` before the import to run
the kernels on CPU tensors with Triton's interpreter (slow; small shapes only).
"""

from . import thr, weightings
from .row_stats import row_stats
from .row_grad import row_grad
from .topk_entropy import MAX_K as topk_entropy_max_k
from .topk_entropy import topk_entropy

__all__ = ["row_stats", "row_grad", "topk_entropy", "thr", "weightings"]
