"""Tensor-parallel, FSDP2 and DDP training with the fused RankTuner loss (docs/distributed.md).

    torchrun --nproc-per-node 2 examples/distributed_train.py --parallel tp     # vocabulary-parallel head
    torchrun --nproc-per-node 2 examples/distributed_train.py --parallel fsdp   # FSDP2, uneven batches
    torchrun --nproc-per-node 2 examples/distributed_train.py --parallel ddp    # DDP, uneven batches

One GPU per rank with NCCL where CUDA is available, else CPU processes with gloo (the losses
then run on the pure-torch reference). A tiny causal LM learns synthetic arithmetic
sequences; ``--check`` first compares the distributed loss and every gradient of one step
with the single-process computation on the whole batch.

* ``tp``: ``ColwiseParallel`` shards ``lm_head`` over the vocabulary; every rank holds the
  same tokens. ``rk.linear_cross_entropy`` reads the DTensor weight, merges the row
  statistics across the shards (a few bytes per token) and all-reduces the hidden states'
  gradient, so the replicated layers get the full gradient on every rank.
* ``fsdp``: every block and the head are ``fully_shard``-ed; each rank has its own batch,
  of a different size and padding. The loss runs as the head's FSDP forward method
  (``head_cross_entropy``: the weight is all-gathered for it), and ``dp_group`` makes the
  mean run over the global number of kept tokens, so FSDP's gradient average equals
  single-process training.
* ``ddp``: the same with ``DistributedDataParallel``.

Each rank ends with :func:`exit_cleanly` (barrier, ``destroy_process_group``, ``os._exit(0)``):
returning normally can abort the process at interpreter exit (SIGABRT, "terminate called
without an active exception") after a correct run; its docstring says why.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import ranktuner_kernels as rk
from ranktuner_kernels.distributed import head_cross_entropy


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.ff(x)


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, labels, **loss_kw):
        """``(loss, per-token stats)``: the loss inside ``forward``, as DDP and FSDP2 want it
        (causal shift)."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        h = self.norm(x)
        return head_cross_entropy(self.lm_head, h[:, :-1], labels[:, 1:], return_stats=True, **loss_kw)


def batch(rank: int, step: int, vocab: int, device, uneven: bool):
    """Arithmetic sequences mod ``vocab``; with ``uneven``, rank ``r`` gets ``r + 2`` sequences
    and padding (-100 labels) of its own length."""
    g = torch.Generator().manual_seed(1000 * step + (rank if uneven else 0))
    b, t = (rank + 2, 24) if uneven else (4, 24)
    start = torch.randint(0, vocab, (b, 1), generator=g)
    stride = torch.randint(1, 3, (b, 1), generator=g)
    ids = (start + stride * torch.arange(t)) % vocab
    labels = ids.clone()
    if uneven:
        labels[:, t - 3 * (rank + 1):] = -100
    return ids.to(device), labels.to(device)


def full_grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name.replace("module.", "")] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def check_one_step(args, model, device, world, rank, loss_kw):
    """The distributed step's loss (averaged over the ranks) and gradients against one process
    computing the loss on every rank's batch at once."""
    uneven = args.parallel != "tp"
    ids, labels = batch(rank, 0, args.vocab, device, uneven)
    loss, _ = model(ids, labels, **loss_kw)
    loss.backward()
    got = full_grads(model)
    mean_loss = loss.detach().clone()
    if uneven:  # data parallel: the ranks' losses average to the global mean
        dist.all_reduce(mean_loss)
        mean_loss /= world
    torch.manual_seed(0)
    single = TinyLM(args.vocab).to(device)
    parts = [batch(r, 0, args.vocab, device, uneven) for r in (range(world) if uneven else [0])]
    ref, _ = single(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), weighting=loss_kw["weighting"])
    ref.backward()
    worst = max(float((got[k] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
                for k, p in single.named_parameters())
    if rank == 0:
        print(f"check: loss {mean_loss.item():.6f} vs single-process {ref.item():.6f}; "
              f"largest relative gradient difference {worst:.2e}")
    assert abs(mean_loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) and worst < 1e-3
    model.zero_grad(set_to_none=True)


def exit_cleanly():
    """End this rank: wait for every rank (no collective is left in flight), destroy the process
    group, flush the output, then ``os._exit(0)``, skipping the interpreter's own teardown.

    Why not a plain return: the backend finishes each collective on a worker thread (gloo's
    ``pt_gloo_runloop``), which drops its reference to the collective's tensors only after the
    caller's wait has returned. When the last reference to a tensor that had a Python object goes,
    the worker takes the GIL to release that object; if the interpreter is finalizing by then,
    Python ends the thread inside that C++ destructor and the process aborts with SIGABRT
    ("terminate called without an active exception"). ``destroy_process_group`` does not join the
    worker threads (the group's destructor would, but objects inside torch.distributed, DTensor's
    sharding caches among them, keep the group alive until finalization; measured with FSDP2, DDP
    and ColwiseParallel alike), so no ordering of Python-level teardown rules the race out; leaving
    without finalizing does. Nothing else in this script needs the interpreter's teardown (no
    ``atexit`` handlers, no open files), and the output is flushed first.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", choices=("tp", "fsdp", "ddp"), default="tp")
    parser.add_argument("--weighting", default="ranktuner", help="a name, e.g. ranktuner, sft, dft, talr")
    parser.add_argument("--w0", choices=("one", "p"), default="one",
                        help="RankTuner's w0: 'one' (the paper's setting for general tasks) trains from scratch; "
                             "'p' (its math fine-tuning setting) down-weights every token while p ~ 1/V")
    parser.add_argument("--vocab", type=int, default=257)  # odd: uneven vocabulary shards
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--check", action="store_true", help="compare one step with a single process first")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM(args.vocab).to(device)
    weighting = rk.RankTuner(w0=args.w0) if args.weighting == "ranktuner" else args.weighting
    loss_kw = dict(weighting=weighting)
    if args.parallel == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh(device.type, (world,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})  # lm_head.weight: DTensor Shard(0)
    elif args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model.lm_head)  # its own unit: head_cross_entropy unshards it for the loss
        fully_shard(model)
        loss_kw["dp_group"] = dist.group.WORLD
    else:
        model = nn.parallel.DistributedDataParallel(model)
        loss_kw["dp_group"] = dist.group.WORLD

    if args.check:
        check_one_step(args, model, device, world, rank, loss_kw)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        ids, labels = batch(rank, step + 1, args.vocab, device, uneven=args.parallel != "tp")
        loss, stats = model(ids, labels, **loss_kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            # the objective (averaged over the ranks) and the plain NLL of the kept tokens
            nll = -stats["logp_t"].nan_to_num(0.0)
            shown = torch.stack([loss.detach(), nll.sum(), (labels[:, 1:] != -100).sum().to(nll.dtype)])
            if args.parallel != "tp":
                dist.all_reduce(shown)
                shown[0] /= world
            if rank == 0:
                print(f"step {step:3d}  {args.parallel}  {args.weighting} loss {shown[0].item():.4f}  "
                      f"nll {(shown[1] / shown[2]).item():.3f}")
    exit_cleanly()


if __name__ == "__main__":
    main()
