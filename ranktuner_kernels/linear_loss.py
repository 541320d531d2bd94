"""Fused linear path: hidden states and the LM head straight to the loss.

``rk.linear_cross_entropy(h, W, y)`` equals ``rk.cross_entropy(h @ W.T + b, y)`` without ever
holding the ``N x V`` logits. Rows are processed in chunks of ``C`` rows:

    logits_c = h_c @ W.T (+ b)                     [C, V], input dtype (cuBLAS / torch)
    stats_c, terms_c = row_stats(logits_c)         one streaming pass per row (+ the formula)
    logits_c <- dz_c                               the one gradient, in place, second pass
    dh_c = dz_c @ W;  dW += dz_c.T @ h_c;  db += sum_rows dz_c (float32)

Weight-gradient accumulation (``acc_policy``, named like torch's
``LinearCrossEntropyOptions.acc_policy``): ``"compact"`` adds each chunk's ``dz_c.T @ h_c``
straight into a ``dW`` of the weight's dtype (``addmm``; cuBLAS accumulates each chunk's
product in float32); ``"accurate"`` keeps a float32 accumulator and casts at the end.
``"auto"`` (default): compact for 16-bit weights, where the two differ; float32 and float64
weights are accumulated in their own dtype either way.

Sweeps: weightings that are not batch-level, with ``reduction`` ``"mean"``/``"sum"``, need
one sweep in the forward pass (6 N D V FLOPs), computed for an upstream gradient of 1;
backward scales the stored gradients when the upstream gradient is a power of two (exact),
else recomputes them with it (8 N D V in all), so no upstream gradient costs an extra
rounding. TALR (batch-level) and ``reduction="none"`` recompute in backward.

Chunk rule (:func:`chunk_rows`): ``C = chunk_size`` if given, else as many rows as fit in
``CHUNK_BYTES`` of logits (CUDA: 240 MiB, so the weight-gradient GEMM of a chunk,
``2 C V D`` FLOPs over ``4 V D`` bytes of ``dW`` traffic, runs at ``C / 2`` FLOP/byte, above an
H100's ridge point (~300) for ``V`` up to ~200k; CPU: 32 MiB), or, with ``"accurate"``
16-bit weights, ``V * D * itemsize`` bytes if larger (the final cast needs that much
anyway); balanced into equal chunks. Peak memory above the inputs:

    N * D * isz + V * D * isz (+ V * 4)        dh and dW (db float32), the gradients themselves
  + C * V * isz                                 the logits chunk, reused for its gradient
  + ("accurate", 16-bit) V * D * 4              the float32 dW accumulator
  + O(N + C) statistics

Vocabulary parallel (``process_group``, ``docs/distributed.md``): ``W`` is this rank's rows of
the head; each chunk's statistics are merged across the group (three small all-reduces per
chunk; every rank cuts the same chunks), ``dW`` is the shard's, and ``dh`` (float32 for 16-bit
inputs: ``N * D * 4`` bytes instead of ``N * D * isz``) is all-reduced in backward.
"""

from __future__ import annotations

import torch

from . import _distributed, _inputs, _terms
from ._dispatch import get_backend
from ._params import LossParams, check_options
from .reference import GradCoefs, RowStats, compute_dtype
from .token_loss import _shard, forward_terms, normaliser, stats_dict
from .weightings import Terms, resolve

#: Bytes of logits held at once by default, per device type (see the module docstring).
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


def _needs_grads(ctx, bias, grad_enabled=True):
    """Which of ``(dh, dW, db)`` to form (``ctx.needs_input_grad`` ignores ``torch.no_grad()``)."""
    h_g, w_g, b_g = (grad_enabled and x for x in ctx.needs_input_grad[:3])
    return h_g, w_g, bias is not None and b_g


def _logits(h_c, weight, bias):
    return torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())


class _Grads:
    """dh (input dtype, or float32 with ``dh_f32``: a vocabulary shard's part, summed over the
    group before the one rounding), dW (the weight's dtype, or a float32 accumulator for
    ``"accurate"``) and a float32 db, filled chunk by chunk."""

    def __init__(self, h, weight, bias, needs, policy, dh_f32=False):
        f32 = policy == "accurate"
        dh_dtype = torch.float32 if dh_f32 and h.dtype in (torch.bfloat16, torch.float16) else h.dtype
        self.dh = torch.empty(h.shape, dtype=dh_dtype, device=h.device) if needs[0] else None
        self.dw = torch.empty(weight.shape, dtype=torch.float32 if f32 else weight.dtype, device=h.device) \
            if needs[1] else None
        self.db = torch.empty(weight.shape[0], dtype=compute_dtype(h.dtype), device=h.device) if needs[2] else None
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


