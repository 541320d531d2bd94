"""One call preparation for every public entry point (``cross_entropy``,
``linear_cross_entropy``, ``token_stats``, ``logprobs``, ``linear_logprobs``, the modules and
the integration through them): check, normalise and name every argument, choose the backend
once (a sharded one on a vocabulary shard), and build the one :class:`LossParams`. An
argument means the same thing, and fails with the same ``ValueError``/``TypeError`` naming it,
on every path.

    call = prepare("cross_entropy", input, target, weighting=..., ...)
    out = checked(call, lambda: TokenLossFunction.apply(call.input, call.target, ...))
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _distributed, _inputs, _schema
from ._chunks import autocast_inputs, chunk_rows, resolve_policy
from ._dispatch import get_backend
from ._params import LossParams, check_options
from .reference import compute_dtype
from .weightings import resolve

#: The entry points on hidden states and an LM head (the rest take logits).
FUSED = ("linear_cross_entropy", "linear_logprobs")
#: The entry points with a loss (their stats dict has ``weight`` and ``z_loss`` too).
LOSSES = ("cross_entropy", "linear_cross_entropy")


class Call(NamedTuple):
    """A prepared call.

    ``input``: ``[B, T, V]`` logits with unit last stride, or ``[N, D]`` hidden states on the
    fused path (then ``linear_weight [V, D]`` and ``linear_bias [V]`` or None, after autocast);
    ``target``: ``[N]`` int64 (shard-local on a vocabulary shard); ``keep``: ``[N]`` bool, the
    tokens that are not ``ignore_index``; ``scale``: ``[N]`` caller's factor (token, sequence
    and class weights) or None; ``norm``: the divisor of ``"mean"`` or None; ``v_size``: the
    whole vocabulary; ``range_check``: when :func:`checked` checks the targets' range
    (``"before"``, ``"after"`` the computation, or ``"done"``); ``stat_names``: the keys of the
    stats dict to return (``_schema.requested``; empty: none)."""

    input: torch.Tensor
    linear_weight: Optional[torch.Tensor]
    linear_bias: Optional[torch.Tensor]
    target: torch.Tensor
    keep: torch.Tensor
    scale: Optional[torch.Tensor]
    norm: Optional[torch.Tensor]
    params: LossParams
    v_size: int
    num_items: object
    range_check: str
    stat_names: tuple = ()

    @property
    def shape(self) -> tuple:
        return self.params.shape


def prepare_logits(input) -> torch.Tensor:
    """``[V]``, ``[N, V]``, ``[B, T, V]`` or ``[B, d1, ..., V]`` -> a ``[B, T, V]`` view with unit
    last stride (copies only when the last stride is not 1, or to flatten ``d1, ...``); any
    of the leading sizes may be 0."""
    if isinstance(input, torch.Tensor) and input.dim() == 0:
        raise ValueError("input: expected logits with the class dimension last, got a 0-D tensor")
    _inputs.check_float("input", input)
    if input.shape[-1] == 0:
        raise ValueError("input: the vocabulary (last) dimension is empty")
    if input.dim() < 3:
        logits = input.reshape((1,) * (3 - input.dim()) + tuple(input.shape))
    else:
        logits = input.reshape(input.shape[0], math.prod(input.shape[1:-1]), input.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def prepare_hidden(input, linear_weight, linear_bias):
    """``(h [N, D], W [V, D], b [V] or None)`` of ``[..., D]`` hidden states and the head, on
    one device and (after autocast, as ``F.linear``) one dtype."""
    _inputs.check_float("input", input)
    if input.dim() == 0:
        raise ValueError("input: expected [..., D] hidden states, got a 0-D tensor")
    _inputs.check_float("linear_weight", linear_weight, dims=(2,))
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight: shape {tuple(linear_weight.shape)} needs [V, {input.shape[-1]}] to match input")
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight: the vocabulary (first) dimension is empty")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None:
            _inputs.check_float(name, t)
            _inputs.check_same_device(name, t, input, "input")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise ValueError(f"linear_bias: expected shape ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}")
    input, linear_weight, linear_bias = autocast_inputs(input, linear_weight, linear_bias)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from input's {input.dtype}")
    return input, linear_weight, linear_bias


def normaliser(reduction, keep, num_items_in_batch, dtype, class_weight, dp_group):
    """The divisor of ``"mean"`` (None otherwise): ``num_items_in_batch`` if given, else the
    number of kept tokens (``F.cross_entropy``'s sum of ``weight[y_t]`` with a class
    ``weight``), by :func:`_inputs.divisor`'s rule (0 divides by 1, NaN gives NaN). With a
    data-parallel ``dp_group``: the group's count (``num_items_in_batch`` is taken as that
    global count) over the group's size, so that the ranks' average is the single-process mean."""
    if reduction != "mean":
        return None
    count = None
    if num_items_in_batch is None:
        count = (keep.sum() if class_weight is None else class_weight.sum()).to(dtype)
        if dp_group is not None:
            count = _distributed.group_sum(count, dp_group)
    n = _inputs.divisor(count, num_items_in_batch, dtype, keep.device)
    return n if dp_group is None else n / _distributed.world_size(dp_group)


def _shard(process_group, v_local, flat_target, vocab_offset, vocab_size, device):
    """The vocabulary shard of a vocabulary-parallel call, else None."""
    if process_group is None:
        if vocab_offset is not None or vocab_size is not None:
            raise ValueError("vocab_offset / vocab_size: only with process_group (a vocabulary shard)")
        return None
    return _distributed.vocab_shard(process_group, v_local, flat_target, vocab_offset, vocab_size, device)


def prepare(
    entry: str,
    input,
    target,
    *,
    linear_weight=None,
    linear_bias=None,
    weighting="sft",
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=None,
    temperature=1.0,
    z_loss=0.0,
    num_items_in_batch=None,
    token_weight=None,
    sequence_weight=None,
    inplace_backward=False,
    chunk_size=None,
    acc_policy="auto",
    impl="auto",
    process_group=None,
    vocab_offset=None,
    vocab_size=None,
    dp_group=None,
    reduce_input_grad=True,
    return_stats=False,
) -> Call:
    """Every argument of the entry point ``entry`` (one of the public function names) checked
    and normalised, the backend chosen, the parameters built (see :class:`Call`). The
    arguments mean what ``rk.cross_entropy`` / ``rk.linear_cross_entropy`` document."""
    fused = entry in FUSED
    if fused:
        linear_weight, process_group = _distributed.vocab_local(linear_weight, 0, "linear_weight", process_group)
        if _distributed.is_dtensor(linear_bias):
            linear_bias, _ = _distributed.vocab_local(linear_bias, 0, "linear_bias", None)
        input = _distributed.replicated(input, "input")
    else:
        input, process_group = _distributed.vocab_local(input, -1, "input", process_group)
    target = _distributed.replicated(target, "target")
    weighting = resolve(weighting)
    ignore_index = _inputs.check_ignore_index(ignore_index)
    tr, label_smoothing, z_loss = check_options(reduction, softcap, temperature, label_smoothing, z_loss)
    stat_names, asked_stats = _schema.requested(return_stats, entry in LOSSES, z_loss)
    num_items = _inputs.check_num_items(num_items_in_batch)
    if fused:
        input, linear_weight, linear_bias = prepare_hidden(input, linear_weight, linear_bias)
        data, v_local = input.reshape(-1, input.shape[-1]), linear_weight.shape[0]
    else:
        data = prepare_logits(input)
        v_local = input.shape[-1]
    if input.device.type == "meta":
        raise ValueError("input: a meta tensor holds no values to compute a loss from")
    shape = tuple(input.shape[:-1])
    flat_target = _inputs.check_target(target, shape, input, "input")
    shard = _shard(process_group, v_local, flat_target, vocab_offset, vocab_size, input.device)
    v_size = v_local if shard is None else shard.v_global
    scale = _inputs.caller_scale(token_weight, sequence_weight, shape, input)
    cw = _inputs.class_weight(weight, v_size, flat_target, ignore_index, input)
    if cw is not None:
        if label_smoothing > 0:
            raise ValueError("weight: a class weight with label_smoothing is not supported")
        scale = cw if scale is None else scale * cw
    if inplace_backward and _inputs.overlaps(data):
        raise ValueError("input: inplace_backward=True needs logits whose elements do not share memory "
                         "(this one is expanded or overlapping)")
    backend = get_backend(impl, input)
    if shard is not None:
        backend = _distributed.ShardedBackend(backend, shard)
    keep = flat_target != ignore_index
    norm = normaliser(reduction, keep, num_items, compute_dtype(input.dtype), cw, dp_group)
    rows, policy = None, "accurate"
    if fused:
        policy = resolve_policy(acc_policy, linear_weight.dtype)
        f32_cast = (entry == "linear_cross_entropy" and policy == "accurate" and torch.is_grad_enabled()
                    and linear_weight.requires_grad)
        # every rank of a vocabulary group must cut the same chunks (one merge per chunk)
        v_chunk = v_size if shard is None else -(-v_size // shard.world)
        rows = chunk_rows(data.shape[0], v_chunk, data.shape[1], input.element_size(), chunk_size,
                          input.device.type, f32_cast)
    if shard is not None or fused:  # checked once: before 6NDV FLOPs, or against the whole vocabulary
        _inputs.check_range(flat_target, v_size, ignore_index, num_items)
        range_check = "done"
    else:
        range_check = backend.range_check
    if shard is not None:
        flat_target = _distributed.local_target(flat_target, shard, ignore_index)
        ignore_index = _distributed.local_ignore_index(ignore_index)  # what the shard's passes skip
    params = LossParams(weighting, backend, shape, ignore_index, reduction, tr, label_smoothing, z_loss,
                        inplace_backward=bool(inplace_backward), rows=rows, acc_policy=policy,
                        grad_enabled=torch.is_grad_enabled(),
                        batch_gather=None if dp_group is None else _distributed.batch_gather(dp_group),
                        reduce_input_grad=bool(reduce_input_grad), asked_stats=asked_stats)
    return Call(data, linear_weight, linear_bias, flat_target, keep, scale, norm, params, v_size, num_items,
                range_check, stat_names)


def checked(call: Call, compute):
    """``compute()`` with the targets' range checked: before it on the reference (torch's
    indexing would fail first), after it on the Triton path, whose kernels clamp the index
    they load: the check's read-back then waits on work that was queued anyway."""
    args = (call.target, call.v_size, call.params.ignore_index, call.num_items)
    if call.range_check == "before":
        _inputs.check_range(*args)
    out = compute()
    if call.range_check == "after":
        _inputs.check_range(*args)
    return out


def check_options_of(fn, options: dict, fixed=()) -> None:
    """A module's fixed options: each must be a keyword of ``fn`` (TypeError naming it)."""
    import inspect

    known = set(inspect.signature(fn).parameters) - set(fixed)
    for name in options:
        if name not in known:
            raise TypeError(f"{name}: not an option of {fn.__name__} (expected one of {sorted(known)})")
