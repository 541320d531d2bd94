"""The public API for training with the losses on ``torch.distributed`` (``docs/distributed.md``).

The rule between the two distributed modules: this one is the public API, a layer over the
losses (every public name is in ``__all__`` and documented for users); ``_distributed.py`` is
the machinery under the losses (shard layout, the sharded backend, group helpers), used by the
call preparation, never imported by users, and never importing a loss.

The losses themselves take the groups: ``rk.cross_entropy(..., process_group=tp_group)`` on a
vocabulary shard of the logits, ``rk.linear_cross_entropy(..., process_group=tp_group)`` on a
shard of the LM head (or a ``ColwiseParallel`` DTensor head, which names its group), and
``dp_group=`` on either for the data-parallel mean. This module adds:

* :func:`head_cross_entropy`: the fused loss of an LM head module, correct when the head is
  ``fully_shard``-ed on its own (FSDP2) or ``ColwiseParallel`` (DTensor);
* :func:`global_num_items`: the kept-token count over a group, for the
  ``num_items_in_batch`` pattern (gradient accumulation across data-parallel ranks).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.distributed as dist

from . import _inputs
from .linear_loss import linear_cross_entropy

__all__ = ["head_cross_entropy", "global_num_items", "is_fsdp_module"]


def head_cross_entropy(head: torch.nn.Module, input: torch.Tensor, target: torch.Tensor, **kwargs):
    """``rk.linear_cross_entropy(input, head.weight, target, linear_bias=head.bias, **kwargs)``,
    run so that the head's parameters are whole when the loss reads them.

    * ``head`` ``fully_shard``-ed as its own FSDP2 unit: outside ``head.forward`` its weight
      is a DTensor sharded over the data-parallel ranks. The loss runs as one of the head's
      FSDP forward methods (``register_fsdp_forward_method``, once per module): FSDP
      all-gathers the weight before it, reshards after it, all-gathers again for backward and
      reduce-scatters the weight's gradient, as for the head's own forward.
    * ``head`` parallelized with ``ColwiseParallel``: its weight is a vocabulary-sharded
      DTensor; the loss runs vocabulary-parallel over the head's mesh group.
    * otherwise: the plain call.

    ``kwargs``: any keyword argument of ``rk.linear_cross_entropy`` (``weighting=``,
    ``dp_group=``, ``num_items_in_batch=``, ...).
    """
    return _head_method(head)(input, target, **kwargs)


def is_fsdp_module(module) -> bool:
    """Whether ``module`` is ``fully_shard``-ed (FSDP2); never imports FSDP itself."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


_HEAD_METHOD = "_ranktuner_head_cross_entropy"


def _head_method(head):
    """``head``'s fused-loss method: a plain function of the head's parameters, registered as
    one of its FSDP2 forward methods where ``head`` is ``fully_shard``-ed (so FSDP all-gathers
    the weight before it, reshards after it and reduce-scatters the weight's gradient)."""
    if not is_fsdp_module(head):
        return lambda input, target, **kw: linear_cross_entropy(input, head.weight, target,
                                                                linear_bias=getattr(head, "bias", None), **kw)
    if _HEAD_METHOD not in head.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        def method(self, input, target, **kw):
            return linear_cross_entropy(input, self.weight, target, linear_bias=getattr(self, "bias", None), **kw)

        object.__setattr__(head, _HEAD_METHOD, types.MethodType(method, head))
        register_fsdp_forward_method(head, _HEAD_METHOD)
    return getattr(head, _HEAD_METHOD)


def global_num_items(target: torch.Tensor, ignore_index: int = -100, group=None) -> torch.Tensor:
    """The number of targets that are not ``ignore_index``, summed over ``group`` (default: the
    world), as a float32 tensor on ``target``'s device (one all-reduce).

    The ``num_items_in_batch`` pattern for data parallelism (what ``dp_group=`` does for you):
    sum this over the micro-batches of one optimizer step, pass it as ``num_items_in_batch``
    and multiply the loss by the group's size, since DDP and FSDP average the gradients over
    the ranks: ``loss = rk.cross_entropy(..., num_items_in_batch=n) * world_size``.
    """
    ignore_index = _inputs.check_ignore_index(ignore_index)
    n = (target != ignore_index).sum().to(torch.float32).reshape(1)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return n.reshape(())
