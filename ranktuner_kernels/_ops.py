"""The losses as ``torch.library`` custom ops, for ``torch.compile``.

Eager calls run the autograd Functions (``TokenLossFunction``, ``LinearTokenLossFunction``,
``LogProbsFunction``, ``LinearLogProbsFunction``) as before. Under ``torch.compile`` the call
sites route here instead, and each Function becomes two opaque ops: a forward op and a
backward op (``register_autograd`` ties them together), whose bodies call the Functions' own
static ``forward``/``backward`` with a stand-in ``ctx``. Dynamo and AOTAutograd see only the
ops' fake implementations (shapes and dtypes), so the fused loss traces with no graph break,
and whatever the bodies do (Triton launches, the target-range check's read-back, the power-of-
two test of the upstream gradient) runs at run time, exactly as in eager mode.

Crossing the op boundary: an op takes tensors, scalars, strings and lists only. The
non-tensor :class:`LossParams` is split into what varies with the batch (``shape``, ``rows``:
op arguments, symbolic under dynamic shapes) and the rest (weighting config, backend, options),
which :func:`_intern` turns into a string key of an interned table. Dynamo calls ``_intern`` at
trace time (it is marked as having a constant result) and bakes the key into the graph, so
the key adds no guard and every later step reuses the compiled graph.

Not compiled: vocabulary- or data-parallel calls (``process_group``, ``dp_group``) and
``inplace_backward=True`` (an op may not hand back its input's memory as the gradient) run the
Functions eagerly (a graph break, see ``_inputs.compilable``).

The op outputs are fixed lists: a result that the Function returns as ``None`` (no z-loss,
no label smoothing, no entropy term, a gradient nobody needs) is an empty placeholder, decided
from the params alone so that the fake implementation agrees. Outputs never alias inputs (a
custom op's rule): a tensor the Function hands back that shares an input's memory is copied
(``dW`` of the fused path when the upstream gradient is 1: one ``V x D`` copy per step).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import List, Optional

import torch
from torch import Tensor

from . import _inputs
from ._chunks import one_sweep, wanted_grads
from ._dispatch import Backend
from ._params import LossParams
from .reference import Transform, compute_dtype

NS = "ranktuner"

#: the autograd Functions the ops run, registered by the loss modules with :func:`function`
#: (the losses import this module, never the other way: no import cycle)
FUNCTIONS: dict = {}


def function(name: str):
    """Class decorator: register an autograd Function as the body of the ops called ``name``."""

    def register(cls):
        FUNCTIONS[name] = cls
        return cls

    return register


# ----------------------------------------------------------------------------- params <-> key

#: key -> LossParams with ``shape=()`` and ``rows=None`` (filled in per call)
_PARAMS: dict = {}


def _intern(weighting, backend: str, ignore_index: int, reduction: str, softcap, temperature: float,
            label_smoothing: float, z_loss: float, acc_policy: str, grad_enabled: bool,
            reduce_input_grad: bool) -> str:
    """The string key of these settings in the interned table (added on first use). The
    weighting configs are frozen dataclasses, so their ``repr`` names them and their options."""
    fields = (weighting, backend, ignore_index, reduction, softcap, temperature, label_smoothing, z_loss, acc_policy,
              grad_enabled, reduce_input_grad)
    key = repr(fields)
    if key not in _PARAMS:
        _PARAMS[key] = LossParams(weighting, Backend(backend), (), ignore_index, reduction,
                                  Transform(softcap, temperature),
                                  label_smoothing, z_loss, acc_policy=acc_policy, grad_enabled=grad_enabled,
                                  reduce_input_grad=reduce_input_grad)
    return key


# what torch._dynamo.assume_constant_result sets, without importing torch._dynamo: dynamo calls
# the function while tracing and uses its result as a constant (no guard on the table)
_intern._dynamo_marked_constant = True


def key_of(params: LossParams) -> str:
    return _intern(params.weighting, params.backend.name, params.ignore_index, params.reduction,
                   params.transform.softcap, params.transform.temperature, params.label_smoothing, params.z_loss,
                   params.acc_policy, params.grad_enabled, params.reduce_input_grad)


def params_of(key: str, shape, rows: int) -> LossParams:
    try:
        template = _PARAMS[key]
    except KeyError:
        raise RuntimeError("ranktuner_kernels: unknown loss settings key (a compiled graph from another "
                           "process?); re-run torch.compile in this process") from None
    return dataclasses.replace(template, shape=tuple(int(s) for s in shape), rows=rows or None)


def compiling(params: LossParams) -> bool:
    """Route this call through the custom ops (inside ``torch.compile``; the calls that
    ``_inputs.compilable`` keeps eager never get here while compiling)."""
    return (torch.compiler.is_compiling() and not params.backend.sharded and params.batch_gather is None
            and not params.inplace_backward)


# ----------------------------------------------------------------------------- helpers


class _Ctx:
    """Stand-in for autograd's ``ctx``, so the Functions' static bodies run inside the ops."""

    def __init__(self, needs_input_grad=(), saved_tensors=(), **attrs):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors = tuple(saved_tensors)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _fresh(outs, inputs):
    """Custom-op outputs may not alias the inputs or each other: copy those that do."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    fixed = []
    for t in outs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        fixed.append(t)
    return fixed


