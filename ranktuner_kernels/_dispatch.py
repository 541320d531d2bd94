"""One dispatch between the Triton kernels and the pure-torch reference.

A :class:`Backend` is chosen once per call (:func:`get_backend`); a vocabulary-parallel call
wraps it in ``_distributed.ShardedBackend``, which merges the shards' statistics. Nothing
here knows about ``torch.distributed``."""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import thr as reference_thr
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
    """Row statistics, the fused weighting formula and the gradient of one implementation, on
    logits that hold the whole vocabulary."""

    #: the logits are one shard of the vocabulary (``_distributed.ShardedBackend``)
    sharded = False

    def __init__(self, name: str):
        self.name = name

    def vocab(self, v_local: int) -> int:
        """The whole vocabulary's size for logits with ``v_local`` columns."""
        return v_local

    def reduce_input_grad(self, dh, params, like, fresh: bool):
        """The fused path's input gradient in ``like``'s dtype (summed over the vocabulary
        group by the sharded backend). ``fresh``: ``dh`` may be changed in place."""
        return None if dh is None else dh.to(like.dtype)

    def dh_f32(self, params) -> bool:
        """Accumulate the fused path's ``dh`` in float32 (a shard's partial sum)."""
        return False

    @property
    def kernels(self):
        from . import kernels  # Triton is imported on first use only

        return kernels

    def row_stats(self, logits, target, params, weighting=None, scale=None):
        """``RowStats`` of ``[B, T, V]`` logits and, where ``weighting`` is given, row-local
        and this is the Triton backend, the weighting's ``(value, w, beta)`` from the
        statistics kernel (times ``scale``; else None: the torch formula runs afterwards)."""
        with_mean = params.label_smoothing > 0
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
        """EAFT's top-K entropy: the streaming kernel for ``k <= 64``, else ``torch.topk``."""
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

    def row_lse_entropy(self, logits, rows):
        """``lse`` and entropy of the rows ``rows`` of ``[N, V]`` or ``[B, T, V]`` logits, as
        ``[N]`` (0 on the other rows): THR's statistics pass."""
        n = logits.numel() // logits.shape[-1]
        if self.name == "triton":
            return self.kernels.thr.row_lse_entropy(logits if logits.stride(-1) == 1 else logits.contiguous(), rows)
        lse_k, ent_k = reference_thr.row_lse_entropy(logits.reshape(n, logits.shape[-1]), rows)
        lse = torch.zeros(n, dtype=lse_k.dtype, device=logits.device)
        ent = torch.zeros_like(lse)
        lse[rows], ent[rows] = lse_k, ent_k
        return lse, ent

    def thr_pair_sums(self, logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, lse, precision):
        """THR's grouped pair sums (``rl.thr.thr_pair_sums``)."""
        if self.name == "triton":
            return self.kernels.thr.thr_pair_sums(logits if logits.stride(-1) == 1 else logits.contiguous(), tokens,
                                                  u_rows, u_group, o_rows, o_group, o_weight, hidden, lse=lse,
                                                  precision=precision)
        return reference_thr.thr_pair_sums(logits.reshape(-1, logits.shape[-1]), tokens, u_rows, u_group, o_rows,
                                           o_group, o_weight, hidden, lse=lse)


def get_backend(impl: str, tensor: torch.Tensor) -> Backend:
    return Backend(pick_impl(impl, tensor))
