"""The internals of the vocabulary-parallel and data-parallel losses on ``torch.distributed``
(``docs/distributed.md``).

The rule between the two distributed modules: ``distributed.py`` is the public API, a layer
over the losses (every name in its ``__all__``, documented for users); this module
(``_distributed.py``) is the machinery under the losses, which the call preparation
(``_call``) uses and no user imports: the shard layout, the sharded backend and its merge,
the data-parallel group helpers and DTensor unwrapping. It never imports a loss.

Vocabulary parallel (``process_group=``): rank ``r`` of the group holds the contiguous columns
``[offset_r, offset_r + V_r)`` of the logits (or rows of the LM head), in rank order. Every
row statistic of SPEC merges across shards, so per row block:

1. the owner of each target loads ``z_y`` (the others ``-inf``): all-reduce MAX -> the global
   untransformed target logit (4 bytes per token);
2. each rank runs a partial pass over its shard: the accumulators of
   ``reference.stats.ACCUMULATORS`` (its max ``m_r`` of ``z'``, the non-target mass ``u_r`` and
   entropy sum ``a_r`` rescaled to ``m_r``, the rank count ``r_r`` against the global ``z_y``,
   and those of the optional statistics asked for: ``sum z'``, ``sum e^{2(z' - m_r)}``, the
   ties after the target);
3. all-reduce MAX of ``m_r`` -> ``M`` (4 bytes), then each rank rescales its sums to ``M`` (each
   by its table's rule) and one all-reduce SUM of them (12 bytes, 4 more per optional one);
4. the final formulas of the statistics kernel (``reference.finish_row_stats``) on the merged
   values, identical on every rank; the weighting's torch formula; the gradient pass on the
   local shard with the global ``lse``, ``log p_t``, ``H`` (the one-hot term only on the shard
   that owns the target).

Data parallel (``dp_group=``): ``reduction="mean"`` divides by the group's number of kept
tokens over the group's size, so that averaging over the ranks (what DDP and FSDP do to
gradients) gives the single-process mean; TALR's median runs over the group's sequences.

A layer over the core: the call preparation (``_call``) chooses it once per call, wrapping the
backend in :class:`ShardedBackend` on a vocabulary shard, and handing the weighting the group
hook :func:`batch_gather` (``weightings.Batch.gather``) under ``dp_group``. Nothing below this
module imports it.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import reference
from ._dispatch import Backend
from .reference import compute_dtype


class VocabShard(NamedTuple):
    """This rank's slice ``[offset, offset + v_local)`` of a ``v_global`` vocabulary, over ``group``."""

    group: object
    offset: int
    v_local: int
    v_global: int
    world: int