def _or_none(t: Optional[Tensor], present: bool):
    return t if present else None


def _grad_list(grads):
    """``register_autograd``'s backward gets a list output's gradient as one list."""
    return list(grads[0]) if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else list(grads)


def _check_range(params: LossParams, target: Tensor, v_size: int, norm: Optional[Tensor]) -> None:
    """The target-range (and negative ``num_items_in_batch``) check that the public functions
    skip while tracing: here it runs at run time, with the same messages."""
    _inputs.check_range(target, v_size, params.ignore_index, norm)


# ----------------------------------------------------------------------------- token loss
# outputs: loss, w, z_loss, lse, logp_t, target_logit, max_logit, entropy, rank, logit_mean, beta


def _loss_outputs(params, loss, w, zl, stats, beta) -> list:
    """The fixed output list of the loss ops: ``loss, w, z_loss, lse, logp_t, target_logit,
    max_logit, entropy, rank, logit_mean, beta``, an empty tensor for an absent one."""
    has_zl, has_mean, has_beta = _token_flags(params)
    return [loss, w, zl if has_zl else _empty(w), *stats[:6], stats[6] if has_mean else _empty(w),
            beta if has_beta else _empty(w)]


def _fake_loss_outputs(params, n: int, like: Tensor, shape) -> list:
    """:func:`_loss_outputs`' shapes and dtypes for ``n`` tokens (``like``: the input)."""
    has_zl, has_mean, has_beta = _token_flags(params)
    vec = like.new_empty((n,), dtype=compute_dtype(like.dtype))
    loss = like.new_empty(tuple(shape) if params.reduction == "none" else (), dtype=vec.dtype)
    opt = [vec.new_empty(n if has else 0) for has in (has_zl, has_mean, has_beta)]
    return [loss, vec, opt[0], *_fake_stats(vec), opt[1], opt[2]]


def _fake_stats(vec):
    """``lse, logp_t, target_logit, max_logit, entropy`` like ``vec`` and an int64 ``rank``."""
    return [*(torch.empty_like(vec) for _ in range(5)), torch.empty_like(vec, dtype=torch.int64)]


def _token_flags(params):
    """Presence of ``(z_loss, logit_mean, beta)`` in the outputs."""
    return params.z_loss > 0, params.label_smoothing > 0, params.weighting.has_entropy_term


@torch.library.custom_op(f"{NS}::token_loss", mutates_args=())
def token_loss_op(logits: Tensor, target: Tensor, scale: Optional[Tensor], norm: Optional[Tensor],
                  shape: List[int], key: str) -> List[Tensor]:
    params = params_of(key, shape, 0)
    if params.backend.name == "reference":
        _check_range(params, target, logits.shape[-1], norm)
    ctx = _Ctx()
    loss, w, zl, *stats = FUNCTIONS["token_loss"].forward(ctx, logits, target, scale, norm, params)
    if params.backend.name != "reference":
        _check_range(params, target, logits.shape[-1], norm)
    outs = _loss_outputs(params, loss, w, zl, stats, ctx.saved_tensors[7])
    return _fresh(outs, (logits, target, scale, norm))


