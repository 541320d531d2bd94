"""Fused linear path: hidden states and the LM head straight to the loss.

``rk.linear_cross_entropy(h, W, y)`` equals ``rk.cross_entropy(h @ W.T + b, y)`` without ever
holding the ``N x V`` logits. Rows are processed in chunks of ``C`` rows:

    logits_c = h_c @ W.T (+ b)                     [C, V], input dtype (cuBLAS / torch)
    stats_c  = row_stats(logits_c)                 one streaming pass per row
    value, w, beta = objective(stats_c)            O(C) epilogue
    logits_c <- dz_c = g (w (p - 1_y) + beta p (log p + H))     in place, second pass
    dh_c = dz_c @ W;  dW += dz_c.T @ h_c (float32);  db += sum_rows dz_c (float32)

For objectives that need only each row's own statistics and a scalar upstream gradient
(``mean``/``sum``), that is one sweep in the forward pass (6 N D V FLOPs); backward only
scales the stored gradients by the upstream gradient. Batch-level objectives (TALR) and
``reduction="none"`` keep the O(N) statistics and recompute the logits chunk by chunk in
backward (8 N D V FLOPs).

Chunk rule (:func:`chunk_rows`): ``C = chunk_size`` if given; else as many rows as fit in
``max(CHUNK_BYTES, V * D * itemsize)`` bytes of logits (256 MiB, or the size of the weight
gradient when it is formed, whose final cast needs that much anyway), balanced into equal
chunks. Peak memory above the inputs is

    N * D * itemsize + V * D * 4 (+ V * 4)          dh and the float32 dW (db) accumulators
  + max(C * V * itemsize,                           the logits chunk (reused for its gradient),
        V * D * itemsize)                           or dW cast to the weight's dtype at the end
  + O(N + C) statistics
"""

from __future__ import annotations

import torch

from . import _inputs
from ._backend import get_backend
from .reference import compute_dtype
from ._epilogue import reduce, token_terms, upstream
from .token_loss import stats_dict
from .objectives import RowStats, resolve

#: Bytes of logits held at once by default (see the module docstring).
CHUNK_BYTES = 256 << 20


def chunk_rows(n: int, v: int, d: int, itemsize: int, chunk_size: int | None, weight_grad: bool) -> int:
    """Rows per chunk: ``chunk_size``, or as many as fit in ``max(CHUNK_BYTES, V*D*itemsize)``
    bytes of logits (the second term where the weight gradient is formed: its final cast to the
    weight's dtype needs that much memory anyway), balanced so the chunks are of equal size."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        return min(chunk_size, max(n, 1))
    budget = max(CHUNK_BYTES, v * d * itemsize) if weight_grad else CHUNK_BYTES
    rows_max = max(1, budget // (v * itemsize))
    n_chunks = -(-max(n, 1) // rows_max)
    return -(-max(n, 1) // n_chunks)


_OUT_DTYPE_MM = {}


def mm_into_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` float32 (or float64) whatever ``a``/``b``'s dtype.

    On CUDA, bf16/fp16 operands go through cuBLAS with a float32 output (``out_dtype``), so a
    chunk's product is never rounded to 16 bits before it is accumulated; ``accumulate=False``
    overwrites ``acc`` (no zero-fill, no read of the accumulator).
    """
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc) if accumulate else torch.mm(a, b, out=acc)
        return
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
    mm_into_f32(acc, a.to(acc.dtype), b.to(acc.dtype), accumulate)


class _Run:
    def __init__(self, objective, ignore_index, reduction, shape, backend, rows, grad_enabled):
        self.grad_enabled = grad_enabled  # ctx.needs_input_grad ignores torch.no_grad()
        self.objective = objective
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shape = shape
        self.backend = backend
        self.rows = rows


def _needs_grads(ctx, bias, grad_enabled=True):
    """Which of ``(dh, dW, db)`` to form (``ctx.needs_input_grad`` ignores ``torch.no_grad()``)."""
    h_g, w_g, b_g = (grad_enabled and x for x in ctx.needs_input_grad[:3])
    return h_g, w_g, bias is not None and b_g


def _logits(h_c, weight, bias):
    return torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())


