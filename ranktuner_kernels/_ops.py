"""The losses as ``torch.library`` custom ops, for ``torch.compile``.

Eager calls run the autograd Functions (``TokenLossFunction``, ``LinearTokenLossFunction``,
``LogProbsFunction``, ``LinearLogProbsFunction``). Under ``torch.compile`` the call sites
(:func:`call`) route here instead, and each Function becomes two opaque ops, made by one
factory (:func:`_make_ops`) from the Function's :class:`~._schema.FunctionSpec`: a forward
op and a backward op (``register_autograd`` ties them together), whose bodies call the
Functions' own static ``forward``/``backward`` with a stand-in ``ctx``. Dynamo and AOTAutograd
see only the ops' fake implementations (shapes and dtypes), so the fused loss traces with no
graph break, and whatever the bodies do (Triton launches, the target-range check's read-back,
the power-of-two test of the upstream gradient) runs at run time, exactly as in eager mode.

Crossing the op boundary: an op takes tensors, scalars, strings and lists only. The Function's
tensor inputs travel as one list (``spec.inputs`` order; an input that is None as an empty
stand-in, flagged in ``given``: a list of optional tensors would not be differentiable). The non-tensor :class:`LossParams`
is split into what varies with the batch (``shape``, ``rows``: op arguments, symbolic under
dynamic shapes) and the rest (weighting config, backend, options, asked statistics), which
:func:`_intern` turns into a string key of an interned table. Dynamo calls ``_intern`` at
trace time (it is marked as having a constant result) and bakes the key into the graph, so
the key adds no guard and every later step reuses the compiled graph.

Not compiled: vocabulary- or data-parallel calls (``process_group``, ``dp_group``) and
``inplace_backward=True`` (an op may not hand back its input's memory as the gradient) run the
Functions eagerly (a graph break, see ``_inputs.compilable``).

The op outputs are fixed lists, ``spec.op_outputs``: an output absent for these params (no
z-loss, an optional statistic not asked for, a gradient nobody needs) is an empty placeholder,
decided from the params alone (``Output.present``) so that the fake implementation agrees; the
backward op gets what the Function saves (``spec.saved``) as one list. Names become positions
only in ``_schema``. Outputs never alias inputs (a custom op's rule): a tensor the Function
hands back that shares an input's memory is copied (``dW`` of the fused path when the upstream
gradient is 1: one ``V x D`` copy per step).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import List, Optional

import torch
from torch import Tensor

from . import _inputs
from ._dispatch import BACKENDS
from ._params import LossParams
from ._schema import FunctionSpec
from .reference import Transform

NS = "ranktuner"

#: spec name -> the autograd Function the ops run, registered by the loss modules with
#: :func:`function` (the losses import this module, never the other way: no import cycle)
FUNCTIONS: dict = {}
#: spec name -> (spec, forward op, backward op)
OPS: dict = {}


def function(spec: FunctionSpec):
    """Class decorator: ``spec``'s autograd Function; makes its two ops."""

    def register(cls):
        FUNCTIONS[spec.name] = cls
        OPS[spec.name] = (spec, *_make_ops(spec, cls))
        return cls

    return register


# ----------------------------------------------------------------------------- params <-> key

#: key -> LossParams with ``shape=()`` and ``rows=None`` (filled in per call)
_PARAMS: dict = {}


def _intern(weighting, backend: str, ignore_index: int, reduction: str, softcap, temperature: float,
            label_smoothing: float, z_loss: float, acc_policy: str, grad_enabled: bool,
            reduce_input_grad: bool, asked_stats: tuple) -> str:
    """The string key of these settings in the interned table (added on first use). The
    weighting configs are frozen dataclasses, so their ``repr`` names them and their options."""
    fields = (weighting, backend, ignore_index, reduction, softcap, temperature, label_smoothing, z_loss, acc_policy,
              grad_enabled, reduce_input_grad, asked_stats)
    key = repr(fields)
    if key not in _PARAMS:
        _PARAMS[key] = LossParams(weighting, BACKENDS[backend], (), ignore_index, reduction,
                                  Transform(softcap, temperature), label_smoothing, z_loss, acc_policy=acc_policy,
                                  grad_enabled=grad_enabled, reduce_input_grad=reduce_input_grad,
                                  asked_stats=frozenset(asked_stats))
    return key


# what torch._dynamo.assume_constant_result sets, without importing torch._dynamo: dynamo calls
# the function while tracing and uses its result as a constant (no guard on the table)
_intern._dynamo_marked_constant = True


def key_of(params: LossParams) -> str:
    return _intern(params.weighting, params.backend.name, params.ignore_index, params.reduction,
                   params.transform.softcap, params.transform.temperature, params.label_smoothing, params.z_loss,
                   params.acc_policy, params.grad_enabled, params.reduce_input_grad, tuple(sorted(params.asked_stats)))


def params_of(key: str, shape, rows: int) -> LossParams:
    """The settings of ``key`` with this call's ``shape`` (symbolic in a fake implementation:
    never turned into ints here, which would specialize the graph) and ``rows``."""
    try:
        template = _PARAMS[key]
    except KeyError:
        raise RuntimeError("ranktuner_kernels: unknown loss settings key (a compiled graph from another "
                           "process?); re-run torch.compile in this process") from None
    return dataclasses.replace(template, shape=tuple(shape), rows=rows or None)