@token_loss_op.register_fake
def _(logits, target, scale, norm, shape, key):
    return _fake_loss_outputs(params_of(key, (), 0), target.shape[0], logits, shape)


@torch.library.custom_op(f"{NS}::token_loss_backward", mutates_args=())
def token_loss_backward_op(grad: Tensor, logits: Tensor, target: Tensor, lse: Tensor, logp_t: Tensor,
                           entropy: Tensor, logit_mean: Optional[Tensor], w: Tensor, beta: Optional[Tensor],
                           norm: Optional[Tensor], shape: List[int], key: str) -> Tensor:
    params = params_of(key, shape, 0)
    ctx = _Ctx(saved_tensors=(logits, target, lse, logp_t, entropy, logit_mean, w, beta, norm), params=params,
               backward_ran=False)
    return FUNCTIONS["token_loss"].backward(ctx, grad)[0]


@token_loss_backward_op.register_fake
def _(grad, logits, target, lse, logp_t, entropy, logit_mean, w, beta, norm, shape, key):
    return torch.empty_like(logits)


def _token_setup(ctx, inputs, output):
    logits, target, scale, norm, shape, key = inputs
    _, has_mean, has_beta = _token_flags(params_of(key, (), 0))
    o = output
    ctx.save_for_backward(logits, target, o[3], o[4], o[7], o[9] if has_mean else None, o[1],
                          o[10] if has_beta else None, norm)
    ctx.shape, ctx.key = list(shape), key
    ctx.mark_non_differentiable(*o[1:])


def _token_backward(ctx, *grads):
    g = _grad_list(grads)[0]
    logits, target, lse, logp_t, entropy, logit_mean, w, beta, norm = ctx.saved_tensors
    dz = token_loss_backward_op(g, logits, target, lse, logp_t, entropy, logit_mean, w, beta, norm, ctx.shape,
                                ctx.key)
    return dz, None, None, None, None, None


token_loss_op.register_autograd(_token_backward, setup_context=_token_setup)


def token_loss(logits, target, scale, norm, params: LossParams):
    """``TokenLossFunction.apply(logits, target, scale, norm, params)``, through the custom op
    under ``torch.compile``."""
    if not compiling(params):
        return FUNCTIONS["token_loss"].apply(logits, target, scale, norm, params)
    has_zl, has_mean, _ = _token_flags(params)
    o = token_loss_op(logits, target, scale, norm, list(params.shape), key_of(params))
    return (o[0], o[1], _or_none(o[2], has_zl), *o[3:9], _or_none(o[9], has_mean))


# ----------------------------------------------------------------------------- fused linear loss
# outputs: loss, w, z_loss, lse, logp_t, target_logit, max_logit, entropy, rank, logit_mean, beta,
#          and the gradients formed in forward (one sweep): dh, dW, db


def _linear_needs(params, needs, bias):
    """``(dh, dW, db)`` wanted, as the Functions decide them (``_chunks.needs_grads``)."""
    return wanted_grads(needs, bias, params.grad_enabled)


@torch.library.custom_op(f"{NS}::linear_loss", mutates_args=())
def linear_loss_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, scale: Optional[Tensor],
                   norm: Optional[Tensor], shape: List[int], rows: int, needs: List[bool], key: str) -> List[Tensor]:
    params = params_of(key, shape, rows)
    _check_range(params, target, weight.shape[0], norm)
    ctx = _Ctx(needs_input_grad=(*needs, False, False, False, False))
    loss, w, zl, *stats = FUNCTIONS["linear_loss"].forward(ctx, h, weight, bias, target, scale, norm, params)
    saved = ctx.saved_tensors
    beta, stored = saved[9], saved[11:]
    want = _linear_needs(params, needs, bias)
    if not one_sweep(params, needs):
        stored = (None, None, None)
    likes = (h, weight, bias if bias is not None else w)
    grads = [t if (ok and t is not None) else _empty(like) for t, ok, like in zip(stored, want, likes)]
    outs = [*_loss_outputs(params, loss, w, zl, stats, beta), *grads]
    return _fresh(outs, (h, weight, bias, target, scale, norm))