def _checksum(flat_target: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint of the targets (position-weighted sum), to check that the ranks of a
    vocabulary group hold the same tokens."""
    n = flat_target.numel()
    weights = torch.arange(n, device=flat_target.device, dtype=torch.int64) % 65521 + 1
    return (flat_target.long() * weights).sum()


def vocab_shard(group, v_local: int, flat_target: torch.Tensor, vocab_offset, vocab_size, device) -> VocabShard:
    """The shard layout of ``group``: all-gathered shard sizes (and a check that every rank holds
    the same targets), or the explicit ``vocab_offset`` / ``vocab_size`` (no collective)."""
    world = dist.get_world_size(group)
    if vocab_offset is None and vocab_size is None:
        rank = dist.get_rank(group)
        info = torch.stack([torch.tensor(v_local, device=device), torch.tensor(flat_target.numel(), device=device),
                            _checksum(flat_target).to(device)]).long()
        gathered = [torch.empty_like(info) for _ in range(world)]
        dist.all_gather(gathered, info, group=group)
        rows = torch.stack(gathered).tolist()
        if any(row[1:] != rows[0][1:] for row in rows):
            raise ValueError(
                "process_group: the ranks of the vocabulary-parallel group hold different targets; every rank of "
                "the group must see the same tokens (its own vocabulary shard of them). A weight sharded by FSDP "
                "(fully_shard) read outside the module's forward is a DTensor sharded over the data-parallel "
                "ranks, not a vocabulary shard: compute the loss inside the forward, or with "
                "ranktuner_kernels.distributed.head_cross_entropy (docs/distributed.md)")
        sizes = [row[0] for row in rows]
        return VocabShard(group, sum(sizes[:rank]), v_local, sum(sizes), world)
    if vocab_offset is None or vocab_size is None:
        raise ValueError("vocab_offset / vocab_size: give both (the shard's first column and the whole "
                         "vocabulary's size), or neither (then they are all-gathered from the group)")
    for name, v in (("vocab_offset", vocab_offset), ("vocab_size", vocab_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if vocab_offset + v_local > vocab_size:
        raise ValueError(f"vocab_offset: the shard [{vocab_offset}, {vocab_offset + v_local}) does not fit in "
                         f"vocab_size={vocab_size}")
    return VocabShard(group, vocab_offset, v_local, vocab_size, world)


def local_ignore_index(ignore_index: int) -> int:
    """The ignore value of the shard-local targets: a negative ``ignore_index`` itself, else -100
    (a non-negative one can equal an owned target's local column index ``y - offset``)."""
    return ignore_index if ignore_index < 0 else -100


def local_target(flat_target: torch.Tensor, shard: VocabShard, ignore_index: int) -> torch.Tensor:
    """Shard-local target indices: ``y - offset`` where this shard owns ``y``; where another
    shard does, a sentinel that keeps the row but names no column and tells on which side the
    target lies (``is_top1``'s ties count after it): negative (-1, or -2) where the target
    precedes the shard's columns, ``v_local`` where it follows them; :func:`local_ignore_index`
    where the target is ``ignore_index`` (the call's passes then skip that value)."""
    keep = flat_target != ignore_index
    loc = flat_target - shard.offset
    owned = keep & (loc >= 0) & (loc < shard.v_local)
    local_ignore = local_ignore_index(ignore_index)
    before = -1 if local_ignore != -1 else -2
    other = torch.where(loc < 0, before, shard.v_local)
    return torch.where(owned, loc, torch.where(keep, other, local_ignore)).contiguous()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


class ShardedBackend:
    """A :class:`~._dispatch.Backend` on one vocabulary shard, around a whole-vocabulary one
    (``local``): the local backend's passes, with the row statistics merged across the shard's
    group (module docstring), EAFT's top-K gathered, and the fused path's input gradient summed
    over the group. Chosen once per call, by the call preparation."""

    sharded = True
    range_check = "before"  # checked once against the whole vocabulary, before any pass

    def __init__(self, local: Backend, shard: VocabShard):
        self.local, self.shard = local, shard

    @property
    def name(self) -> str:
        return self.local.name

    def vocab(self, v_local: int) -> int:
        return self.shard.v_global

    def row_stats(self, logits, target, params, weighting=None, scale=None):
        """The merged ``RowStats`` of ``[B, T, V_r]`` shard logits (``target``: shard-local,
        :func:`local_target`), identical on every rank; the weighting's formula then runs in
        torch (None)."""
        group = self.shard.group
        keep = target != params.ignore_index
        zy = _all_reduce(reference.target_logit(logits, target, params.ignore_index), dist.ReduceOp.MAX, group)
        acc = self.local.partial_row_stats(logits, target, zy, params)
        big_m = _all_reduce(acc["m"].to(compute_dtype(logits.dtype), copy=True), dist.ReduceOp.MAX, group)
        names, packet = merge_packet(acc, big_m)
        merged = dict(zip(names, _all_reduce(packet, dist.ReduceOp.SUM, group).unbind(1)), m=big_m)
        return reference.finish_row_stats(merged, zy, keep, params.transform, self.shard.v_global), None

    def partial_row_stats(self, logits, target, target_logit, params):
        return self.local.partial_row_stats(logits, target, target_logit, params)

    def row_grad(self, logits, target, stats, coefs, params, out):
        """The local backend's gradient pass on the shard, with the merged statistics."""
        return self.local.row_grad(logits, target, stats, coefs, params, out)

    def topk_entropy(self, logits, target, k, params):
        """EAFT's top-K entropy over the whole vocabulary: each shard's ``min(k, V)`` largest
        ``z'`` all-gathered (``k * 4`` bytes per token and rank), then the top ``k`` of them."""
        shard = self.shard
        k_all = min(k, shard.v_global)
        top = reference.top_values(logits, target, k_all, params.ignore_index, params.transform)
        if top.shape[1] < k_all:
            top = torch.cat([top, top.new_full((top.shape[0], k_all - top.shape[1]), float("-inf"))], 1)
        gathered = [torch.empty_like(top) for _ in range(shard.world)]
        dist.all_gather(gathered, top.contiguous(), group=shard.group)
        merged = torch.cat(gathered, 1).topk(k_all, dim=1, sorted=False).values
        keep = target != params.ignore_index
        return torch.where(keep, reference.entropy_of_values(merged), 0)

    def reduce_input_grad(self, dh, params, like, fresh: bool):
        """Summed over the vocabulary group where asked (in the float32 it was accumulated in
        for 16-bit inputs), then in ``like``'s dtype; a saved ``dh`` (not ``fresh``) is copied."""
        if dh is None:
            return None
        if params.reduce_input_grad:
            dh = dh if fresh else dh.clone()
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=self.shard.group)
        return dh.to(like.dtype)

    def dh_f32(self, params) -> bool:
        return params.reduce_input_grad

    def row_lse_entropy(self, logits, rows):
        raise NotImplementedError("THR's statistics pass does not run on a vocabulary shard")

    def thr_pair_sums(self, *args, **kwargs):
        raise NotImplementedError("THR's pair sums do not run on a vocabulary shard")


def merge_packet(acc: dict, big_m) -> tuple:
    """``(names, [N, len(names)])``: one shard's accumulators but the max, each rescaled from the
    shard's max ``acc["m"]`` to the group's ``big_m`` (``reference.rescale_accumulators``), as
    the columns of one tensor (the all-reduce SUM of these is the merged row)."""
    scaled = reference.rescale_accumulators(acc, big_m)
    names = tuple(scaled)
    return names, torch.stack([scaled[k] for k in names], 1)


# -- data parallel ---------------------------------------------------------------------------


def group_sum(count: torch.Tensor, group) -> torch.Tensor:
    """``count`` summed over ``group`` (one all-reduce)."""
    return _all_reduce(count.reshape(1).clone(), dist.ReduceOp.SUM, group).reshape(())


def world_size(group) -> int:
    return dist.get_world_size(group)


def batch_gather(group):
    """The group hook of batch-level statistics (``weightings.Batch.gather``): a function that
    concatenates each rank's 1-D tensor (of any length) over ``group``, in rank order."""

    def gather(values: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size(group)
        sizes = [torch.empty(1, dtype=torch.int64, device=values.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device), group=group)
        counts = torch.cat(sizes).tolist()
        padded = torch.cat([values, values.new_zeros(max(counts) - values.numel())])
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([g[:c] for g, c in zip(gathered, counts)])

    return gather


# -- DTensor ---------------------------------------------------------------------------------


def _dtensor_type():
    """torch's DTensor class, or None when ``torch.distributed.tensor`` was never imported (then
    no DTensor exists, and the fast path imports nothing)."""
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def replicated(t, name: str):
    """A DTensor argument as a plain tensor holding the whole value (differentiable)."""
    if not is_dtensor(t):
        return t
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{name}: a DTensor with a Partial placement {t.placements}; reduce it first")
    return t.full_tensor()


def vocab_local(t, dim: int, name: str, process_group):
    """``(local tensor, group)`` of a DTensor sharded along the vocabulary dimension ``dim`` over
    one mesh dimension (ColwiseParallel on the head: the weight ``Shard(0)``, the logits
    ``Shard(-1)``), other mesh dimensions replicated; ``(t, process_group)`` for a plain tensor."""
    if not is_dtensor(t):
        return t, process_group
    placements, mesh = t.placements, t.device_mesh
    dim = dim % t.dim()
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not sharded:
        return t.to_local(), process_group
    if process_group is not None:
        raise ValueError(f"{name}: a vocabulary-sharded DTensor names its own group; do not also pass process_group")
    p = placements[sharded[0]]
    if len(sharded) > 1 or type(p).__name__ != "Shard" or p.dim % t.dim() != dim:
        raise ValueError(
            f"{name}: a DTensor with placements {placements} on mesh {mesh}: expected the vocabulary dimension "
            f"(dim {dim}) sharded over one mesh dimension and the others replicated (ColwiseParallel on the LM "
            f"head). A parameter sharded by FSDP (fully_shard) must be unsharded before the loss reads it: "
            f"compute the loss inside the module's forward, or with "
            f"ranktuner_kernels.distributed.head_cross_entropy (docs/distributed.md)")
    return t.to_local(), mesh.get_group(sharded[0])
