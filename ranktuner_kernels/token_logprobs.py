"""Per-token log-probabilities and entropies with gradients through both, for RL: what verl's
fused ``linear_cross_entropy`` returns, on the same kernels as the losses.

    logp, ent = rk.logprobs(logits, tokens, temperature=0.7)
    logp, ent = rk.linear_logprobs(hidden, lm_head.weight, tokens, temperature=0.7)
    logp, ent, stats = rk.logprobs(logits, tokens, return_stats=("log_sum_p2", "is_top1"))

Forward: one statistics pass per row (the fused-linear path chunk by chunk, never holding the
``N x V`` logits): ``log pi(y_t)`` and ``H_t`` of ``softmax(z')``, ``z' = c tanh(z/c) / T``. Under
``torch.no_grad()`` (old-policy and reference passes) that is all it does; ``return_stats``
adds the per-token statistics asked for from that same pass (the optional ones, such as
``log_sum_p2``, ``logit_mean``, ``is_top1``, by an extra accumulator each). Backward, for
upstream gradients ``a_t`` on ``logp`` and ``b_t`` on ``H`` (either may be absent), the one
gradient of SPEC with ``w = -a``, ``beta = -b``:

    dz'_i = a_t (1[i = y] - p_i) - b_t p_i (log p_i + H_t)

(the fused-linear path recomputes each chunk's logits: 2 N D V FLOPs forward, 6 N D V backward).
Ignored positions (``ignore_index``) hold 0 in both outputs and get no gradient, so masked
sums need no NaN handling.
"""

from __future__ import annotations

import torch

from . import _call, _inputs, _ops, _schema
from ._chunks import Grads, chunk_logits, gradient_sweep, wanted_grads
from ._params import LossParams
from .reference import GradCoefs, RowStats, compute_dtype, stat_names


def _coefs(grads: dict, keep) -> GradCoefs:
    """``p = -a``, ``entropy = -b`` for the upstream gradients ``a`` on ``logp``, ``b`` on ``H``."""
    g_logp, g_ent = grads["logp_t"], grads["entropy"]
    p = torch.where(keep, -g_logp.reshape(-1), 0) if g_logp is not None else torch.zeros(keep.shape,
                                                                                          device=keep.device)
    return GradCoefs(p=p, entropy=None if g_ent is None else torch.where(keep, -g_ent.reshape(-1), 0))


@_ops.function(_schema.LOGPROBS)
class LogProbsFunction(torch.autograd.Function):
    """``logits [B, T, V]``, ``target [B*T]`` -> the statistics (``_schema.LOGPROBS``), of which
    ``logp_t`` and ``entropy`` are differentiable."""

    @staticmethod
    def forward(ctx, logits, target, params: LossParams):
        stats, _ = params.backend.row_stats(logits, target, params)
        values = dict(logits=logits, target=target, **stats.present())
        _schema.LOGPROBS.save(ctx, values)
        ctx.params = params
        return _schema.LOGPROBS.returns(ctx, values)

    @staticmethod
    def backward(ctx, *grads):
        saved = _schema.LOGPROBS.saved_values(ctx)
        logits, target, params = saved["logits"], saved["target"], ctx.params
        keep = target != params.ignore_index
        coefs = _coefs(_schema.LOGPROBS.output_grads(grads), keep).map(lambda c: c.to(saved["lse"].dtype))
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        params.backend.row_grad(logits, target, _schema.stats_of(saved), coefs, params, out)
        return _schema.LOGPROBS.input_grads({"logits": out})