@linear_loss_op.register_fake
def _(h, weight, bias, target, scale, norm, shape, rows, needs, key):
    params = params_of(key, (), 0)
    outs = _fake_loss_outputs(params, target.shape[0], h, shape)
    sweep = one_sweep(params, needs)
    want = _linear_needs(params, needs, bias)
    grads = [torch.empty_like(like) if sweep and ok else like.new_empty(0)
             for ok, like in zip(want, (h, weight, bias if bias is not None else outs[1]))]
    return [*outs, *grads]


@torch.library.custom_op(f"{NS}::linear_loss_backward", mutates_args=())
def linear_loss_backward_op(grad: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                            lse: Tensor, logp_t: Tensor, entropy: Tensor, logit_mean: Optional[Tensor], w: Tensor,
                            beta: Optional[Tensor], norm: Optional[Tensor], dh: Tensor, dw: Tensor, db: Tensor,
                            shape: List[int], rows: int, needs: List[bool], key: str) -> List[Tensor]:
    params = params_of(key, shape, rows)
    want = _linear_needs(params, needs, bias)
    sweep = one_sweep(params, needs)
    stored = tuple(t if ok else None for t, ok in zip((dh, dw, db), want)) if sweep else ()
    ctx = _Ctx(needs_input_grad=(*needs, False, False, False, False), params=params, one_sweep=sweep,
               saved_tensors=(h, weight, bias, target, lse, logp_t, entropy, logit_mean, w, beta, norm, *stored))
    out = FUNCTIONS["linear_loss"].backward(ctx, grad)[:3]
    likes = (h, weight, bias if bias is not None else w)
    grads = [t if (ok and t is not None) else _empty(like) for t, ok, like in zip(out, want, likes)]
    return _fresh(grads, (grad, h, weight, bias, target, lse, logp_t, entropy, logit_mean, w, beta, norm, dh, dw, db))


@linear_loss_backward_op.register_fake
def _(grad, h, weight, bias, target, lse, logp_t, entropy, logit_mean, w, beta, norm, dh, dw, db, shape, rows,
      needs, key):
    params = params_of(key, (), 0)
    want = _linear_needs(params, needs, bias)
    return [torch.empty_like(like) if ok else like.new_empty(0)
            for ok, like in zip(want, (h, weight, bias if bias is not None else w))]


def _linear_setup(ctx, inputs, output):
    h, weight, bias, target, scale, norm, shape, rows, needs, key = inputs
    _, has_mean, has_beta = _token_flags(params_of(key, (), 0))
    o = output
    ctx.save_for_backward(h, weight, bias, target, o[3], o[4], o[7], o[9] if has_mean else None, o[1],
                          o[10] if has_beta else None, norm, *o[11:14])
    ctx.shape, ctx.rows, ctx.needs, ctx.key = list(shape), rows, list(needs), key
    ctx.mark_non_differentiable(*o[1:])


def _linear_backward(ctx, *grads):
    g = _grad_list(grads)[0]
    saved = ctx.saved_tensors
    dh, dw, db = linear_loss_backward_op(g, *saved, ctx.shape, ctx.rows, ctx.needs, ctx.key)
    want = _linear_needs(params_of(ctx.key, (), 0), ctx.needs, saved[2])
    return (dh if want[0] else None, dw if want[1] else None, db if want[2] else None,
            None, None, None, None, None, None, None)


