"""The chunked hidden-state machinery of the two fused-linear functions (``linear_loss`` and
``token_logprobs``): how many rows a chunk holds, the chunk's logits, the gradient buffers
``(dh, dW, db)`` filled chunk by chunk, the backward sweep, and autocast of the operands.

For ``h [N, D]``, head ``W [V, D]``, bias ``b [V]`` and chunks of ``C`` rows::

    logits_c = h_c @ W.T (+ b)                     [C, V], the operands' dtype
    dz_c     = the one gradient, written over logits_c by the backend's gradient pass
    dh_c = dz_c @ W;  dW += dz_c.T @ h_c;  db += sum_rows dz_c (float32)

Chunk rule (:func:`chunk_rows`) and the memory bound: ``linear_loss``'s module docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import GradCoefs, RowStats, compute_dtype

#: Bytes of logits held at once by default, per device type (``linear_loss``'s docstring).
CHUNK_BYTES = {"cuda": 240 << 20, "cpu": 32 << 20}
ACC_POLICIES = ("auto", "accurate", "compact")


def chunk_rows(n: int, v: int, d: int, itemsize: int, chunk_size, device_type: str, f32_cast: bool) -> int:
    """Rows per chunk: ``chunk_size``, or as many as fit in ``CHUNK_BYTES`` of logits (or the
    weight gradient's size where the ``"accurate"`` cast needs that anyway), balanced."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        return min(chunk_size, max(n, 1))
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"])
    if f32_cast:
        budget = max(budget, v * d * itemsize)
    rows_max = max(1, budget // (v * itemsize))
    n_chunks = -(-max(n, 1) // rows_max)
    return -(-max(n, 1) // n_chunks)


def resolve_policy(acc_policy: str, dtype: torch.dtype) -> str:
    """``"accurate"`` or ``"compact"`` for the weight's dtype (``linear_loss``'s docstring)."""
    if acc_policy not in ACC_POLICIES:
        raise ValueError(f"acc_policy: expected one of {ACC_POLICIES}, got {acc_policy!r}")
    if dtype in (torch.float32, torch.float64):
        return "compact"  # the weight's own dtype is the accumulator's: the two policies agree
    return "compact" if acc_policy == "auto" else acc_policy


_OUT_DTYPE_MM = {}


def mm_into_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` float32 whatever ``a``/``b``'s dtype.

    On CUDA, bf16/fp16 operands go through cuBLAS with a float32 output (``out_dtype``), so a
    chunk's product is never rounded to 16 bits before it is accumulated; ``accumulate=False``
    overwrites ``acc`` (no zero-fill, no read of the accumulator).
    """
    key = (a.device.type, a.dtype)
    if _OUT_DTYPE_MM.get(key, True):
        try:
            if accumulate:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            else:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            _OUT_DTYPE_MM[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[key] = False
    mm_into(acc, a.to(acc.dtype), b.to(acc.dtype), accumulate)


def mm_into(acc, a, b, accumulate: bool) -> None:
    """``acc (+)= a @ b``, all of one dtype."""
    torch.addmm(acc, a, b, out=acc) if accumulate else torch.mm(a, b, out=acc)


class WantedGrads(NamedTuple):
    """Which gradients of the fused path to form: ``dh``, ``dW``, ``db``."""

    h: bool
    weight: bool
    bias: bool


def wanted_grads(needs_input_grad, bias, grad_enabled=True) -> WantedGrads:
    """The one decision of which of ``(dh, dW, db)`` to form, from the requires-grad flags of
    ``(h, weight, bias)`` (the first three of ``ctx.needs_input_grad``, which ignores
    ``torch.no_grad()``: hence ``grad_enabled``, the grad mode at the call)."""
    h_g, w_g, b_g = (grad_enabled and bool(x) for x in needs_input_grad[:3])
    return WantedGrads(h_g, w_g, bias is not None and b_g)


def one_sweep(params, want: WantedGrads) -> bool:
    """Whether the fused path forms its gradients in the forward sweep (for an upstream
    gradient of 1): a row-local weighting, a reduced loss, and some gradient wanted."""
    return not params.weighting.batch_level and params.reduction != "none" and any(want)


def chunk_logits(h_c, weight, bias):
    """``h_c @ W.T (+ b)``: ``[C, V]`` in the operands' dtype."""
    return torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())


class Grads:
    """dh (input dtype, or float32 with ``dh_f32``: a vocabulary shard's part, summed over the
    group before the one rounding), dW (the weight's dtype, or a float32 accumulator for
    ``"accurate"``) and a float32 db, filled chunk by chunk."""

    def __init__(self, h, weight, bias, want: WantedGrads, policy, dh_f32=False):
        f32 = policy == "accurate"
        dh_dtype = torch.float32 if dh_f32 and h.dtype in (torch.bfloat16, torch.float16) else h.dtype
        self.dh = torch.empty(h.shape, dtype=dh_dtype, device=h.device) if want.h else None
        self.dw = torch.empty(weight.shape, dtype=torch.float32 if f32 else weight.dtype, device=h.device) \
            if want.weight else None
        self.db = torch.empty(weight.shape[0], dtype=compute_dtype(h.dtype), device=h.device) if want.bias else None
        self.started = False

    def add_chunk(self, start, dz, h_c, weight):
        """Fold the ``[C, V]`` logits gradient of rows ``start:start+C`` into the buffers."""
        if self.dh is not None:
            if self.dh.dtype == dz.dtype:
                torch.mm(dz, weight, out=self.dh[start : start + dz.shape[0]])
            else:
                mm_into_f32(self.dh[start : start + dz.shape[0]], dz, weight, accumulate=False)
        if self.dw is not None:
            mm = mm_into if self.dw.dtype == dz.dtype else mm_into_f32
            mm(self.dw, dz.t(), h_c, accumulate=self.started)
        if self.db is not None:
            db = dz.sum(0, dtype=self.db.dtype)
            self.db.add_(db) if self.started else self.db.copy_(db)
        self.started = True

    def final(self, weight, bias):
        """``(dh, dW, db)`` in the parameters' dtypes (zeros where no row was processed)."""
        if not self.started:
            for t in (self.dh, self.dw, self.db):
                if t is not None:
                    t.zero_()

        def cast(t, like):
            return None if t is None else t.to(like.dtype)

        return self.dh, cast(self.dw, weight), cast(self.db, bias)


def gradient_sweep(params, h, weight, bias, target, stats: RowStats, coefs: GradCoefs, grads: Grads):
    """The backward sweep of the fused path: chunk by chunk, recompute the logits, write the one
    gradient over them (``coefs``, ``stats``: ``[N]``) and fold it into ``grads``; returns
    ``grads.final``. 2 N D V FLOPs for the logits, 4 N D V for dh and dW."""
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], params.rows):
            sl = slice(start, min(h.shape[0], start + params.rows))
            logits = chunk_logits(h[sl], weight, bias)[None]
            params.backend.row_grad(logits, target[sl], stats.map(lambda t: t[sl]), coefs.map(lambda t: t[sl]),
                                    params, out=logits)
            grads.add_chunk(start, logits[0], h[sl], weight)
            del logits
    return grads.final(weight, bias)


def autocast_inputs(*tensors):
    """Cast to the autocast dtype where ``torch.autocast`` is on for the tensors' device, as
    ``F.linear`` would (gradients flow back through the cast)."""
    dev = tensors[0].device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to cast
        return tensors
    if not enabled:
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dt) for t in tensors)
