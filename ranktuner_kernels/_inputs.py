"""Argument checks shared by the public functions: bad input raises, naming the argument."""

from __future__ import annotations

import functools
import inspect
import numbers

import torch

from .weightings import WEIGHTINGS, Weighting

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


#: arguments that, set (not None or False), keep a call out of ``torch.compile``'s graph:
#: collectives, and a backward that writes over the logits, run eagerly
EAGER_ARGS = ("process_group", "dp_group", "inplace_backward")


def _keyword_only_weighting(fn):
    """For an ``fn`` taking ``weighting=`` (keyword-only): ``(check, required)``, ``check(args)``
    raising a TypeError that says so when a weighting (a registered name or a config) is among
    the positional arguments past the ``required`` ones, where Python would report a bare
    positional-count error or the value would land in another parameter (``weight``,
    ``reduction``, ...); ``(None, 0)`` for a function without ``weighting``."""
    params = inspect.signature(fn).parameters
    if "weighting" not in params:
        return None, 0
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    required = sum(params[n].default is inspect.Parameter.empty for n in positional)

    def check(args):
        for i in range(required, len(args)):
            v = args[i]
            if isinstance(v, Weighting) or (isinstance(v, str) and v in WEIGHTINGS):
                where = f"as {positional[i]!r}" if i < len(positional) else "past the positional parameters"
                raise TypeError(f"{fn.__name__}: weighting is keyword-only: pass weighting={v!r} (it was given as "
                                f"positional argument {i + 1}, {where}; the positional parameters are "
                                f"{', '.join(positional)}, as in torch)")

    return check, required