linear_loss_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_loss(h, weight, bias, target, scale, norm, params: LossParams):
    """``LinearTokenLossFunction.apply(h, weight, bias, target, scale, norm, params)``, through
    the custom op under ``torch.compile``."""
    if not compiling(params):
        return FUNCTIONS["linear_loss"].apply(h, weight, bias, target, scale, norm, params)
    has_zl, has_mean, _ = _token_flags(params)
    needs = [h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    o = linear_loss_op(h, weight, bias, target, scale, norm, list(params.shape), params.rows, needs,
                       key_of(params))
    return (o[0], o[1], _or_none(o[2], has_zl), *o[3:9], _or_none(o[9], has_mean))


# ----------------------------------------------------------------------------- log-probabilities
# outputs: logp, entropy, lse (saved for backward)


@torch.library.custom_op(f"{NS}::logprobs", mutates_args=())
def logprobs_op(logits: Tensor, target: Tensor, shape: List[int], key: str) -> List[Tensor]:
    params = params_of(key, shape, 0)
    if params.backend.name == "reference":
        _check_range(params, target, logits.shape[-1], None)
    ctx = _Ctx()
    logp, ent = FUNCTIONS["logprobs"].forward(ctx, logits, target, params)
    if params.backend.name != "reference":
        _check_range(params, target, logits.shape[-1], None)
    return _fresh([logp, ent, ctx.saved_tensors[2]], (logits, target))


@logprobs_op.register_fake
def _(logits, target, shape, key):
    return [logits.new_empty(target.shape, dtype=compute_dtype(logits.dtype)) for _ in range(3)]


@torch.library.custom_op(f"{NS}::logprobs_backward", mutates_args=())
def logprobs_backward_op(g_logp: Tensor, g_ent: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                         logp: Tensor, ent: Tensor, shape: List[int], key: str) -> Tensor:
    params = params_of(key, shape, 0)
    ctx = _Ctx(saved_tensors=(logits, target, lse, logp, ent), params=params)
    return FUNCTIONS["logprobs"].backward(ctx, g_logp, g_ent)[0]


@logprobs_backward_op.register_fake
def _(g_logp, g_ent, logits, target, lse, logp, ent, shape, key):
    return torch.empty_like(logits)


def _logprobs_setup(ctx, inputs, output):
    logits, target, shape, key = inputs
    ctx.save_for_backward(logits, target, output[2], output[0], output[1])
    ctx.shape, ctx.key = list(shape), key
    ctx.mark_non_differentiable(output[2])


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _logprobs_backward(ctx, *grads):
    g = _grad_list(grads)
    logits, target, lse, logp, ent = ctx.saved_tensors
    dz = logprobs_backward_op(_zeros_if_none(g[0], logp), _zeros_if_none(g[1], ent), logits, target, lse, logp, ent,
                              ctx.shape, ctx.key)
    return dz, None, None, None


logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def logprobs(logits, target, params: LossParams):
    """``LogProbsFunction.apply(logits, target, params)``, through the custom op under
    ``torch.compile``."""
    if not compiling(params):
        return FUNCTIONS["logprobs"].apply(logits, target, params)
    o = logprobs_op(logits, target, list(params.shape), key_of(params))
    return o[0], o[1]


@torch.library.custom_op(f"{NS}::linear_logprobs", mutates_args=())
def linear_logprobs_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, shape: List[int],
                       rows: int, key: str) -> List[Tensor]:
    params = params_of(key, shape, rows)
    _check_range(params, target, weight.shape[0], None)
    ctx = _Ctx()
    logp, ent = FUNCTIONS["linear_logprobs"].forward(ctx, h, weight, bias, target, params)
    return _fresh([logp, ent, ctx.saved_tensors[4]], (h, weight, bias, target))


@linear_logprobs_op.register_fake
def _(h, weight, bias, target, shape, rows, key):
    return [h.new_empty(target.shape, dtype=compute_dtype(h.dtype)) for _ in range(3)]