@_ops.function(_schema.LINEAR_LOGPROBS)
class LinearLogProbsFunction(torch.autograd.Function):
    """``h [N, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``target [N]`` -> the statistics
    (``_schema.LINEAR_LOGPROBS``); ``logp_t`` and ``entropy`` are differentiable w.r.t. ``h``,
    ``weight``, ``bias``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, params: LossParams):
        n = h.shape[0]
        stats = RowStats.allocate(stat_names(params.extra_stats), n, compute_dtype(h.dtype), h.device)
        for start in range(0, n, params.rows):
            sl = slice(start, min(n, start + params.rows))
            chunk, _ = params.backend.row_stats(chunk_logits(h[sl], weight, bias)[None], target[sl], params)
            stats.write(sl, chunk)
        values = dict(h=h, weight=weight, bias=bias, target=target, **stats.present())
        _schema.LINEAR_LOGPROBS.save(ctx, values)
        ctx.params = params
        return _schema.LINEAR_LOGPROBS.returns(ctx, values)

    @staticmethod
    def backward(ctx, *grads):
        saved = _schema.LINEAR_LOGPROBS.saved_values(ctx)
        h, weight, bias, target, params = saved["h"], saved["weight"], saved["bias"], saved["target"], ctx.params
        keep = target != params.ignore_index
        coefs = _coefs(_schema.LINEAR_LOGPROBS.output_grads(grads), keep).map(lambda c: c.to(saved["lse"].dtype))
        grads = Grads(h, weight, bias, wanted_grads(ctx.needs_input_grad, bias), params.acc_policy)
        dh, dw, db = gradient_sweep(params, h, weight, bias, target, _schema.stats_of(saved), coefs, grads)
        return _schema.LINEAR_LOGPROBS.input_grads({"h": dh, "weight": dw, "bias": db})


def run(call: _call.Call):
    """The one call site of :class:`LogProbsFunction` / :class:`LinearLogProbsFunction`:
    ``(logp, entropy)`` shaped like the target, and the stats dict where asked."""
    if call.linear_weight is None:
        out = _call.checked(call, lambda: _ops.call(_schema.LOGPROBS, call.input, call.target, params=call.params))
    else:
        with torch.autocast(call.input.device.type, enabled=False):
            out = _call.checked(call, lambda: _ops.call(_schema.LINEAR_LOGPROBS, call.input, call.linear_weight,
                                                        call.linear_bias, call.target, params=call.params))
    logp, ent = out["logp_t"].reshape(call.shape), out["entropy"].reshape(call.shape)
    if not call.stat_names:
        return logp, ent
    return logp, ent, _schema.public_stats(call.stat_names, call.shape, call.keep, _schema.stats_of(out))


@_inputs.compilable
def logprobs(input: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None,
             ignore_index: int = -100, impl: str = "auto", return_stats=False):
    """Per-token ``log pi(y_t)`` and entropy ``H_t`` (nats) of ``softmax(z')`` from logits.

    Args:
        input: ``[..., V]`` logits (class last; any strides).
        target: the leading shape: token ids in ``[0, V)`` or ``ignore_index``.
        temperature, softcap: ``z' = c tanh(z / c) / T``.
        return_stats: also return a dict of per-token statistics from the same streaming pass
            (no gradient; NaN where ignored in the float ones): ``True`` for every one, or a
            tuple/list of names for those only (each optional one is an extra accumulator in
            the pass, off unless asked): the names of :func:`ranktuner_kernels.cross_entropy`'s
            ``return_stats`` but ``weight`` and ``z_loss``, e.g.
            ``("log_sum_p2", "logit_mean", "is_top1")``.
    Returns:
        ``(logp, entropy)``, float32 (float64 for float64 input), shaped like ``target``, 0 where
        ignored; both differentiable w.r.t. ``input``. With ``return_stats``:
        ``(logp, entropy, stats)``.
    """
    return run(_call.prepare("logprobs", input, target, reduction="none", temperature=temperature, softcap=softcap,
                             ignore_index=ignore_index, impl=impl, return_stats=return_stats))


@_inputs.compilable
def linear_logprobs(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                    linear_bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                    ignore_index: int = -100, chunk_size: int | None = None, acc_policy: str = "auto",
                    impl: str = "auto", return_stats=False):
    """:func:`logprobs` of ``input @ linear_weight.T + linear_bias`` without materialising the
    logits (``[..., D]`` hidden states, ``[V, D]`` head); gradients reach all three.
    ``chunk_size`` and ``acc_policy`` as in :func:`ranktuner_kernels.linear_cross_entropy`;
    ``return_stats`` as in :func:`logprobs` (the statistics of the same chunked pass)."""
    return run(_call.prepare("linear_logprobs", input, target, linear_weight=linear_weight, linear_bias=linear_bias,
                             reduction="none", temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                             chunk_size=chunk_size, acc_policy=acc_policy, impl=impl, return_stats=return_stats))
