"""Dispatch between the Triton kernels and the pure-torch reference."""

from __future__ import annotations

import os

import torch

from ranktuner_kernels import _epilogue, reference

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
    """``row_stats`` and ``row_grad`` of one implementation, same signatures for both."""

    def __init__(self, name: str):
        self.name = name
        if name == "triton":
            from ranktuner_kernels import kernels

            self._impl = kernels
        else:
            self._impl = reference

    def row_stats(self, logits, target, ignore_index):
        return self._impl.row_stats(logits, target, ignore_index)

    def row_grad(self, logits, target, lse, entropy, gw, gb, ignore_index, out):
        if self.name == "triton":
            gw = gw.float().contiguous()
            gb = None if gb is None else gb.float().contiguous()
        return self._impl.row_grad(logits, target, lse, entropy, gw, gb, ignore_index, out)

    def topk_entropy(self, logits, target, k, ignore_index):
        return reference.topk_entropy(logits, target, k, ignore_index)

    def token_terms(self, logits, target, ignore_index, objective, keep, shape, scale):
        """``(stats, value, w, beta)`` of every row of ``[B, T, V]`` logits (``beta`` None
        where the objective has no entropy term). The Triton backend evaluates row-local
        objectives inside the statistics kernel; otherwise the torch epilogue runs on the stats."""
        if self.name == "triton" and objective.kernel_spec() is not None:
            s = None if scale is None else scale.float().contiguous()
            stats, (value, w, beta) = self._impl.row_stats(logits, target, ignore_index, objective=objective, scale=s)
            return stats, value, w, beta if objective.has_entropy_term else None
        stats = self.row_stats(logits, target, ignore_index)
        topk = self.topk_entropy(logits, target, objective.k, ignore_index) if objective.needs_topk else None
        return (stats, *_epilogue.token_terms(objective, stats, keep, shape, scale, topk))


def get_backend(impl: str, tensor: torch.Tensor) -> Backend:
    return Backend(pick_impl(impl, tensor))