@torch.library.custom_op(f"{NS}::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(g_logp: Tensor, g_ent: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                                target: Tensor, lse: Tensor, logp: Tensor, ent: Tensor, shape: List[int], rows: int,
                                needs: List[bool], key: str) -> List[Tensor]:
    params = params_of(key, shape, rows)
    ctx = _Ctx(needs_input_grad=(*needs, False, False), saved_tensors=(h, weight, bias, target, lse, logp, ent),
               params=params)
    out = FUNCTIONS["linear_logprobs"].backward(ctx, g_logp, g_ent)[:3]
    want = _linear_needs(params, needs, bias)
    likes = (h, weight, bias if bias is not None else lse)
    grads = [t if (ok and t is not None) else _empty(like) for t, ok, like in zip(out, want, likes)]
    return _fresh(grads, (g_logp, g_ent, h, weight, bias, target, lse, logp, ent))


@linear_logprobs_backward_op.register_fake
def _(g_logp, g_ent, h, weight, bias, target, lse, logp, ent, shape, rows, needs, key):
    want = _linear_needs(params_of(key, (), 0), needs, bias)
    return [torch.empty_like(like) if ok else like.new_empty(0)
            for ok, like in zip(want, (h, weight, bias if bias is not None else lse))]


def _linear_logprobs_setup(ctx, inputs, output):
    h, weight, bias, target, shape, rows, key = inputs
    ctx.save_for_backward(h, weight, bias, target, output[2], output[0], output[1])
    ctx.shape, ctx.rows, ctx.key = list(shape), rows, key
    ctx.needs = [h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    ctx.mark_non_differentiable(output[2])


def _linear_logprobs_backward(ctx, *grads):
    g = _grad_list(grads)
    h, weight, bias, target, lse, logp, ent = ctx.saved_tensors
    dh, dw, db = linear_logprobs_backward_op(_zeros_if_none(g[0], logp), _zeros_if_none(g[1], ent), h, weight, bias,
                                             target, lse, logp, ent, ctx.shape, ctx.rows, ctx.needs, ctx.key)
    want = _linear_needs(params_of(ctx.key, (), 0), ctx.needs, bias)
    return (dh if want[0] else None, dw if want[1] else None, db if want[2] else None, None, None, None, None)


linear_logprobs_op.register_autograd(_linear_logprobs_backward, setup_context=_linear_logprobs_setup)


def linear_logprobs(h, weight, bias, target, params: LossParams):
    """``LinearLogProbsFunction.apply(h, weight, bias, target, params)``, through the custom op
    under ``torch.compile``."""
    if not compiling(params):
        return FUNCTIONS["linear_logprobs"].apply(h, weight, bias, target, params)
    o = linear_logprobs_op(h, weight, bias, target, list(params.shape), params.rows, key_of(params))
    return o[0], o[1]


# ----------------------------------------------------------------------------- the NLL meter

#: NLLMeter id -> meter, for the op that records into it from compiled code
_METERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_METER_IDS = itertools.count()


def register_meter(meter) -> int:
    """An id for ``meter`` that compiled code can carry (an int constant, stable across steps)."""
    meter_id = next(_METER_IDS)
    _METERS[meter_id] = meter
    return meter_id


@torch.library.custom_op(f"{NS}::nll_record", mutates_args=())
def nll_record_op(total: Tensor, count: Tensor, meter: int, mode: str) -> Tensor:
    """Add ``(total, count)`` to NLL meter ``meter`` at run time and return ``total / count``.
    The meter's state lives outside the graph (no guard on it); the op is registered as
    effectful, so it runs even when nothing reads its result."""
    target = _METERS.get(meter)
    if target is not None:
        target.add(mode, total, count)
    return total / count


@nll_record_op.register_fake
def _(total, count, meter, mode):
    return torch.empty_like(total)


def _mark_effectful():
    """Keep the op when its result is unused (``return_dict=False`` drops ``nll``): without an
    effect the compilers remove it as dead code and the meter misses the batch."""
    try:
        from torch._library.effects import EffectType

        torch.library._register_effectful_op(f"{NS}::nll_record", EffectType.ORDERED)
    except (ImportError, AttributeError):  # older torch: the FX side-effect set
        torch.fx.node.has_side_effect(torch.ops.ranktuner.nll_record.default)


_mark_effectful()
