"""Per-token log-probabilities and entropies with gradients through both, for RL: what verl's
fused ``linear_cross_entropy`` returns, on the same kernels as the losses.

    logp, ent = rk.logprobs(logits, tokens, temperature=0.7)
    logp, ent = rk.linear_logprobs(hidden, lm_head.weight, tokens, temperature=0.7)

Forward: one statistics pass per row (the fused-linear path chunk by chunk, never holding the
``N x V`` logits): ``log pi(y_t)`` and ``H_t`` of ``softmax(z')``, ``z' = c tanh(z/c) / T``. Under
``torch.no_grad()`` (old-policy and reference passes) that is all it does. Backward, for
upstream gradients ``a_t`` on ``logp`` and ``b_t`` on ``H`` (either may be absent), the one
gradient of SPEC with ``w = -a``, ``beta = -b``:

    dz'_i = a_t (1[i = y] - p_i) - b_t p_i (log p_i + H_t)

(the fused-linear path recomputes each chunk's logits: 2 N D V FLOPs forward, 6 N D V backward).
Ignored positions (``ignore_index``) hold 0 in both outputs and get no gradient, so masked
sums need no NaN handling.
"""

from __future__ import annotations

import torch

from . import _call, _inputs, _ops
from ._chunks import Grads, chunk_logits, gradient_sweep, needs_grads
from ._params import LossParams
from .reference import GradCoefs, RowStats, compute_dtype


def _coefs(g_logp, g_ent, keep):
    ga = torch.where(keep, -g_logp.reshape(-1), 0)
    gb = None if g_ent is None else torch.where(keep, -g_ent.reshape(-1), 0)
    return GradCoefs(ga, None, None, gb)


def _grad_or_zero(g, like):
    return torch.zeros_like(like) if g is None else g.to(like.dtype)


@_ops.function("logprobs")
class LogProbsFunction(torch.autograd.Function):
    """``logits [B, T, V]``, ``target [B*T]`` -> ``(logp [B*T], entropy [B*T])``."""

    @staticmethod
    def forward(ctx, logits, target, params: LossParams):
        stats, _ = params.backend.row_stats(logits, target, params)
        ctx.save_for_backward(logits, target, stats.lse, stats.logp_t, stats.entropy)
        ctx.params = params
        return stats.logp_t, stats.entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, target, lse, logp, ent = ctx.saved_tensors
        params = ctx.params
        keep = target != params.ignore_index
        coefs = _coefs(_grad_or_zero(g_logp, logp), g_ent, keep)
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        stats = RowStats(lse, logp, None, None, ent, None)
        params.backend.row_grad(logits, target, stats, coefs, params, out)
        return out, None, None


@_ops.function("linear_logprobs")
class LinearLogProbsFunction(torch.autograd.Function):
    """``h [N, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``target [N]`` ->
    ``(logp [N], entropy [N])``; differentiable w.r.t. ``h``, ``weight``, ``bias``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, params: LossParams):
        n = h.shape[0]
        acc = compute_dtype(h.dtype)
        logp = torch.zeros(n, dtype=acc, device=h.device)
        lse, ent = torch.zeros_like(logp), torch.zeros_like(logp)
        for start in range(0, n, params.rows):
            sl = slice(start, min(n, start + params.rows))
            stats, _ = params.backend.row_stats(chunk_logits(h[sl], weight, bias)[None], target[sl], params)
            lse[sl], logp[sl], ent[sl] = stats.lse, stats.logp_t, stats.entropy
        ctx.save_for_backward(h, weight, bias, target, lse, logp, ent)
        ctx.params = params
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, target, lse, logp, ent = ctx.saved_tensors
        params = ctx.params
        keep = target != params.ignore_index
        coefs = _coefs(_grad_or_zero(g_logp, logp), g_ent, keep)
        grads = Grads(h, weight, bias, needs_grads(ctx, bias), params.acc_policy)
        stats = RowStats(lse, logp, None, None, ent, None)
        return (*gradient_sweep(params, h, weight, bias, target, stats, coefs, grads), None, None)


def run(call: _call.Call):
    """The one call site of :class:`LogProbsFunction` / :class:`LinearLogProbsFunction`:
    ``(logp, entropy)`` shaped like the target."""
    if call.linear_weight is None:
        logp, ent = _call.checked(call, lambda: _ops.logprobs(call.input, call.target, call.params))
    else:
        with torch.autocast(call.input.device.type, enabled=False):
            logp, ent = _call.checked(call, lambda: _ops.linear_logprobs(
                call.input, call.linear_weight, call.linear_bias, call.target, call.params))
    return logp.reshape(call.shape), ent.reshape(call.shape)


@_inputs.compilable
def logprobs(input: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None,
             ignore_index: int = -100, impl: str = "auto"):
    """Per-token ``log pi(y_t)`` and entropy ``H_t`` (nats) of ``softmax(z')`` from logits.

    Args:
        input: ``[..., V]`` logits (class last; any strides).
        target: the leading shape: token ids in ``[0, V)`` or ``ignore_index``.
        temperature, softcap: ``z' = c tanh(z / c) / T``.
    Returns:
        ``(logp, entropy)``, float32 (float64 for float64 input), shaped like ``target``, 0 where
        ignored; both differentiable w.r.t. ``input``.
    """
    return run(_call.prepare("logprobs", input, target, reduction="none", temperature=temperature, softcap=softcap,
                             ignore_index=ignore_index, impl=impl))


@_inputs.compilable
def linear_logprobs(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                    linear_bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                    ignore_index: int = -100, chunk_size: int | None = None, acc_policy: str = "auto",
                    impl: str = "auto"):
    """:func:`logprobs` of ``input @ linear_weight.T + linear_bias`` without materialising the
    logits (``[..., D]`` hidden states, ``[V, D]`` head); gradients reach all three.
    ``chunk_size`` and ``acc_policy`` as in :func:`ranktuner_kernels.linear_cross_entropy`."""
    return run(_call.prepare("linear_logprobs", input, target, linear_weight=linear_weight, linear_bias=linear_bias,
                             reduction="none", temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                             chunk_size=chunk_size, acc_policy=acc_policy, impl=impl))