def compiling(params: LossParams) -> bool:
    """Route this call through the custom ops (inside ``torch.compile``; the calls that
    ``_inputs.compilable`` keeps eager never get here while compiling)."""
    return (torch.compiler.is_compiling() and not params.backend.sharded and params.batch_gather is None
            and not params.inplace_backward)


def call(spec: FunctionSpec, *tensors, params: LossParams) -> dict:
    """``Function.apply(*tensors, params)`` of ``spec``'s Function, through its custom op under
    ``torch.compile``: ``{output name: tensor or None}``."""
    if not compiling(params):
        return spec.named(FUNCTIONS[spec.name].apply(*tensors, params))
    _, forward_op, _ = OPS[spec.name]
    needs = [t is not None and t.requires_grad for t in tensors]
    given = [t is not None for t in tensors]
    stand_in = torch.empty(0, device=tensors[0].device)
    out = forward_op([stand_in if t is None else t for t in tensors], given, list(params.shape), params.rows or 0,
                     needs, key_of(params))
    want = spec.wanted(needs, dict(zip(spec.inputs, tensors)), params)
    named = spec.unpack(params, want, out)
    return {o.name: named[o.name] for o in spec.outputs}


# ----------------------------------------------------------------------------- the ops


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


def _grad_list(grads):
    """``register_autograd``'s backward gets a list output's gradient as one list."""
    return list(grads[0]) if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else list(grads)


def _make_ops(spec: FunctionSpec, fn):
    """The forward and backward custom ops of ``spec``'s Function ``fn``, with their fake
    implementations and autograd registration, all read from ``spec``."""

    def settings(args: dict, shape, rows, needs, key):
        """``(params, args, wanted gradients)``; ``args``: the inputs (or saved tensors) by name."""
        params = params_of(key, shape, rows)
        return params, args, spec.wanted(needs, args, params)

    def inputs_of(tensors, given) -> dict:
        return {k: t if ok else None for k, t, ok in zip(spec.inputs, tensors, given)}

    def forward(tensors: List[Tensor], given: List[bool], shape: List[int], rows: int, needs: List[bool],
                key: str) -> List[Tensor]:
        params, args, want = settings(inputs_of(tensors, given), shape, rows, needs, key)
        # the target-range (and negative num_items_in_batch) check that the public functions
        # skip while tracing, with the same messages; after the kernels where they clamp
        check = (args["target"], params.vocab(args["weight"].shape[0] if spec.fused else args["logits"].shape[-1]),
                 params.ignore_index, args.get("norm"))
        before = spec.fused or params.backend.range_check == "before"
        if before:
            _inputs.check_range(*check)
        ctx = _Ctx(needs_input_grad=(*needs, False))
        values = {**spec.named(fn.forward(ctx, *args.values(), params)), **spec.saved_values(ctx)}
        if not before:
            _inputs.check_range(*check)
        return _fresh(spec.pack(params, want, values, args), tensors)

    forward_op = torch.library.custom_op(f"{NS}::{spec.name}", forward, mutates_args=())

    @forward_op.register_fake
    def _(tensors, given, shape, rows, needs, key):
        params, args, want = settings(inputs_of(tensors, given), shape, rows, needs, key)
        return spec.fake(params, want, args)

    def backward(grads: List[Optional[Tensor]], saved: List[Optional[Tensor]], shape: List[int], rows: int,
                 needs: List[bool], key: str) -> List[Tensor]:
        params, args, want = settings(dict(zip(spec.saved, saved)), shape, rows, needs, key)
        ctx = _Ctx(needs_input_grad=(*needs, False), saved_tensors=saved, params=params)
        by_name = dict(zip(spec.differentiable, grads))
        result = fn.backward(ctx, *(by_name.get(o.name) for o in spec.outputs))
        return _fresh(spec.pack_grads(want, dict(zip(spec.inputs, result)), args), [*grads, *saved])

    backward_op = torch.library.custom_op(f"{NS}::{spec.name}_backward", backward, mutates_args=())

    @backward_op.register_fake
    def _(grads, saved, shape, rows, needs, key):
        params, args, want = settings(dict(zip(spec.saved, saved)), shape, rows, needs, key)
        return spec.fake_grads(want, args)

    def setup_context(ctx, inputs, output):
        tensors, given, shape, rows, needs, key = inputs
        params, args, want = settings(inputs_of(tensors, given), (), 0, needs, key)
        named = spec.unpack(params, want, output)
        spec.save(ctx, {**args, **named})
        ctx.shape, ctx.rows, ctx.needs, ctx.key = list(shape), rows, list(needs), key
        ctx.mark_non_differentiable(*(t for name, t in named.items() if name not in spec.differentiable
                                      and t is not None))

    def autograd_backward(ctx, *grads):
        by_name = dict(zip((o.name for o in spec.op_outputs), _grad_list(grads)))
        saved = list(ctx.saved_tensors)
        in_grads = backward_op([by_name[k] for k in spec.differentiable], saved, ctx.shape, ctx.rows, ctx.needs,
                               ctx.key)
        params, args, want = settings(dict(zip(spec.saved, saved)), ctx.shape, ctx.rows, ctx.needs, ctx.key)
        grads_by_input = spec.unpack_grads(want, in_grads)
        return [grads_by_input.get(k) for k in spec.inputs], None, None, None, None, None

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op, backward_op


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