class _Grads:
    """dh (input dtype), and float32 accumulators for dW and db, filled chunk by chunk."""

    def __init__(self, h, weight, bias, needs):
        acc = compute_dtype(h.dtype)
        self.dh = torch.empty_like(h) if needs[0] else None
        self.dw = torch.empty(weight.shape, dtype=acc, device=h.device) if needs[1] else None
        self.db = torch.empty(weight.shape[0], dtype=acc, device=h.device) if needs[2] else None
        self.started = False

    def add_chunk(self, start, dz, h_c, weight):
        """Fold the ``[C, V]`` logits gradient of rows ``start:start+C`` into the buffers."""
        if self.dh is not None:
            torch.mm(dz, weight, out=self.dh[start : start + dz.shape[0]])
        if self.dw is not None:
            mm_into_f32(self.dw, dz.t(), h_c, accumulate=self.started)
        if self.db is not None:
            db = dz.sum(0, dtype=self.db.dtype)
            self.db.add_(db) if self.started else self.db.copy_(db)
        self.started = True

    def final(self, h, weight, bias):
        """``(dh, dW, db)`` in the parameters' dtypes (zeros where no row was processed)."""
        if not self.started:
            for t in (self.dh, self.dw, self.db):
                if t is not None:
                    t.zero_()

        def cast(t, like):
            return None if t is None else t.to(like.dtype)

        return self.dh, cast(self.dw, weight), cast(self.db, bias)