def _power_of_two(g: torch.Tensor) -> bool:
    """Scaling by ``g`` is exact (one read-back; NaN, inf and 0 are not)."""
    mantissa, _ = torch.frexp(g.float())
    return bool(mantissa.abs() == 0.5)


class LinearTokenLossFunction(torch.autograd.Function):
    """``h [N, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``target [N]`` int64,
    ``scale [N]`` or None, ``norm`` -> ``(loss, w, z_loss, *RowStats)``; ``loss`` is
    differentiable w.r.t. ``h``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, norm, params: LossParams):
        n, v_size = h.shape[0], params.vocab(weight.shape[0])
        weighting = params.weighting
        keep = target != params.ignore_index
        acc = compute_dtype(h.dtype)
        with_mean = params.label_smoothing > 0
        stat_bufs = RowStats(*(torch.zeros(n, dtype=acc, device=h.device) for _ in range(5)),
                             torch.zeros(n, dtype=torch.int64, device=h.device),
                             torch.zeros(n, dtype=acc, device=h.device) if with_mean else None)
        needs = _needs_grads(ctx, bias, params.grad_enabled)
        one_sweep = not weighting.batch_level and params.reduction != "none" and any(needs)
        grads = _Grads(h, weight, bias, needs, params.acc_policy, dh_f32=_dh_f32(params)) if one_sweep else None
        g1 = _terms.upstream(torch.ones((), device=h.device), params.reduction, norm, n, acc)
        parts = {"value": [], "w": [], "beta": [], "z_loss": []}
        for start in range(0, n, params.rows):
            sl = slice(start, min(n, start + params.rows))
            h_c, t_c, keep_c = h[sl], target[sl], keep[sl]
            logits = _logits(h_c, weight, bias)[None]
            if weighting.batch_level:  # the formula needs every row's statistics: after the sweep
                stats, _ = params.backend.row_stats(logits, t_c, params)
            else:
                sc = None if scale is None else scale[sl]
                stats, terms, z_loss, value = forward_terms(params, logits, t_c, keep_c, sc)
                for key, part in zip(parts, (value, terms.w, terms.beta, z_loss)):
                    parts[key].append(part)
            for buf, s in zip(stat_bufs, stats):
                if buf is not None:
                    buf[sl] = s
            if one_sweep:
                coefs = _terms.grad_coefs(params, stats, keep_c, terms, g1[sl], v_size)
                params.backend.row_grad(logits, t_c, stats, coefs, params, out=logits)
                grads.add_chunk(start, logits[0], h_c, weight)
            del logits

        stats = stat_bufs
        if weighting.batch_level:
            terms = _terms.weighting_terms(params, stats, keep, scale)
            z_loss = _terms.z_loss_terms(params, stats, keep)
            value = _terms.total_value(params, stats, terms, z_loss)
        else:
            joined = {k: torch.cat(v) if v and v[0] is not None else None for k, v in parts.items()}
            if n == 0:
                joined["value"] = joined["w"] = torch.zeros(0, dtype=acc, device=h.device)
            terms = Terms(joined["value"], joined["w"], joined["beta"])
            value, z_loss = joined["value"], joined["z_loss"]
        loss = _terms.reduce(value, params.reduction, norm, params.shape)
        ctx.params, ctx.one_sweep = params, one_sweep
        ctx.save_for_backward(h, weight, bias, target, stats.lse, stats.logp_t, stats.entropy, stats.logit_mean,
                              terms.w, terms.beta, norm, *(grads.final(weight, bias) if one_sweep else ()))
        extras = (terms.w, z_loss, *stats)
        ctx.mark_non_differentiable(*(t for t in extras if t is not None))
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        params = ctx.params
        h, weight, bias, target, lse, logp_t, entropy, logit_mean, w, beta, norm, *stored = ctx.saved_tensors
        if ctx.one_sweep and _power_of_two(grad_loss):
            # formed in forward for an upstream gradient of 1: scaling by a power of two is exact
            g = grad_loss.float()
            scaled = [None if t is None else t if bool(g == 1) else (t * g).to(t.dtype) for t in stored]
            scaled[0] = _distributed.all_reduce_input_grad(scaled[0], params, h, fresh=not bool(g == 1))
            return (*scaled, None, None, None, None)
        keep = target != params.ignore_index
        g = _terms.upstream(grad_loss, params.reduction, norm, h.shape[0], w.dtype)
        stats = RowStats(lse, logp_t, None, None, entropy, None, logit_mean)
        coefs = _terms.grad_coefs(params, stats, keep, Terms(None, w, beta), g, params.vocab(weight.shape[0]))
        grads = _Grads(h, weight, bias, _needs_grads(ctx, bias), params.acc_policy, dh_f32=_dh_f32(params))
        dh, dw, db = gradient_sweep(params, h, weight, bias, target, stats, coefs, grads)
        return (_distributed.all_reduce_input_grad(dh, params, h, fresh=True), dw, db, None, None, None, None)


def gradient_sweep(params: LossParams, h, weight, bias, target, stats: RowStats, coefs: GradCoefs, grads: _Grads):
    """The backward sweep of the fused path: chunk by chunk, recompute the logits, write the one
    gradient over them (``coefs``, ``stats``: ``[N]``) and fold it into ``grads``; returns
    ``grads.final``. 2 N D V FLOPs for the logits, 4 N D V for dh and dW."""
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], params.rows):
            sl = slice(start, min(h.shape[0], start + params.rows))
            logits = _logits(h[sl], weight, bias)[None]
            chunk = (RowStats(*(None if s is None else s[sl] for s in stats)),
                     GradCoefs(*(None if c is None else c[sl] for c in coefs)))
            params.backend.row_grad(logits, target[sl], *chunk, params, out=logits)
            grads.add_chunk(start, logits[0], h[sl], weight)
            del logits
    return grads.final(weight, bias)


def _dh_f32(params) -> bool:
    """A vocabulary shard's ``dh`` is a partial sum: accumulate and all-reduce it in float32."""
    return params.shard is not None and params.reduce_input_grad


