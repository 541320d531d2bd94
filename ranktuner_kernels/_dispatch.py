"""One dispatch between the Triton kernels and the pure-torch reference."""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import GradCoefs, RowStats

#: Logit dtypes the Triton kernels accept; the reference also takes float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "reference")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_impl(impl: str, tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for ``impl`` and the tensor the loss runs on."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        use = tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and triton_available()
        return "triton" if use else "reference"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton': Triton is not installed")
        if tensor.dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl='triton': input dtype must be one of {KERNEL_DTYPES}, got {tensor.dtype}")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for the CPU "
                f"interpreter); input is on {tensor.device}"
            )
    return impl


class Backend:
    """Row statistics, the fused weighting formula and the gradient of one implementation."""

    def __init__(self, name: str):
        self.name = name

    @property
    def kernels(self):
        from . import kernels  # Triton is imported on first use only

        return kernels

    def row_stats(self, logits, target, params, weighting=None, scale=None):
        """``RowStats`` of ``[B, T, V]`` logits and, where ``weighting`` is given, row-local
        and this is the Triton backend, the weighting's ``(value, w, beta)`` from the
        statistics kernel (times ``scale``; else None: the torch formula runs afterwards)."""
        with_mean = params.label_smoothing > 0
        if params.shard is not None:  # a vocabulary shard: partial pass, merge, torch formula
            from . import _distributed

            return _distributed.row_stats(self, logits, target, params), None
        if self.name == "reference":
            return reference.row_stats(logits, target, params.ignore_index, params.transform, with_mean), None
        formula = None
        if weighting is not None and weighting.row_local:
            formula = weighting.kernel_formula(self.kernels.weightings)
        stats, terms = self.kernels.row_stats(
            logits, target, params.ignore_index, *params.transform, with_mean, formula,
            weighting.kernel_args() if formula is not None else ((0.0, 0.0), (None,) * 4),
            None if scale is None or formula is None else scale.float().contiguous())
        return RowStats(*stats), terms

    def row_grad(self, logits, target, stats: RowStats, coefs: GradCoefs, params, out):
        if self.name == "reference":
            return reference.row_grad(logits, target, stats.lse, stats.logp_t, stats.entropy, coefs,
                                      params.ignore_index, out, params.transform)
        coefs = GradCoefs(*(None if c is None else c.float().contiguous() for c in coefs))
        return self.kernels.row_grad(logits, target, stats.lse, stats.logp_t, stats.entropy, coefs,
                                     params.ignore_index, out, *params.transform)

    def topk_entropy(self, logits, target, k, params):
        """EAFT's top-K entropy: the streaming kernel for ``k <= 64``, else ``torch.topk``; on a
        vocabulary shard, the shards' top-K candidates gathered and merged."""
        if params.shard is not None:
            from . import _distributed

            return _distributed.topk_entropy(logits, target, k, params)
        if self.name == "triton" and k <= self.kernels.topk_entropy_max_k:
            return self.kernels.topk_entropy(logits, target, k, params.ignore_index, *params.transform)
        return reference.topk_entropy(logits, target, k, params.ignore_index, params.transform)

    def partial_row_stats(self, logits, target, target_logit, params):
        """A vocabulary shard's raw accumulators ``(m, u, a, r, zsum)`` (``reference.partial_row_stats``)."""
        with_mean = params.label_smoothing > 0
        if self.name == "reference":
            return reference.partial_row_stats(logits, target, target_logit, params.ignore_index, params.transform,
                                               with_mean)
        return self.kernels.row_stats(logits, target, params.ignore_index, *params.transform, with_mean,
                                      partial_target_logit=target_logit)


def get_backend(impl: str, tensor: torch.Tensor) -> Backend:
    return Backend(pick_impl(impl, tensor))
