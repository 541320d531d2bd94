"""The one schema of the op layer: what each autograd Function takes, returns and saves, by
name, and the public stats dict; all derived from the statistics pass's schema
(``reference.stats.ROW_STATS``). ``docs/ops.md`` explains it and how to add a statistic.

A :class:`FunctionSpec` names a Function's tensor inputs, its outputs (:class:`Output`: name,
kind, when present), which outputs are differentiable and which tensors its backward reads.
The Functions return and save through it (:meth:`FunctionSpec.returns`, :meth:`~FunctionSpec.save`);
the custom ops (``_ops``) pack, unpack and fake their fixed output lists through it. This module
is the only place that turns names into positions.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from ._chunks import one_sweep, wanted_grads
from .reference import ROW_STATS, STAT_NAMES, RowStats, compute_dtype, kind_dtype
from .reference.stats import FLOAT

#: :attr:`Output.kind` besides the statistics' kinds (``reference.stats``: float, int64, bool):
#: the loss (a scalar, or the target's shape for ``reduction="none"``), and an input's like
LOSS, LIKE = "loss", "like:"


def always(params, want) -> bool:
    return True


class Output(NamedTuple):
    """A tensor a Function returns (or saves, for its op to return): ``kind`` gives its shape
    and dtype (``[N]`` of a statistic's kind, ``"float"`` the compute dtype; :data:`LOSS`; or ``"like:h"``:
    an input's), ``present(params, want)`` whether it exists (else None; an empty placeholder
    in an op's output list). ``want``: the fused path's wanted gradients (else None)."""

    name: str
    kind: str
    present: Callable = always


def _stat_output(stat) -> Output:
    if not stat.optional:
        return Output(stat.name, stat.kind)
    return Output(stat.name, stat.kind, lambda params, want: stat.name in params.extra_stats)


#: Every statistic of the statistics pass, present when computed.
STAT_OUTPUTS = tuple(_stat_output(s) for s in ROW_STATS)
#: The token terms of the losses (SPEC, "One mechanism"): the loss, the weight, the z-loss term.
TERM_OUTPUTS = (Output("loss", LOSS), Output("w", FLOAT),
                Output("z_loss", FLOAT, lambda params, want: params.z_loss > 0))
BETA = Output("beta", FLOAT, lambda params, want: params.weighting.has_entropy_term)
#: The fused loss's gradients formed in the forward sweep (for an upstream gradient of 1).
STORED_GRADS = tuple(Output(f"stored_d{x}", LIKE + x, lambda params, want, x=x: one_sweep(params, want)
                            and getattr(want, x)) for x in ("h", "weight", "bias"))


class FunctionSpec(NamedTuple):
    """One autograd Function by name: ``inputs`` (the tensor arguments of ``apply``, before
    the params), ``grad_inputs`` (those that get a gradient), ``outputs``, ``differentiable``
    (the outputs with a gradient), ``saved`` (the names backward reads: inputs, outputs or
    ``saved_only`` tensors) and ``saved_only`` (saved tensors that are no output: an op returns
    them too, so that its autograd can save them)."""

    name: str
    inputs: tuple
    grad_inputs: tuple
    outputs: tuple
    differentiable: tuple
    saved: tuple
    saved_only: tuple = ()

    @property
    def fused(self) -> bool:
        """On hidden states and an LM head (its gradients are the fused path's wanted ones)."""
        return "weight" in self.inputs

    @property
    def op_outputs(self) -> tuple:
        return self.outputs + self.saved_only

    # -- the Functions' side ---------------------------------------------------------------

    def returns(self, ctx, values: dict) -> tuple:
        """``Function.forward``'s result: ``values`` in output order (None where absent), the
        non-differentiable ones marked so."""
        out = tuple(values.get(o.name) for o in self.outputs)
        ctx.mark_non_differentiable(*(t for o, t in zip(self.outputs, out)
                                      if t is not None and o.name not in self.differentiable))
        return out

    def named(self, out) -> dict:
        """``{name: tensor or None}`` of a Function's result (``returns`` read back)."""
        return dict(zip((o.name for o in self.outputs), out))

    def save(self, ctx, values: dict) -> None:
        """Save the tensors named in :attr:`saved` (None where ``values`` lacks one)."""
        ctx.save_for_backward(*(values.get(k) for k in self.saved))

    def saved_values(self, ctx) -> dict:
        """``{name: tensor or None}`` of what :meth:`save` saved."""
        return dict(zip(self.saved, ctx.saved_tensors))

    def output_grads(self, grads) -> dict:
        """``{name: gradient}`` of the differentiable outputs, from ``backward``'s arguments."""
        return {o.name: g for o, g in zip(self.outputs, grads) if o.name in self.differentiable}

    def input_grads(self, grads: dict) -> tuple:
        """``backward``'s result: ``grads`` in input order, None for the others and the params."""
        return (*(grads.get(k) for k in self.inputs), None)

    # -- the ops' side ---------------------------------------------------------------------

    def wanted(self, needs, args: dict, params):
        """The fused path's wanted gradients (``_chunks.wanted_grads``) for the inputs' flags
        ``needs``; None on logits (the logits' gradient is always formed)."""
        return wanted_grads(needs, args["bias"], params.grad_enabled) if self.fused else None

    def grads_present(self, want) -> tuple:
        """Which of :attr:`grad_inputs` get a gradient."""
        return tuple(want) if self.fused else (True,) * len(self.grad_inputs)

    def pack(self, params, want, values: dict, args: dict) -> list:
        """An op's fixed output list: every op output, an empty placeholder where absent."""
        return [_present(values[o.name]) if o.present(params, want) else _placeholder(o, args)
                for o in self.op_outputs]

    def unpack(self, params, want, tensors) -> dict:
        """``{name: tensor or None}`` of an op's output list (placeholders are None)."""
        return {o.name: t if o.present(params, want) else None for o, t in zip(self.op_outputs, tensors)}

    def fake(self, params, want, args: dict) -> list:
        """The shapes and dtypes of :meth:`pack`'s list (the op's fake implementation)."""
        return [_fake(o, args, params) if o.present(params, want) else _placeholder(o, args)
                for o in self.op_outputs]

    def pack_grads(self, want, grads: dict, args: dict) -> list:
        """A backward op's fixed list: the gradient of each of :attr:`grad_inputs` (``args``:
        the saved tensors by name), an empty placeholder where not wanted."""
        return [grads[k] if ok else _placeholder(Output(k, LIKE + k), args)
                for k, ok in zip(self.grad_inputs, self.grads_present(want))]

    def fake_grads(self, want, args: dict) -> list:
        return [torch.empty_like(args[k]) if ok else _placeholder(Output(k, LIKE + k), args)
                for k, ok in zip(self.grad_inputs, self.grads_present(want))]

    def unpack_grads(self, want, tensors) -> dict:
        """``{input name: gradient or None}`` of a backward op's list."""
        return {k: t if ok else None for k, t, ok in zip(self.grad_inputs, tensors, self.grads_present(want))}


def _present(t):
    if t is None:
        raise RuntimeError("ranktuner_kernels: an op output declared present was not computed (the schema and "
                           "the Function disagree)")
    return t


def _empty(like, dtype=None):
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _first(args):
    return next(t for t in args.values() if t is not None)


def _float_dtype(args):
    return compute_dtype(_first(args).dtype)


def _placeholder(o: Output, args):
    """The empty stand-in of an absent output: of the dtype it would have."""
    if o.kind.startswith(LIKE):
        like = args[o.kind[len(LIKE):]]
        return _empty(like if like is not None else _first(args))
    return _empty(_first(args), _kind_dtype(o.kind, args))


def _kind_dtype(kind, args):
    """The dtype of an output of ``kind`` (the loss: the compute dtype, as a float statistic)."""
    return kind_dtype(FLOAT if kind == LOSS else kind, _float_dtype(args))


def _fake(o: Output, args, params):
    if o.kind.startswith(LIKE):
        return torch.empty_like(args[o.kind[len(LIKE):]])
    like = _first(args)
    if o.kind == LOSS:
        shape = tuple(params.shape) if params.reduction == "none" else ()
    else:
        shape = (args["target"].shape[0],)
    return like.new_empty(shape, dtype=_kind_dtype(o.kind, args))


# ----------------------------------------------------------------------------- the Functions

_STATS_FOR_BACKWARD = ("lse", "logp_t", "entropy")

TOKEN_LOSS = FunctionSpec(
    "token_loss", inputs=("logits", "target", "scale", "norm"), grad_inputs=("logits",),
    outputs=TERM_OUTPUTS + STAT_OUTPUTS, differentiable=("loss",),
    saved=("logits", "target", *_STATS_FOR_BACKWARD, "w", "beta", "norm"), saved_only=(BETA,))
LINEAR_LOSS = FunctionSpec(
    "linear_loss", inputs=("h", "weight", "bias", "target", "scale", "norm"), grad_inputs=("h", "weight", "bias"),
    outputs=TERM_OUTPUTS + STAT_OUTPUTS, differentiable=("loss",),
    saved=("h", "weight", "bias", "target", *_STATS_FOR_BACKWARD, "w", "beta", "norm",
           *(o.name for o in STORED_GRADS)),
    saved_only=(BETA, *STORED_GRADS))
LOGPROBS = FunctionSpec(
    "logprobs", inputs=("logits", "target"), grad_inputs=("logits",), outputs=STAT_OUTPUTS,
    differentiable=("logp_t", "entropy"), saved=("logits", "target", *_STATS_FOR_BACKWARD))
LINEAR_LOGPROBS = FunctionSpec(
    "linear_logprobs", inputs=("h", "weight", "bias", "target"), grad_inputs=("h", "weight", "bias"),
    outputs=STAT_OUTPUTS, differentiable=("logp_t", "entropy"),
    saved=("h", "weight", "bias", "target", *_STATS_FOR_BACKWARD))


def stats_of(values: dict) -> RowStats:
    """The :class:`RowStats` among ``values`` (a Function's named outputs or saved tensors)."""
    return RowStats(**{k: values[k] for k in STAT_NAMES if values.get(k) is not None})


# ----------------------------------------------------------------------------- the public stats


class PublicStat(NamedTuple):
    """A key of the public stats dict: ``value`` of the row statistics; ``needs``: the optional
    statistic it reads (None: always computed). Ignored positions hold NaN (a float), 0 (an
    int) or False (a bool)."""

    name: str
    needs: Optional[str]
    value: Callable


def _as_is(stat) -> PublicStat:
    return PublicStat(stat.name, stat.name if stat.optional else None, lambda st, n=stat.name: getattr(st, n))


_DERIVED = {"p_t": lambda s: s.logp_t.exp(), "entropy_bits": lambda s: s.entropy / math.log(2),
            "p_max": lambda s: s.p_max, "accuracy": lambda s: s.target_logit >= s.max_logit}
_FIRST = ("p_t", "logp_t", "entropy", "entropy_bits", "p_max", "rank", "lse", "accuracy")
_HIDDEN = ("target_logit", "max_logit")
_BY_NAME = {s.name: s for s in ROW_STATS}
#: The keys of ``return_stats`` / ``token_stats``, in this order: the first ones (four derived
#: from the statistics), then every other statistic as it is but ``target_logit`` and
#: ``max_logit`` (a new statistic appears here by itself).
PUBLIC_STATS = (
    *(PublicStat(k, None, _DERIVED[k]) if k in _DERIVED else _as_is(_BY_NAME[k]) for k in _FIRST),
    *(_as_is(s) for s in ROW_STATS if s.name not in _FIRST + _HIDDEN),
)
#: The keys only a loss has: the weight used, and the z-loss term (with ``z_loss > 0``).
LOSS_STATS = ("weight", "z_loss")


def requested(return_stats, with_terms: bool, z_loss: float = 0.0) -> tuple:
    """``(names, extra)``: the public stats to return for ``return_stats`` (False, True or a
    tuple/list of names; True: every one) and the optional statistics they need. ``with_terms``:
    a loss (``weight``, ``z_loss`` are keys too)."""
    valid = tuple(p.name for p in PUBLIC_STATS) + (LOSS_STATS if with_terms else ())
    if return_stats is False or return_stats is None:
        return (), frozenset()
    if return_stats is True:
        names = tuple(k for k in valid if k != "z_loss" or z_loss > 0)
    elif isinstance(return_stats, (tuple, list)) and all(isinstance(k, str) for k in return_stats):
        unknown = [k for k in return_stats if k not in valid]
        if unknown:
            raise ValueError(f"return_stats: unknown statistics {unknown}; valid names: {list(valid)}")
        if "z_loss" in return_stats and not z_loss > 0:
            raise ValueError("return_stats: 'z_loss' is a statistic of z_loss > 0 only")
        names = tuple(dict.fromkeys(return_stats))
    else:
        raise TypeError(f"return_stats: expected a bool or a tuple/list of statistic names, got {return_stats!r}")
    needs = {p.name: p.needs for p in PUBLIC_STATS}
    return names, frozenset(needs[k] for k in names if needs.get(k) is not None)


def public_stats(names, shape, keep, stats: RowStats, w=None, z_loss=None) -> dict:
    """The public stats dict (``names``, from :func:`requested`), shaped like the target and
    detached: ``weight`` and ``z_loss`` are what the tokens contributed (0 where ignored)."""
    by_name = {p.name: p for p in PUBLIC_STATS}
    out = {}
    for name in names:
        if name in LOSS_STATS:
            out[name] = w if name == "weight" else z_loss
            continue
        x = by_name[name].value(stats)
        if x.dtype == torch.bool:
            x = keep & x
        elif x.is_floating_point():
            x = torch.where(keep, x, math.nan)
        out[name] = x
    return {k: v.detach().reshape(shape) for k, v in out.items()}


def loss_result(call, out: dict):
    """The public result of a loss call (``_call.Call``, the Function's outputs by name): the
    loss, and the stats dict where asked."""
    if not call.stat_names:
        return out["loss"]
    return out["loss"], public_stats(call.stat_names, call.shape, call.keep, stats_of(out), out["w"], out["z_loss"])