def autocast_inputs(*tensors):
    """Cast to the autocast dtype where ``torch.autocast`` is on for the tensors' device, as
    ``F.linear`` would (gradients flow back through the cast)."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dt) for t in tensors)


@_inputs.compilable
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    options=None,
    weighting="sft",
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    num_items_in_batch=None,
    token_weight: torch.Tensor | None = None,
    sequence_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    acc_policy: str = "auto",
    impl: str = "auto",
    process_group=None,
    vocab_offset: int | None = None,
    vocab_size: int | None = None,
    dp_group=None,
    reduce_input_grad: bool = True,
):
    """Token-reweighted cross-entropy of ``input @ linear_weight.T + linear_bias`` without
    materialising the logits; ``torch.nn.functional.linear_cross_entropy``'s signature and
    defaults (plain cross-entropy unless ``weighting`` is given).

    Args:
        input: ``[N, D]``, ``[B, T, D]`` (any leading shape, or unbatched ``[D]``) hidden states
            (float32, bfloat16, float16; float64 on the reference).
        linear_weight: ``[V, D]`` LM head, same dtype and device as ``input``.
        target: the input's leading shape: class indices in ``[0, V)`` or ``ignore_index``.
        linear_bias: optional ``[V]``.
        weight, reduction, ignore_index (None means -100), label_smoothing: as in
            ``F.linear_cross_entropy``.
        options: torch's ``LinearCrossEntropyOptions``: its ``batch_chunk_size`` and
            ``acc_policy`` are honoured; other fields are refused.
        chunk_size: rows per chunk (default: the chunk rule of the module docstring): the
            memory-time knob, peak extra memory grows by ``chunk_size * V * itemsize``.
        acc_policy: ``"auto"`` (compact for 16-bit weights), ``"compact"`` or ``"accurate"``.
        process_group: vocabulary parallelism: ``linear_weight`` (and ``linear_bias``) are this
            rank's contiguous rows ``[V_r, D]`` of the head (shards in rank order, uneven sizes
            allowed); every rank holds the same ``input`` and global targets. Loss and
            gradients equal the unsharded call's: ``linear_weight``'s gradient is its shard's,
            ``input``'s is summed over the group (what a column-parallel head's input needs;
            accumulated and all-reduced in float32 for 16-bit inputs, ``N * D * 4`` bytes). A
            DTensor ``linear_weight`` sharded on dim 0 (``ColwiseParallel``) names its group.
        reduce_input_grad: ``False`` returns this shard's part of ``input``'s gradient, for
            frameworks that all-reduce it themselves (Megatron's copy-to-region).
        vocab_offset, vocab_size, dp_group: as in :func:`ranktuner_kernels.cross_entropy`.
        The other arguments are those of :func:`ranktuner_kernels.cross_entropy`.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.linear`` does.

    Returns:
        the loss in float32 (float64 for float64 input), and the stats dict if
        ``return_stats``. Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``.
    """
    linear_weight, process_group = _distributed.vocab_local(linear_weight, 0, "linear_weight", process_group)
    if _distributed.is_dtensor(linear_bias):
        linear_bias, _ = _distributed.vocab_local(linear_bias, 0, "linear_bias", None)
    input = _distributed.replicated(input, "input")
    target = _distributed.replicated(target, "target")
    weighting = resolve(weighting)
    ignore_index = _inputs.check_ignore_index(ignore_index)
    tr, label_smoothing, z_loss = check_options(reduction, softcap, temperature, label_smoothing, z_loss)
    chunk_size, acc_policy = _torch_options(options, chunk_size, acc_policy)
    _inputs.check_float("input", input)
    if input.dim() == 0:
        raise ValueError("input: expected [..., D] hidden states, got a 0-D tensor")
    _inputs.check_float("linear_weight", linear_weight, dims=(2,))
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight: shape {tuple(linear_weight.shape)} needs [V, {input.shape[-1]}] to match input")
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight: the vocabulary (first) dimension is empty")
    input, linear_weight, linear_bias = autocast_inputs(input, linear_weight, linear_bias)
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
    flat_target = _inputs.check_target(target, shape, input, "input")
    shard = _shard(process_group, linear_weight.shape[0], flat_target, vocab_offset, vocab_size, input.device)
    v_size = linear_weight.shape[0] if shard is None else shard.v_global
    scale = _inputs.caller_scale(token_weight, sequence_weight, shape, input)
    cw = _inputs.class_weight(weight, v_size, flat_target, ignore_index, input)
    if cw is not None:
        if label_smoothing > 0:
            raise ValueError("weight: a class weight with label_smoothing is not supported")
        scale = cw if scale is None else scale * cw
    h = input.reshape(-1, input.shape[-1])
    policy = resolve_policy(acc_policy, linear_weight.dtype)
    f32_cast = policy == "accurate" and torch.is_grad_enabled() and linear_weight.requires_grad
    # every rank of a vocabulary group must cut the same chunks (one merge per chunk)
    v_chunk = v_size if shard is None else -(-v_size // shard.world)
    rows = chunk_rows(h.shape[0], v_chunk, h.shape[1], input.element_size(), chunk_size, input.device.type, f32_cast)
    _inputs.check_range(flat_target, v_size, ignore_index, num_items_in_batch)  # once, before 6NDV FLOPs
    keep = flat_target != ignore_index
    norm = normaliser(reduction, keep, num_items_in_batch, compute_dtype(input.dtype), cw, dp_group)
    if shard is not None:
        flat_target = _distributed.local_target(flat_target, shard, ignore_index)
    params = LossParams(weighting, get_backend(impl, input), shape, ignore_index, reduction, tr, label_smoothing,
                        z_loss, rows=rows, acc_policy=policy, grad_enabled=torch.is_grad_enabled(), shard=shard,
                        dp_group=dp_group, reduce_input_grad=bool(reduce_input_grad))
    from . import _ops  # LinearTokenLossFunction.apply, or its custom op under torch.compile

    with torch.autocast(input.device.type, enabled=False):
        loss, w, zl, *stats = _ops.linear_loss(h, linear_weight, linear_bias, flat_target, scale, norm, params)
    if return_stats:
        return loss, stats_dict(shape, keep, w, zl, RowStats(*stats))
    return loss


def _torch_options(options, chunk_size, acc_policy):
    """``(chunk_size, acc_policy)`` from torch's ``LinearCrossEntropyOptions`` (or None)."""
    if options is None:
        return chunk_size, acc_policy
    for field in ("batch_chunk_size", "acc_policy"):
        if not hasattr(options, field):
            raise TypeError(f"options: expected torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
    if getattr(options, "acc_dtype", None) is not None or getattr(options, "allow_retain_graph", False):
        raise ValueError("options: acc_dtype and allow_retain_graph are not supported (use acc_policy=)")
    if options.acc_policy not in ("auto", "accurate", "compact"):
        raise ValueError(f"options: acc_policy {options.acc_policy!r} is not supported; use 'accurate' or 'compact'")
    return options.batch_chunk_size or chunk_size, options.acc_policy
