"""One backend interface between the loss floor and the implementations.

:class:`Backend` is the protocol the losses, the fused path and THR call; two classes implement
it, :class:`TritonBackend` (the kernels) and :class:`ReferenceBackend` (pure torch). One is
chosen once per call (:func:`get_backend`); a vocabulary-parallel call wraps it in
``_distributed.ShardedBackend``, which merges the shards' statistics. No method asks which
backend it is. Nothing here knows about ``torch.distributed``.
"""

from __future__ import annotations

import os
from typing import Protocol

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


class Backend(Protocol):
    """What the loss floor calls. ``logits``: ``[B, T, V]`` (unit last stride), ``target``:
    ``[B*T]`` int64, statistics and coefficients ``[B*T]``; ``params``: the call's
    ``LossParams`` (ignore index, transform, ``extra_stats``).

    ``name``: the implementation (``"triton"``, ``"reference"``), the key of :data:`BACKENDS`;
    ``sharded``: the logits are one vocabulary shard; ``range_check``: when the call checks
    the targets' range, ``"before"`` the computation (torch's indexing would fail first) or
    ``"after"`` it (the kernels clamp the index they load)."""

    name: str
    sharded: bool
    range_check: str

    def vocab(self, v_local: int) -> int:
        """The whole vocabulary's size for logits with ``v_local`` columns."""

    def row_stats(self, logits, target, params, weighting=None, scale=None) -> tuple:
        """``(RowStats, terms)``: the statistics (with ``params.extra_stats``) and, where the
        backend fuses the row-local ``weighting``'s formula into the statistics pass, its
        ``(value, w, beta)`` times ``scale`` (else None: the torch formula runs afterwards)."""

    def partial_row_stats(self, logits, target, target_logit, params) -> dict:
        """A vocabulary shard's accumulators by name (``reference.partial_row_stats``)."""

    def row_grad(self, logits, target, stats: RowStats, coefs: GradCoefs, params, out):
        """The one gradient (SPEC) written into ``out`` (may be ``logits``)."""

    def topk_entropy(self, logits, target, k: int, params):
        """EAFT's entropy over each row's ``k`` largest ``z'``."""

    def reduce_input_grad(self, dh, params, like, fresh: bool):
        """The fused path's input gradient in ``like``'s dtype (summed over the vocabulary
        group by the sharded backend). ``fresh``: ``dh`` may be changed in place."""

    def dh_f32(self, params) -> bool:
        """Accumulate the fused path's ``dh`` in float32 (a shard's partial sum)."""

    def row_lse_entropy(self, logits, rows):
        """``lse`` and entropy of the rows ``rows`` of ``[N, V]`` or ``[B, T, V]`` logits, as
        ``[N]`` (0 on the other rows): THR's statistics pass."""

    def thr_pair_sums(self, logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, lse, precision):
        """THR's grouped pair sums (``rl.thr.thr_pair_sums``)."""


class _WholeVocabulary:
    """What both implementations share: logits that hold the whole vocabulary."""

    sharded = False

    def vocab(self, v_local: int) -> int:
        return v_local

    def reduce_input_grad(self, dh, params, like, fresh: bool):
        return None if dh is None else dh.to(like.dtype)

    def dh_f32(self, params) -> bool:
        return False

    def __repr__(self):
        return f"{type(self).__name__}()"


class ReferenceBackend(_WholeVocabulary):
    """The pure-torch reference (``ranktuner_kernels.reference``): float64 too, any device."""

    name = "reference"
    range_check = "before"

    def row_stats(self, logits, target, params, weighting=None, scale=None):
        return reference.row_stats(logits, target, params.ignore_index, params.transform, params.extra_stats), None

    def partial_row_stats(self, logits, target, target_logit, params):
        return reference.partial_row_stats(logits, target, target_logit, params.ignore_index, params.transform,
                                           params.extra_stats)

    def row_grad(self, logits, target, stats, coefs, params, out):
        return reference.row_grad(logits, target, stats.lse, stats.logp_t, stats.entropy, coefs,
                                  params.ignore_index, out, params.transform)

    def topk_entropy(self, logits, target, k, params):
        return reference.topk_entropy(logits, target, k, params.ignore_index, params.transform)

    def row_lse_entropy(self, logits, rows):
        n = logits.numel() // logits.shape[-1]
        lse_k, ent_k = reference_thr.row_lse_entropy(logits.reshape(n, logits.shape[-1]), rows)
        lse = torch.zeros(n, dtype=lse_k.dtype, device=logits.device)
        ent = torch.zeros_like(lse)
        lse[rows], ent[rows] = lse_k, ent_k
        return lse, ent

    def thr_pair_sums(self, logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, lse, precision):
        return reference_thr.thr_pair_sums(logits.reshape(-1, logits.shape[-1]), tokens, u_rows, u_group, o_rows,
                                           o_group, o_weight, hidden, lse=lse)


class TritonBackend(_WholeVocabulary):
    """The Triton kernels (``ranktuner_kernels.kernels``, imported on first use): the
    weighting's formula runs inside the statistics kernel where it is row-local."""

    name = "triton"
    range_check = "after"

    @property
    def kernels(self):
        from . import kernels  # Triton is imported on first use only

        return kernels

    def row_stats(self, logits, target, params, weighting=None, scale=None):
        formula = None
        if weighting is not None and weighting.row_local:
            formula = weighting.kernel_formula(self.kernels.weightings)
        stats, terms = self.kernels.row_stats(
            logits, target, params.ignore_index, *params.transform, extra=params.extra_stats, formula=formula,
            formula_args=weighting.kernel_args() if formula is not None else ((0.0, 0.0), (None,) * 4),
            scale=None if scale is None or formula is None else scale.float().contiguous())
        return RowStats(**stats), terms

    def partial_row_stats(self, logits, target, target_logit, params):
        return self.kernels.row_stats(logits, target, params.ignore_index, *params.transform,
                                      extra=params.extra_stats, partial_target_logit=target_logit)

    def row_grad(self, logits, target, stats, coefs, params, out):
        return self.kernels.row_grad(logits, target, stats.lse, stats.logp_t, stats.entropy,
                                     coefs.map(lambda c: c.float().contiguous()), params.ignore_index, out,
                                     *params.transform)

    def topk_entropy(self, logits, target, k, params):
        """The streaming kernel for ``k <= 64``, else ``torch.topk`` (the reference's)."""
        if k <= self.kernels.topk_entropy_max_k:
            return self.kernels.topk_entropy(logits, target, k, params.ignore_index, *params.transform)
        return reference.topk_entropy(logits, target, k, params.ignore_index, params.transform)

    def row_lse_entropy(self, logits, rows):
        return self.kernels.thr.row_lse_entropy(logits if logits.stride(-1) == 1 else logits.contiguous(), rows)

    def thr_pair_sums(self, logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, lse, precision):
        return self.kernels.thr.thr_pair_sums(logits if logits.stride(-1) == 1 else logits.contiguous(), tokens,
                                              u_rows, u_group, o_rows, o_group, o_weight, hidden, lse=lse,
                                              precision=precision)


#: The implementations by name (one stateless instance each).
BACKENDS = {b.name: b for b in (TritonBackend(), ReferenceBackend())}


def get_backend(impl: str, tensor: torch.Tensor) -> Backend:
    """The backend of ``impl`` (``"auto"``, ``"triton"``, ``"reference"``) for ``tensor``."""
    return BACKENDS[pick_impl(impl, tensor)]
