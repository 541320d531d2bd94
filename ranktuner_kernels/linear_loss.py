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

Chunk rule (:func:`ranktuner_kernels._chunks.chunk_rows`, the chunk machinery shared with
``token_logprobs``): ``C = chunk_size`` if given, else as many rows as fit in
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

from . import _call, _inputs, _ops, _schema, _terms
from ._chunks import ACC_POLICIES, CHUNK_BYTES, Grads, chunk_logits, gradient_sweep, one_sweep, wanted_grads
from ._params import LossParams
from .reference import RowStats, compute_dtype, stat_names
from .weightings import Terms

__all__ = ["linear_cross_entropy", "LinearTokenLossFunction", "CHUNK_BYTES"]

SPEC = _schema.LINEAR_LOSS


def _power_of_two(g: torch.Tensor) -> bool:
    """Scaling by ``g`` is exact (one read-back; NaN, inf and 0 are not)."""
    mantissa, _ = torch.frexp(g.float())
    return bool(mantissa.abs() == 0.5)


@_ops.function(SPEC)
class LinearTokenLossFunction(torch.autograd.Function):
    """``h [N, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``target [N]`` int64,
    ``scale [N]`` or None, ``norm`` -> the outputs of ``_schema.LINEAR_LOSS`` (``loss``, ``w``,
    ``z_loss``, the statistics); ``loss`` is differentiable w.r.t. ``h``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, norm, params: LossParams):
        n, v_size = h.shape[0], params.vocab(weight.shape[0])
        weighting = params.weighting
        keep = target != params.ignore_index
        acc = compute_dtype(h.dtype)
        stats = RowStats.allocate(stat_names(params.extra_stats), n, acc, h.device)
        want = wanted_grads(ctx.needs_input_grad, bias, params.grad_enabled)
        sweep = one_sweep(params, want)
        grads = Grads(h, weight, bias, want, params.acc_policy, params.backend.dh_f32(params)) if sweep else None
        g1 = _terms.upstream(torch.ones((), device=h.device), params.reduction, norm, n, acc)
        parts = {"value": [], "w": [], "beta": [], "z_loss": []}
        for start in range(0, n, params.rows):
            sl = slice(start, min(n, start + params.rows))
            h_c, t_c, keep_c = h[sl], target[sl], keep[sl]
            logits = chunk_logits(h_c, weight, bias)[None]
            if weighting.batch_level:  # the formula needs every row's statistics: after the sweep
                chunk, _ = params.backend.row_stats(logits, t_c, params)
            else:
                sc = None if scale is None else scale[sl]
                chunk, terms, z_loss, value = _terms.forward_terms(params, logits, t_c, keep_c, sc)
                for key, part in zip(parts, (value, terms.w, terms.beta, z_loss)):
                    parts[key].append(part)
            stats.write(sl, chunk)
            if sweep:
                coefs = _terms.grad_coefs(params, chunk, keep_c, terms, g1[sl], v_size)
                params.backend.row_grad(logits, t_c, chunk, coefs, params, out=logits)
                grads.add_chunk(start, logits[0], h_c, weight)
            del logits

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
        stored = dict(zip(("stored_dh", "stored_dweight", "stored_dbias"), grads.final(weight, bias))) if sweep else {}
        values = dict(h=h, weight=weight, bias=bias, target=target, norm=norm, loss=loss, w=terms.w, z_loss=z_loss,
                      beta=terms.beta, **stats.present(), **stored)
        SPEC.save(ctx, values)
        ctx.params = params
        return SPEC.returns(ctx, values)

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.params
        saved = SPEC.saved_values(ctx)
        h, weight, bias, target, w = (saved[k] for k in ("h", "weight", "bias", "target", "w"))
        grad_loss = SPEC.output_grads(grads)["loss"]
        want = wanted_grads(ctx.needs_input_grad, bias)
        if one_sweep(params, want) and _power_of_two(grad_loss):
            # formed in forward for an upstream gradient of 1: scaling by a power of two is exact
            g = grad_loss.float()
            scaled = {k: None if t is None else t if bool(g == 1) else (t * g).to(t.dtype)
                      for k, t in (("h", saved["stored_dh"]), ("weight", saved["stored_dweight"]),
                                   ("bias", saved["stored_dbias"]))}
            scaled["h"] = params.backend.reduce_input_grad(scaled["h"], params, h, fresh=not bool(g == 1))
            return SPEC.input_grads(scaled)
        keep = target != params.ignore_index
        g = _terms.upstream(grad_loss, params.reduction, saved["norm"], h.shape[0], w.dtype)
        stats = _schema.stats_of(saved)
        coefs = _terms.grad_coefs(params, stats, keep, Terms(None, w, saved["beta"]), g, params.vocab(weight.shape[0]))
        grads = Grads(h, weight, bias, want, params.acc_policy, params.backend.dh_f32(params))
        dh, dw, db = gradient_sweep(params, h, weight, bias, target, stats, coefs, grads)
        return SPEC.input_grads({"h": params.backend.reduce_input_grad(dh, params, h, fresh=True), "weight": dw,
                                 "bias": db})


def run(call: _call.Call) -> dict:
    """The one call site of :class:`LinearTokenLossFunction`: its outputs by name."""
    with torch.autocast(call.input.device.type, enabled=False):
        return _ops.call(SPEC, call.input, call.linear_weight, call.linear_bias, call.target, call.scale, call.norm,
                         params=call.params)


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
    return_stats=False,
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
    chunk_size, acc_policy = _torch_options(options, chunk_size, acc_policy)
    call = _call.prepare(
        "linear_cross_entropy", input, target, linear_weight=linear_weight, linear_bias=linear_bias,
        weighting=weighting, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, temperature=temperature, z_loss=z_loss,
        num_items_in_batch=num_items_in_batch, token_weight=token_weight, sequence_weight=sequence_weight,
        chunk_size=chunk_size, acc_policy=acc_policy, impl=impl, process_group=process_group,
        vocab_offset=vocab_offset, vocab_size=vocab_size, dp_group=dp_group, reduce_input_grad=reduce_input_grad,
        return_stats=return_stats)
    return _schema.loss_result(call, run(call))


def _torch_options(options, chunk_size, acc_policy):
    """``(chunk_size, acc_policy)`` from torch's ``LinearCrossEntropyOptions`` (or None)."""
    if options is None:
        return chunk_size, acc_policy
    for field in ("batch_chunk_size", "acc_policy"):
        if not hasattr(options, field):
            raise TypeError(f"options: expected torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
    if getattr(options, "acc_dtype", None) is not None or getattr(options, "allow_retain_graph", False):
        raise ValueError("options: acc_dtype and allow_retain_graph are not supported (use acc_policy=)")
    if options.acc_policy not in ACC_POLICIES:
        raise ValueError(f"options: acc_policy {options.acc_policy!r} is not supported; use 'accurate' or 'compact'")
    return options.batch_chunk_size or chunk_size, options.acc_policy