class LinearTokenLossFunction(torch.autograd.Function):
    """``h [N, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``target [N]`` int64,
    ``scale [N]`` or None -> ``(loss, w, lse, z_y, max z, H, rank)``; ``loss`` is
    differentiable w.r.t. ``h``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, num_items, run: _Run):
        n = h.shape[0]
        obj, ii = run.objective, run.ignore_index
        keep = target != ii
        acc = compute_dtype(h.dtype)
        stat_bufs = [torch.zeros(n, dtype=acc, device=h.device) for _ in range(4)] + [
            torch.zeros(n, dtype=torch.int64, device=h.device)
        ]
        value = torch.zeros(n, dtype=acc, device=h.device)
        w_all = torch.zeros(n, dtype=acc, device=h.device)
        beta_all = None
        norm = _inputs.normaliser(run.reduction, keep, num_items, acc)
        needs = _needs_grads(ctx, bias, run.grad_enabled)
        one_sweep = not obj.batch_level and run.reduction != "none" and any(needs)
        grads = _Grads(h, weight, bias, needs) if one_sweep else None
        g = upstream(torch.ones((), device=h.device), run.reduction, norm, acc)  # for an upstream 1

        for start in range(0, n, run.rows):
            stop = min(n, start + run.rows)
            h_c, t_c, keep_c = h[start:stop], target[start:stop], keep[start:stop]
            logits = _logits(h_c, weight, bias)[None]
            if obj.batch_level:  # the epilogue needs every row's statistics: after the sweep
                stats = run.backend.row_stats(logits, t_c, ii)
            else:
                sc = None if scale is None else scale[start:stop]
                stats, v_c, w_c, b_c = run.backend.token_terms(logits, t_c, ii, obj, keep_c, (stop - start,), sc)
            for buf, s in zip(stat_bufs, stats):
                buf[start:stop] = s
            if obj.batch_level:
                continue
            value[start:stop], w_all[start:stop] = v_c, w_c
            if b_c is not None:
                if beta_all is None:
                    beta_all = torch.zeros(n, dtype=acc, device=h.device)
                beta_all[start:stop] = b_c
            if one_sweep:
                run.backend.row_grad(logits, t_c, stats.lse, stats.entropy, g * w_c,
                                     None if b_c is None else g * b_c, ii, out=logits)
                grads.add_chunk(start, logits[0], h_c, weight)
            del logits

        stats = RowStats(*stat_bufs)
        if obj.batch_level:
            value, w_all, beta_all = token_terms(obj, stats, keep, run.shape, scale)
        loss = reduce(value, run.reduction, norm, run.shape).to(h.dtype)
        ctx.run, ctx.one_sweep = run, one_sweep
        if one_sweep:
            ctx.save_for_backward(*grads.final(h, weight, bias))
        else:
            ctx.save_for_backward(h, weight, bias, target, stats.lse, stats.entropy, w_all, beta_all, norm)
        extras = (w_all, *stats)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        run = ctx.run
        if ctx.one_sweep:  # the gradients were formed in forward for an upstream gradient of 1
            saved = ctx.saved_tensors
            if not bool(grad_loss == 1):
                g = grad_loss.to(torch.float32)
                saved = [None if t is None else (t * g).to(t.dtype) for t in saved]
            return (*saved, None, None, None, None)
        h, weight, bias, target, lse, entropy, w, beta, norm = ctx.saved_tensors
        grads = _Grads(h, weight, bias, _needs_grads(ctx, bias))
        g = upstream(grad_loss, run.reduction, norm, w.dtype)
        g = g.expand(w.shape) if g.dim() == 0 else g
        for start in range(0, h.shape[0], run.rows):
            stop = min(h.shape[0], start + run.rows)
            h_c = h[start:stop]
            logits = _logits(h_c, weight, bias)[None]
            g_c = g[start:stop]
            gb = None if beta is None else g_c * beta[start:stop]
            run.backend.row_grad(logits, target[start:stop], lse[start:stop], entropy[start:stop],
                                 g_c * w[start:stop], gb, run.ignore_index, out=logits)
            grads.add_chunk(start, logits[0], h_c, weight)
            del logits
        return (*grads.final(h, weight, bias), None, None, None, None)


@torch.compiler.disable
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weighting="ranktuner",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    token_weight: torch.Tensor | None = None,
    sequence_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
):
    """Token-reweighted cross-entropy of ``input @ linear_weight.T + linear_bias`` without
    materialising the logits; shaped after ``torch.nn.functional.linear_cross_entropy``.

    Args:
        input: ``[N, D]`` or ``[B, T, D]`` hidden states (float32, bfloat16, float16; float64 on
            the reference).
        linear_weight: ``[V, D]`` LM head, same dtype and device as ``input``.
        target: ``[N]`` or ``[B, T]`` class indices in ``[0, V)`` or ``ignore_index``.
        linear_bias: optional ``[V]``.
        chunk_size: rows per chunk (default: 256 MiB of logits, see the module docstring).
        The other arguments are those of :func:`ranktuner_kernels.cross_entropy`.

    Returns:
        the loss, and the stats dict if ``return_stats``. Gradients flow to ``input``,
        ``linear_weight`` and ``linear_bias``; the weight and bias gradients are accumulated
        in float32 across chunks, then cast to the parameters' dtype.
    """
    objective = resolve(weighting)
    _inputs.check_reduction(reduction)
    _inputs.check_float("input", input, dims=(2, 3))
    _inputs.check_float("linear_weight", linear_weight, dims=(2,))
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight: shape {tuple(linear_weight.shape)} needs [V, {input.shape[-1]}] to match input")
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight: the vocabulary (first) dimension is empty")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        _inputs.check_float(name, t)
        _inputs.check_same_device(name, t, input, "input")
        if t.dtype != input.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from input's {input.dtype}")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise ValueError(f"linear_bias: expected shape ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}")
    shape = tuple(input.shape[:-1])
    v_size = linear_weight.shape[0]
    flat_target = _inputs.check_target(target, shape, ignore_index, input, "input")
    scale = _inputs.caller_scale(token_weight, sequence_weight, shape, input)
    h = input.reshape(-1, input.shape[-1])
    weight_grad = torch.is_grad_enabled() and linear_weight.requires_grad
    rows = chunk_rows(h.shape[0], v_size, h.shape[1], input.element_size(), chunk_size, weight_grad)
    _inputs.check_target_range(flat_target, v_size, ignore_index)  # once, before 6NDV FLOPs of work
    run = _Run(objective, ignore_index, reduction, shape, get_backend(impl, input), rows, torch.is_grad_enabled())
    loss, *extras = LinearTokenLossFunction.apply(h, linear_weight, linear_bias, flat_target, scale, num_items_in_batch, run)
    if return_stats:
        return loss, stats_dict(shape, *extras)
    return loss