def _eager_under_compile(fn, must_be_eager):
    """``fn``, run eagerly inside ``torch.compile``d code (a graph break at the call, as
    ``torch.compiler.disable``) when ``must_be_eager(kwargs)``; an eager call is a plain call and
    never imports ``torch._dynamo`` (several seconds). Positional arguments past ``fn``'s required
    ones are checked for a ``weighting`` given positionally (:func:`_keyword_only_weighting`)."""
    check, required = _keyword_only_weighting(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if check is not None and len(args) > required:
            check(args)
        if torch.compiler.is_compiling() and must_be_eager(kwargs):
            return torch.compiler.disable(fn)(*args, **kwargs)  # dynamo is imported by now
        return fn(*args, **kwargs)

    return wrapper


def eager(fn):
    """Run ``fn`` eagerly inside ``torch.compile``d code (:func:`_eager_under_compile`)."""
    return _eager_under_compile(fn, lambda kwargs: True)


def compilable(fn):
    """Let ``torch.compile`` trace ``fn`` (its autograd Function becomes a custom op, ``_ops``),
    except for calls with a process group or ``inplace_backward=True`` (:data:`EAGER_ARGS`,
    keyword arguments), which run eagerly as with :func:`eager`."""
    return _eager_under_compile(fn, lambda kwargs: any(kwargs.get(k) not in (None, False) for k in EAGER_ARGS))


def check_float(name: str, t, dims=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")


def check_same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_ignore_index(ignore_index) -> int:
    """``None`` means -100 (``F.linear_cross_entropy``'s documented default)."""
    if ignore_index is None:
        return -100
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_target(target, lead_shape: tuple, like: torch.Tensor, like_name: str):
    """Shape, dtype and device checks; returns the flat int64 targets ``[N]`` (the value range
    is checked by :func:`check_range`)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: must hold integer class indices (class probabilities are not supported), "
                        f"got dtype {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        hint = ""
        if like.dim() >= 3 and tuple(target.shape) == (like.shape[0], *like.shape[2:]):
            hint = (f"; {like_name} looks class-first ([N, C, d1, ...] as F.cross_entropy takes it): here the class "
                    f"dimension is last, pass {like_name}.movedim(1, -1)")
        raise ValueError(f"target: shape {tuple(target.shape)} does not match {like_name}'s leading shape "
                         f"{tuple(lead_shape)}{hint}")
    check_same_device("target", target, like, like_name)
    return target.reshape(-1).long().contiguous()


def check_range(flat: torch.Tensor, v_size: int, ignore_index: int, num_items=None) -> None:
    """Targets must lie in ``[0, V)`` or equal ``ignore_index``, and a tensor
    ``num_items_in_batch`` must not be negative. Reads one flag pair back from the device (a
    synchronisation): the Triton paths call it after queueing their kernels, which clamp the
    index they load, so the check waits for work that was queued anyway."""
    if torch.compiler.is_compiling():
        return  # a read-back cannot be traced: the custom ops (_ops) check at run time
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= v_size))
    flags = bad.any()
    if isinstance(num_items, torch.Tensor):
        flags = torch.stack([flags, (num_items.detach().reshape(()).to(flat.device) < 0)])
    flags = flags.reshape(-1).tolist()
    if flags[0]:
        value = int(flat[bad][0])
        raise ValueError(f"target: value {value} is outside [0, {v_size}) and is not ignore_index ({ignore_index})")
    if len(flags) > 1 and flags[1]:
        raise ValueError(f"num_items_in_batch: must be >= 0, got {float(num_items)}")


def caller_scale(token_weight, sequence_weight, shape: tuple, like: torch.Tensor):
    """Product of the caller's per-token and per-sequence weights as ``[N]`` (or None).

    ``token_weight``: the target's shape; ``sequence_weight``: ``[B]`` for ``[B, T]`` targets.
    Both are constants (no gradient flows to them).
    """
    scale = None
    if token_weight is not None:
        check_float("token_weight", token_weight)
        if tuple(token_weight.shape) != tuple(shape):
            raise ValueError(f"token_weight: shape {tuple(token_weight.shape)} must equal the target's {tuple(shape)}")
        check_same_device("token_weight", token_weight, like, "input")
        scale = token_weight.detach().reshape(-1)
    if sequence_weight is not None:
        check_float("sequence_weight", sequence_weight)
        if len(shape) != 2:
            raise ValueError("sequence_weight: needs [B, T] targets to know which tokens form a sequence")
        if tuple(sequence_weight.shape) != (shape[0],):
            raise ValueError(f"sequence_weight: expected shape ({shape[0]},), got {tuple(sequence_weight.shape)}")
        check_same_device("sequence_weight", sequence_weight, like, "input")
        seq = sequence_weight.detach()[:, None].expand(shape).reshape(-1)
        scale = seq if scale is None else scale * seq
    return scale


def class_weight(weight, v_size: int, flat_target: torch.Tensor, ignore_index: int, like: torch.Tensor):
    """``F.cross_entropy``'s ``weight``: ``[V]`` per-class rescaling -> the per-token factor
    ``weight[y_t]`` (0 where ignored), or None."""
    if weight is None:
        return None
    if isinstance(weight, (str, Weighting)):
        raise TypeError(f"weight: got the weighting {weight!r}; weight is F.cross_entropy's per-class [V] tensor, "
                        f"and a weighting is keyword-only: weighting={weight!r}")
    check_float("weight", weight, dims=(1,))
    if weight.shape[0] != v_size:
        raise ValueError(f"weight: expected one weight per class, shape ({v_size},), got {tuple(weight.shape)}")
    check_same_device("weight", weight, like, "input")
    keep = flat_target != ignore_index
    return torch.where(keep, weight.detach()[torch.where(keep, flat_target, 0).clamp(0, v_size - 1)], 0)


def check_num_items(num_items_in_batch):
    """``num_items_in_batch``: None, a number >= 0 or a one-element tensor (whose sign is
    checked with the targets' range, :func:`check_range`, to read back once)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch: expected a real dtype, got {num_items_in_batch.dtype}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
        if num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch: must be >= 0, got {num_items_in_batch}")
        return num_items_in_batch
    raise TypeError(f"num_items_in_batch: expected a number or a tensor, got {type(num_items_in_batch).__name__}")


def divisor(count, num_items_in_batch, dtype, device):
    """The divisor of a mean, the library's one rule: ``num_items_in_batch`` if given (checked
    by :func:`check_num_items`), else ``count`` (a tensor); 0 divides by 1, so a batch with
    nothing to count contributes 0 (and a zero gradient); NaN gives NaN."""
    if num_items_in_batch is None:
        n = count.to(dtype)
    elif isinstance(num_items_in_batch, torch.Tensor):
        n = num_items_in_batch.detach().to(device=device, dtype=dtype).reshape(())
    else:
        n = torch.tensor(float(num_items_in_batch), dtype=dtype, device=device)
    return torch.where(n == 0, torch.ones_like(n), n)


def overlaps(t: torch.Tensor, max_enumerated: int = 1 << 22) -> bool:
    """Whether two elements of ``t`` share memory (an expanded or ``as_strided`` view).

    Exact for every view a slice, a transpose, a ``movedim`` or a reshape makes: with the
    dimensions sorted by stride, a stride beyond the span of the smaller ones adds disjoint
    translated copies. Where a stride falls inside that span (interleaved strides), the offsets
    of the dimensions so far are enumerated and checked for repeats, up to ``max_enumerated``
    of them; beyond that the view counts as overlapping (refused, never silently wrong)."""
    if t.numel() <= 1:
        return False
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    span = 0  # the largest offset the dimensions so far reach
    offsets = None  # their offsets, enumerated once a stride fell inside the span
    for i, (stride, size) in enumerate(dims):
        if stride == 0:
            return True
        if offsets is None and stride > span:
            span += stride * (size - 1)
            continue
        if offsets is None:
            offsets = torch.zeros(1, dtype=torch.int64)
            for st, n in dims[:i]:
                offsets = (offsets[:, None] + st * torch.arange(n)).reshape(-1)
        if offsets.numel() * size > max_enumerated:
            return True
        offsets = (offsets[:, None] + stride * torch.arange(size)).reshape(-1)
        if torch.unique(offsets).numel() != offsets.numel():
            return True
        span = int(offsets.max())
    return False
