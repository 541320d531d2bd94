"""The cases of ``test_distributed.py``, run inside spawned gloo process groups on 127.0.0.1.

One spawn per suite: every rank runs every case of its suite in order (the collectives of a
case pair up across ranks), records a failure instead of raising where it can, and writes
its report to ``<out>/rank<r>.json``. Each case compares the sharded (or data-parallel) loss,
statistics and gradients with the single-process call on the whole batch: the rank exactly,
the statistics within float32 round-off, loss and gradients by their error against the
float64 reference of the same inputs, relative to the error the single-process call makes in
that dtype (``tests/test_kernels.py``'s measure).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ranktuner_kernels as rk
from error_model import assert_dicts_no_less_accurate, assert_no_less_accurate
from helpers import float64_copy, make_batch, upstream_like

V = 37
SIZES = {2: [21, 16], 4: [13, 5, 11, 8]}  # uneven; 16 and 5 are below EAFT's k = 20
NAMES = sorted(rk.weightings.WEIGHTINGS)
REDUCTIONS = ("mean", "sum", "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(suite: str, world: int, out_dir: str) -> list:
    """Spawn ``world`` ranks running ``suite``; returns the ranks' reports."""
    port = free_port()
    mp.start_processes(_entry, args=(suite, world, port, out_dir), nprocs=world, start_method="spawn", join=True)
    reports = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    return reports


def run_suite(suite: str, world: int, out_dir: str, cases: int | None = None) -> None:
    """:func:`launch`, then assert that every rank ran the suite's ``cases`` (all the same
    number, if None) and that none failed; prints the timing."""
    reports = launch(suite, world, out_dir)
    failures = [f"rank {r['rank']}: {f}" for r in reports for f in r["failures"]]
    expected = cases or reports[0]["cases"]
    assert all(r["cases"] == expected and r["cases"] > 0 for r in reports), reports
    assert not failures, "\n".join(failures)
    print(f"{suite}: {reports[0]['cases']} cases, {max(r['seconds'] for r in reports):.1f}s; slowest: "
          f"{reports[0]['slowest']}")


def _entry(rank, suite, world, port, out_dir):
    # CPU tensors over gloo: the kernels run under the interpreter, on a GPU machine too (set
    # before the first loss imports the kernels; importing the package does not)
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # for libraries that read the group's address
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    report = {"rank": rank, "cases": 0, "failures": [], "seconds": 0.0, "slowest": []}
    t0 = time.perf_counter()
    times = []
    try:
        for name, fn in SUITES[suite](world):
            t = time.perf_counter()
            try:
                fn()
            except AssertionError as e:  # a mismatch: the collectives still pair up
                report["failures"].append(f"{name}: {e}\n{traceback.format_exc(limit=3)}")
            times.append((time.perf_counter() - t, name))
            report["cases"] += 1
    except Exception:  # anything else: record it, then let the group tear down
        report["failures"].append(f"crashed: {traceback.format_exc()}")
    report["seconds"] = time.perf_counter() - t0
    report["slowest"] = [f"{n}: {s:.2f}s" for s, n in sorted(times, reverse=True)[:5]]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    exit_cleanly()


def exit_cleanly():
    """Destroy the group, flush, ``os._exit(0)``: a spawned rank that returns normally can abort
    at interpreter exit, when a gloo worker thread releases a collective's tensor after
    finalization began (``examples/distributed_train.py``'s ``exit_cleanly`` says why). No
    barrier: a rank whose suite crashed must not pair it with another rank's collectives."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- comparisons -----------------------------------------------------------------------------


def shard_range(world):
    sizes = SIZES[world]
    r = dist.get_rank()
    off = sum(sizes[:r])
    return off, off + sizes[r]


def like_single_process(where, loss, grads, ref, truth):
    """A data-parallel (or sharded) run's loss and gradients against the single-process run in
    float32 (``ref``) and in float64 (``truth``), each a ``(loss, {name: grad})`` pair: ours is
    no less accurate than the single process (``tests/error_model.py``)."""
    assert_no_less_accurate(loss, ref[0], truth[0], what=f"{where} loss")
    assert_dicts_no_less_accurate(grads, ref[1], truth[1], what=where)


def full_grads(model, get=None):
    """``{name: full gradient}`` of the trainable parameters (FSDP2's DTensor gathered, or
    ``get(p)``: DeepSpeed's ``safe_get_full_grad``)."""
    def full(p):
        if get is not None:
            return get(p)
        return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    return {k: full(p) for k, p in model.named_parameters() if p.requires_grad}


def compare_stats(got, single, exact):
    """``exact``: the float64 reference on the same logits (for the fused path, whose logits are
    rounded to the input dtype by the GEMM, the single-process call's stats)."""
    assert torch.equal(got["rank"], single["rank"]), f"rank {got['rank'].tolist()} vs {single['rank'].tolist()}"
    assert torch.equal(got["accuracy"], single["accuracy"])
    assert torch.equal(got["is_top1"], single["is_top1"])  # the ties after the target, counted across shards
    for key in ("lse", "logp_t", "entropy", "p_max", "logit_mean", "log_sum_p2", "weight"):
        assert_no_less_accurate(got[key], single[key], exact[key], what=key)


def options(extra):
    g = torch.Generator().manual_seed(5)
    kw = dict(extra)
    if kw.pop("weights", False):
        kw["token_weight"] = torch.rand(2, 3, generator=g)
        kw["sequence_weight"] = torch.rand(2, generator=g) + 0.5
    if kw.pop("class_weight", False):
        kw["weight"] = torch.rand(V, generator=g) + 0.5
    return kw


def with_ignore_index(target, ignore_index, world):
    """``target`` with its ignored entries (-100) set to ``ignore_index``; where ``ignore_index``
    is also a column index of a later shard ``[lo, hi)``, the kept target ``[0, 0]`` set to
    ``lo + ignore_index``: the column whose shard-local index is ``ignore_index``."""
    target = target.masked_fill(target == -100, ignore_index)
    sizes = SIZES[world]
    for r in range(1, world):
        if 0 <= ignore_index < sizes[r]:
            target[0, 0] = sum(sizes[:r]) + ignore_index
    return target


def check_logits(cfg, impl, dtype, reduction, world, seed=0, ignore_index=-100, **extra):
    logits, target = make_batch(2, 3, V, dtype, "cpu", seed=seed)
    target[1, 2] = -100
    target = with_ignore_index(target, ignore_index, world)
    lo, hi = shard_range(world)
    kw = dict(weighting=cfg, reduction=reduction, return_stats=True, ignore_index=ignore_index, **options(extra))
    local_kw = {k: kw.pop(k) for k in ("vocab_offset", "vocab_size", "inplace_backward") if k in kw}

    def run(x, impl_, **more):
        loss, stats = rk.cross_entropy(x, target, impl=impl_, **kw, **more)
        (loss * upstream_like(loss).to(loss.dtype)).sum().backward()
        return loss.detach(), stats

    x = logits[..., lo:hi].clone().requires_grad_()
    loss, stats = run(x, impl, process_group=dist.group.WORLD, **local_kw)
    grad = x.grad
    full = logits.clone().requires_grad_()
    loss1, stats1 = run(full, impl)
    exact = logits.double().requires_grad_()
    loss64, stats64 = run(exact, "reference")
    assert grad.dtype == dtype and grad.shape == x.shape
    compare_stats(stats, stats1, stats64)
    assert_no_less_accurate(loss, loss1, loss64, what="loss")
    assert_no_less_accurate(grad, full.grad[..., lo:hi], exact.grad[..., lo:hi], what="grad")


def check_linear(cfg, impl, dtype, reduction, world, seed=0, bias=False, ignore_index=-100, **extra):
    g = torch.Generator().manual_seed(seed + 3)
    d = 8
    h = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * 1.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, (2, 3), generator=g)
    target[0, 1] = -100
    target = with_ignore_index(target, ignore_index, world)
    lo, hi = shard_range(world)
    kw = dict(weighting=cfg, reduction=reduction, return_stats=True, ignore_index=ignore_index, **options(extra))
    local_kw = {k: kw.pop(k) for k in ("vocab_offset", "vocab_size", "reduce_input_grad", "chunk_size") if k in kw}

    def run(h_, w_, b_, impl_, **more):
        loss, stats = rk.linear_cross_entropy(h_, w_, target, linear_bias=b_, impl=impl_, **kw, **more)
        (loss * upstream_like(loss).to(loss.dtype)).sum().backward()
        return loss.detach(), stats

    def leaves(dt, sl=slice(None)):
        return [None if t is None else t[sl].to(dt).clone().requires_grad_() for t in (h, w, b)]

    shard = [leaves(dtype)[0], *leaves(dtype, slice(lo, hi))[1:]]
    loss, stats = run(*shard, impl, process_group=dist.group.WORLD, **local_kw)
    single = leaves(dtype)
    loss1, stats1 = run(*single, impl)
    exact = leaves(torch.float64)
    loss64, stats64 = run(*exact, "reference")
    compare_stats(stats, stats1, stats1 if dtype != torch.float32 else stats64)
    assert_no_less_accurate(loss, loss1, loss64, what="loss")
    dh = shard[0].grad
    if local_kw.get("reduce_input_grad") is False:
        dist.all_reduce(dh)
    assert_no_less_accurate(dh, single[0].grad, exact[0].grad, what="dh")
    assert_no_less_accurate(shard[1].grad, single[1].grad[lo:hi], exact[1].grad[lo:hi], what="dW")
    if bias:
        assert_no_less_accurate(shard[2].grad, single[2].grad[lo:hi], exact[2].grad[lo:hi], what="db")


# -- suites ----------------------------------------------------------------------------------


def objective_cases(world, names=NAMES, impls=("reference", "triton")):
    """Every objective x both paths x both implementations; each (objective, path) and each
    (objective, implementation) in float32 and bfloat16; the reductions in turn."""
    i = 0
    for name in names:
        for p, path in enumerate(("logits", "linear")):
            for j, impl in enumerate(impls):
                dtype = (torch.float32, torch.bfloat16)[(p + j) % 2]
                reduction = REDUCTIONS[i % 3]
                i += 1
                fn = check_logits if path == "logits" else check_linear
                yield (f"{name}-{path}-{impl}-{str(dtype)[6:]}-{reduction}",
                       lambda fn=fn, name=name, impl=impl, dtype=dtype, reduction=reduction, seed=i:
                       fn(name, impl, dtype, reduction, world, seed=seed))


def option_cases(world):
    lo, _ = shard_range(world)
    opts = [
        ("smoothing-zloss-cap-temp", dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, temperature=0.7)),
        ("caller-weights-num-items", dict(weights=True, num_items_in_batch=9)),
        ("class-weight", dict(class_weight=True)),
        ("explicit-offset", dict(vocab_offset=lo, vocab_size=V)),
    ]
    for impl in ("reference", "triton"):
        for tag, extra in opts:
            cfg = rk.RankTuner(xi="geo") if "weights" in tag else "ranktuner"
            yield (f"logits-{tag}-{impl}", lambda e=extra, impl=impl, c=cfg:
                   check_logits(c, impl, torch.float32, "mean", world, **e))
            yield (f"linear-{tag}-{impl}", lambda e=extra, impl=impl, c=cfg:
                   check_linear(c, impl, torch.float32, "mean", world, bias=True, **e))
    yield ("logits-inplace-backward", lambda: check_logits("entropy_reg", "triton", torch.bfloat16, "sum", world,
                                                           inplace_backward=True))
    yield ("linear-reduce_input_grad=False", lambda: check_linear("ranktuner", "triton", torch.bfloat16, "mean", world,
                                                                  reduce_input_grad=False))
    yield ("linear-chunks-talr", lambda: check_linear("talr", "triton", torch.float32, "mean", world, chunk_size=2))
    yield ("linear-chunks-eaft-none", lambda: check_linear("eaft", "reference", torch.float32, "none", world,
                                                           chunk_size=4))
    yield ("token_stats", lambda: check_token_stats(world))
    yield ("different-targets-raise", lambda: check_different_targets_raise(world))


def check_token_stats(world):
    logits, target = make_batch(2, 3, V, torch.float32, "cpu", seed=4)
    lo, hi = shard_range(world)
    got = rk.token_stats(logits[..., lo:hi], target, process_group=dist.group.WORLD)
    want, truth = rk.token_stats(logits, target), rk.token_stats(logits.double(), target)
    assert torch.equal(got["rank"], want["rank"])
    for key in ("lse", "logp_t", "entropy", "p_max"):
        assert_no_less_accurate(got[key], want[key], truth[key], what=key)


def check_different_targets_raise(world):
    logits, target = make_batch(2, 3, V, torch.float32, "cpu", seed=4)
    lo, hi = shard_range(world)
    target = (target + dist.get_rank()) % V  # not the same tokens on every rank
    try:
        rk.cross_entropy(logits[..., lo:hi], target, process_group=dist.group.WORLD)
    except ValueError as e:
        assert "different targets" in str(e), str(e)
    else:
        raise AssertionError("no error for ranks holding different targets")


def check_double_backward(world):
    """A second backward through the same graph (``retain_graph=True``) with an upstream of 1:
    the input gradient formed in forward is summed over the group into a new tensor, never in
    place, so the second backward gives the first's gradient again (the sum is exact: ``x + x``)."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    w = torch.randn(V, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (2, 3), generator=g)
    lo, hi = shard_range(world)
    shard_h, shard_w = h.float().requires_grad_(), w[lo:hi].float().requires_grad_()
    loss = rk.linear_cross_entropy(shard_h, shard_w, target, weighting="ranktuner", process_group=dist.group.WORLD)
    loss.backward(retain_graph=True)
    first = shard_h.grad.clone()
    loss.backward()
    assert torch.equal(shard_h.grad, first + first), "the second backward's input gradient differs from the first's"
    grads = []
    for dt in (torch.float32, torch.float64):
        single = h.to(dt).requires_grad_()
        rk.linear_cross_entropy(single, w.to(dt), target, weighting="ranktuner").backward()
        grads.append(single.grad)
    assert_no_less_accurate(first, *grads, what="dh")


def tp_suite(world):
    yield from objective_cases(world)
    yield from option_cases(world)
    yield from parallel_cases(world)
    yield ("linear-double-backward", lambda: check_double_backward(world))


def ignore_index_cases(world, indices):
    """``ignore_index`` other than -100, on both paths and implementations: -1 and -2 (one of them
    is the shard-local "another shard owns it" sentinel of ``_distributed.local_target``), an id
    above the vocabulary, and ids that are also a later shard's local column index (0, 5)."""
    i = 0
    for ignore_index in indices:
        for path, fn in (("logits", check_logits), ("linear", check_linear)):
            for impl in ("reference", "triton"):
                cfg, reduction = (("ranktuner", "mean"), ("eaft", "none"), ("talr", "sum"))[i % 3]
                i += 1
                yield (f"{path}-{impl}-{cfg}-{reduction}-ignore_index={ignore_index}",
                       lambda fn=fn, impl=impl, cfg=cfg, reduction=reduction, ii=ignore_index:
                       fn(cfg, impl, torch.float32, reduction, world, ignore_index=ii))


def tp4_suite(world):
    yield from objective_cases(world)
    yield ("logits-options", lambda: check_logits("ranktuner", "triton", torch.float32, "none", world,
                                                  label_smoothing=0.1, softcap=6.0, temperature=0.7))
    yield ("linear-options", lambda: check_linear("focal", "triton", torch.bfloat16, "mean", world, bias=True,
                                                  label_smoothing=0.1, z_loss=1e-3))
    yield ("dtensor-colwise", lambda: check_dtensor_head(world))
    yield ("ddp-uneven", lambda: check_data_parallel(world, "ddp", "ranktuner", "linear"))


# -- DDP, FSDP2, DTensor ---------------------------------------------------------------------


class Net(torch.nn.Module):
    """A projection and an LM head; ``forward`` returns the loss (as DDP and FSDP want it)."""

    def __init__(self, d_in=6, d=8, v=V, seed=0, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(d_in, d)
        self.head = torch.nn.Linear(d, v, bias=bias)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.mode = "linear"
        self.kw = {}

    def forward(self, x, y):
        h = torch.tanh(self.proj(x))
        if self.mode == "linear":
            return rk.linear_cross_entropy(h, self.head.weight, y, linear_bias=self.head.bias, **self.kw)
        if self.mode == "head":  # the head's own fused-loss method (FSDP2 unshards it)
            from ranktuner_kernels.distributed import head_cross_entropy

            return head_cross_entropy(self.head, h, y, **self.kw)
        return rk.cross_entropy(self.head(h), y, **self.kw)


def dp_batches(world, seed=0):
    """Per-rank ``[B_r, 4]`` batches of different sizes and ignored counts, and their concatenation."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for r in range(world):
        b = r + 1
        x = torch.randn(b, 4, 6, generator=g)
        y = torch.randint(0, V, (b, 4), generator=g)
        y[0, : r + 1] = -100  # uneven kept counts too
        xs.append(x)
        ys.append(y)
    return xs, ys


def reference_grads(weighting, mode, xs, ys, bias=False, dtype=torch.float32):
    """The single-process loss and gradients on all the ranks' batches, in ``dtype``."""
    net = Net(bias=bias).to(dtype)
    net.mode, net.kw = mode if mode != "head" else "linear", dict(weighting=weighting)
    loss = net(torch.cat(xs).to(dtype), torch.cat(ys))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in net.named_parameters()}


def single_process(weighting, mode, xs, ys, bias=False):
    """:func:`reference_grads` in float32 and in float64 (the error model's ``ref`` and ``truth``)."""
    return [reference_grads(weighting, mode, xs, ys, bias, dtype) for dtype in (torch.float32, torch.float64)]


def check_data_parallel(world, wrapper, weighting, mode, count="dp_group"):
    """``count``: how the global mean is asked for: ``dp_group``; ``dp_group`` with the global
    ``num_items_in_batch``; or the ``num_items_in_batch`` pattern (``global_num_items``, the
    loss times the world size)."""
    from ranktuner_kernels.distributed import global_num_items

    rank = dist.get_rank()
    xs, ys = dp_batches(world, seed=len(weighting))
    ref, truth = single_process(weighting, mode, xs, ys)
    net = Net()
    net.mode, net.kw = mode, dict(weighting=weighting, dp_group=dist.group.WORLD)
    if count != "dp_group":
        net.kw["num_items_in_batch"] = global_num_items(ys[rank])
    if count == "num_items":
        del net.kw["dp_group"]
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(net)
    else:
        from torch.distributed.fsdp import fully_shard

        if mode == "head":
            fully_shard(net.head)  # its own unit: sharded outside its forward
        fully_shard(net)
        model = net
    loss = model(xs[rank], ys[rank])
    if count == "num_items":
        loss = loss * world
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    like_single_process(f"{wrapper} {weighting} {mode} {count}", mean_loss / world, full_grads(net), ref, truth)


def check_fsdp_sharded_weight_raises(world):
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    xs, ys = dp_batches(world)
    net = Net()
    net.kw = dict(dp_group=dist.group.WORLD)
    fully_shard(net.head)
    fully_shard(net)
    try:
        net(xs[rank], ys[rank])  # reads head.weight outside the head's forward: a sharded DTensor
    except ValueError as e:
        assert "fully_shard" in str(e), str(e)
    else:
        raise AssertionError("no error for an FSDP-sharded weight read outside its forward")


def check_dtensor_head(world, mode="linear"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    xs, ys = dp_batches(1, seed=7)
    x, y = xs[0].repeat(2, 1, 1), ys[0].repeat(2, 1)  # the same tokens on every rank
    y[1, 3] = 5
    ref, truth = single_process("ranktuner", mode, [x], [y], bias=True)
    net = Net(bias=True)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(net, mesh, {"head": ColwiseParallel(use_local_output=mode == "linear")})
    net.mode, net.kw = mode, dict(weighting="ranktuner")
    loss = net(x, y)
    loss.backward()
    like_single_process(f"dtensor {mode}", loss.detach(), full_grads(net), ref, truth)


def parallel_cases(world):
    for weighting in ("sft", "talr", "ranktuner"):
        for mode in ("linear", "logits"):
            yield (f"ddp-{weighting}-{mode}", lambda w=weighting, m=mode: check_data_parallel(world, "ddp", w, m))
    yield ("ddp-dp_group-and-num_items", lambda: check_data_parallel(world, "ddp", "ranktuner", "linear",
                                                                     "both"))
    yield ("ddp-num_items-pattern", lambda: check_data_parallel(world, "ddp", "dft", "logits", "num_items"))
    yield ("fsdp2-root-unit-linear", lambda: check_data_parallel(world, "fsdp", "talr", "linear"))
    yield ("fsdp2-head-unit-head_cross_entropy", lambda: check_data_parallel(world, "fsdp", "ranktuner", "head"))
    yield ("fsdp2-sharded-weight-raises", lambda: check_fsdp_sharded_weight_raises(world))
    yield ("dtensor-colwise-linear", lambda: check_dtensor_head(world, "linear"))
    yield ("dtensor-colwise-logits", lambda: check_dtensor_head(world, "logits"))


# -- transformers integration: patch_model under FSDP2 -------------------------------------------


def _hf_model(tied=False):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _hf_batches(world, ignore_index=-100):
    g = torch.Generator().manual_seed(3)
    out = []
    for r in range(world):
        ids = torch.randint(3, 64, (2, 6), generator=g)
        labels = ids.clone()
        labels[0, : r + 1] = ignore_index
        out.append((ids, labels))
    return out


def _unpatched(ref, batches, weighting):
    """The unpatched model's loss on each batch (``weighting`` on its logits where not
    ``"sft"``) and each trainable parameter's gradient averaged over the batches, as data
    parallelism averages it over the ranks."""
    losses, grads = [], {}
    for ids, labels in batches:
        ref.zero_grad(set_to_none=True)
        loss = ref(input_ids=ids, labels=labels).loss
        if weighting != "sft":  # the objective on the unpatched model's logits
            logits = ref(input_ids=ids).logits
            loss = rk.cross_entropy(logits[:, :-1], labels[:, 1:], weighting=weighting, impl="reference")
        loss.backward()
        losses.append(loss.detach())
        for k, p in ref.named_parameters():
            if p.requires_grad:
                grads[k] = grads.get(k, 0) + p.grad / len(batches)
    return losses, grads


def check_patched_fsdp2(world, layout, weighting="sft"):
    """``patch_model`` on a tiny Llama under FSDP2 (``layout``: ``"layers+root"``, or
    ``"tied-layers+root"`` with a tied head, ``"layers+head+root"`` with the LM head its own unit): the mean over the ranks of each rank's
    loss, and every gradient (FSDP averages them over the ranks), against the unpatched model on
    each rank's batch."""
    from torch.distributed.fsdp import fully_shard

    from ranktuner_kernels.integrations.transformers import patch_model

    rank = dist.get_rank()
    batches = _hf_batches(world)
    tied = "tied" in layout
    ref = _unpatched(_hf_model(tied), batches, weighting)
    truth = _unpatched(float64_copy(_hf_model(tied)), batches, weighting)
    model = _hf_model(tied)
    for layer in model.model.layers:
        fully_shard(layer)
    if "head" in layout:
        fully_shard(model.lm_head)
    fully_shard(model)
    patch_model(model, weighting=weighting)
    ids, labels = batches[rank]
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    mean = out.loss.detach().clone()
    dist.all_reduce(mean)
    like_single_process(f"fsdp2 {layout} {weighting}", mean / world, full_grads(model),
                        *[(torch.stack(losses).mean(), grads) for losses, grads in (ref, truth)])


def hf_suite(world):
    yield ("patched-fsdp2-layers+root", lambda: check_patched_fsdp2(world, "layers+root"))
    yield ("patched-fsdp2-tied-layers+root", lambda: check_patched_fsdp2(world, "tied-layers+root"))
    yield ("patched-fsdp2-head-own-unit", lambda: check_patched_fsdp2(world, "layers+head+root"))
    yield ("patched-fsdp2-head-own-unit-ranktuner",
           lambda: check_patched_fsdp2(world, "layers+head+root", "ranktuner"))


# -- transformers integration: patch_model under DeepSpeed ZeRO-3 ------------------------------


def _deepspeed():
    """DeepSpeed on the CPU over the gloo group already up. Its CPU accelerator JIT-compiles a
    shared-memory all-reduce (a C++ build of minutes) that only its inference all-reduce uses;
    skipped here, ZeRO-3 goes through torch.distributed."""
    import sys

    os.environ["DS_ACCELERATOR"] = "cpu"
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


ZERO3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
         # every parameter partitioned, the head's included (the default keeps small ones whole)
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}


def check_patched_zero3(world, layout, weighting="sft"):
    """``patch_model`` on a tiny Llama under DeepSpeed ZeRO-3 (``deepspeed.initialize`` with
    every parameter partitioned over the ranks): each rank's loss against the unpatched model on
    that rank's batch, and every parameter's full gradient (``safe_get_full_grad``: ZeRO averages
    it over the ranks) against the mean of the unpatched gradients. ``layout``: ``"untied"``,
    ``"tied"``, or ``"from_pretrained"`` (loaded under ``HfDeepSpeedConfig``, so the
    parameters are partitioned from construction by ``deepspeed.zero.Init``). ``"talr"``
    (a batch-level weighting) reads the head's weight again in backward."""
    import tempfile

    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    from ranktuner_kernels.integrations.transformers import patch_model

    deepspeed = _deepspeed()
    from deepspeed.utils import safe_get_full_grad

    rank = dist.get_rank()
    batches = _hf_batches(world)
    tied = layout == "tied"
    ref = _lora(_hf_model(tied)) if layout == "lora" else _hf_model(tied)
    truth = _unpatched(float64_copy(ref), batches, weighting)
    losses, grads = _unpatched(ref, batches, weighting)
    if layout == "from_pretrained":
        path = os.path.join(tempfile.gettempdir(), f"rk-zero3-{os.getppid()}")  # the ranks share a parent
        if rank == 0:
            ref.save_pretrained(path)
        dist.barrier()
        keep = HfDeepSpeedConfig(ZERO3)  # noqa: F841 (from_pretrained reads it while it lives)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert hasattr(model.lm_head.weight, "ds_id") and model.lm_head.weight.numel() == 0
    else:
        model = _lora(_hf_model(tied)) if layout == "lora" else _hf_model(tied)
    patch_model(model, weighting=weighting)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ZERO3)
    assert all(p.numel() == 0 for p in model.get_output_embeddings().parameters())  # partitioned outside the forward
    ids, labels = batches[rank]
    out = engine(input_ids=ids, labels=labels)
    engine.backward(out.loss)
    like_single_process(f"zero3 {layout} {weighting}", out.loss.detach(), full_grads(model, safe_get_full_grad),
                        (losses[rank], grads), (truth[0][rank], truth[1]))


def _lora(model):
    """LoRA on q/v and on the LM head (B != 0 at init, so the head's adapter shows in the loss;
    no dropout, whose draws ``tests/test_integration_peft.py`` matches)."""
    import peft

    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                      init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj", "lm_head"]))


def check_trainer_zero3(world):
    """Two ``Trainer`` steps with a ZeRO-3 ``deepspeed=`` config (accelerate's DeepSpeed path),
    the model patched or not: the logged losses, which after step 1 also reflect the update."""
    import tempfile

    import datasets
    import transformers

    from ranktuner_kernels.integrations.transformers import patch_model

    _deepspeed()
    out_dir = tempfile.mkdtemp()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (8, 6), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    logged = []
    for patched in (False, True):
        args = transformers.TrainingArguments(
            output_dir=os.path.join(out_dir, f"trainer{int(patched)}"), per_device_train_batch_size=2, max_steps=2,
            deepspeed=cfg, report_to=[], logging_steps=1, use_cpu=True, ddp_backend="gloo", learning_rate=1e-2,
            save_strategy="no", disable_tqdm=True)
        model = _hf_model(False)
        trainer = transformers.Trainer(model=patch_model(model) if patched else model, args=args, train_dataset=data)
        trainer.train()
        assert trainer.is_deepspeed_enabled and hasattr(model.lm_head.weight, "ds_id")  # ZeRO-3 partitioned it
        logged.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(logged[0]) == 2, logged
    torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-5, atol=1e-6)


def zero3_suite(world):
    yield ("patched-zero3-untied", lambda: check_patched_zero3(world, "untied"))
    yield ("patched-zero3-tied", lambda: check_patched_zero3(world, "tied"))
    yield ("patched-zero3-talr", lambda: check_patched_zero3(world, "untied", "talr"))
    yield ("patched-zero3-ranktuner", lambda: check_patched_zero3(world, "untied", "ranktuner"))
    yield ("patched-zero3-from_pretrained", lambda: check_patched_zero3(world, "from_pretrained"))
    yield ("patched-zero3-lora-head", lambda: check_patched_zero3(world, "lora"))
    yield ("patched-zero3-trainer", lambda: check_trainer_zero3(world))


# -- TRL's fused LM head (integrations.trl.add_fused_lm_head) under FSDP2 and ZeRO-3 -------------

HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _fused_head(model):
    from ranktuner_kernels.integrations.trl import add_fused_lm_head

    add_fused_lm_head(model, temperature=0.7, outputs=HEAD_OUTPUTS)
    return model


def _fused_step(model, ids, labels, backward=None):
    """The fused call's fields (and loss), after backpropagating ``loss + entropy.sum()``."""
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    value = out.loss + out.entropy.sum()
    value.backward() if backward is None else backward(value)
    return {k: getattr(out, k).detach() for k in (*HEAD_OUTPUTS, "loss", "label_mask")}


def _single_process_head(batches, float64=False):
    """Each batch's fields on the whole model, and every gradient averaged over the batches (as
    data parallelism averages it over the ranks); ``float64``: on a float64 copy (the truth)."""
    ref = _fused_head(_hf_model().double() if float64 else _hf_model())  # our head computes its own loss
    fields, grads = [], {}
    for ids, labels in batches:
        ref.zero_grad(set_to_none=True)
        fields.append(_fused_step(ref, ids, labels))
        for k, p in ref.named_parameters():
            grads[k] = grads.get(k, 0) + p.grad / len(batches)
    return fields, grads


def _same_fields(got, want, truth, where):
    """Each field no less accurate than the single-process call's against float64 (the masks and
    ``is_top1`` equal)."""
    for k, v in want.items():
        if v.dtype == torch.bool:
            assert torch.equal(got[k], v), f"{where} {k}"
        else:
            assert_no_less_accurate(got[k], v, truth[k], what=f"{where} {k}")


def check_fused_head_fsdp2(world):
    """``add_fused_lm_head`` on a tiny Llama under FSDP2 with the LM head its own ``fully_shard``
    unit (its weight a sharded DTensor outside its forward): each rank's fields equal the
    single-process call on its batch, every gradient the single-process mean."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    batches = _hf_batches(world)
    want, grads = _single_process_head(batches)
    truth, grads64 = _single_process_head(batches, float64=True)
    model = _hf_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    _fused_head(model)
    _same_fields(_fused_step(model, *batches[rank]), want[rank], truth[rank], "fsdp2")
    assert "_ranktuner_fused_head_call" in model.lm_head.__dict__  # ran as the head's FSDP forward method
    assert_dicts_no_less_accurate(full_grads(model), grads, grads64, what="fsdp2 head")


def check_fused_head_zero3(world):
    """``add_fused_lm_head`` on a tiny Llama under DeepSpeed ZeRO-3, every parameter (the head's
    included) partitioned: fields and full gradients against the single-process call."""
    deepspeed = _deepspeed()
    from deepspeed.utils import safe_get_full_grad

    rank = dist.get_rank()
    batches = _hf_batches(world)
    want, grads = _single_process_head(batches)
    truth, grads64 = _single_process_head(batches, float64=True)
    model = _fused_head(_hf_model())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ZERO3)
    assert all(p.numel() == 0 for p in model.get_output_embeddings().parameters())  # partitioned outside the forward
    _same_fields(_fused_step(engine, *batches[rank], backward=engine.backward), want[rank], truth[rank], "zero3")
    assert_dicts_no_less_accurate(full_grads(model, safe_get_full_grad), grads, grads64, what="zero3 head")


def trl_head_suite(world):
    yield ("fused-head-fsdp2-head-own-unit", lambda: check_fused_head_fsdp2(world))
    yield ("fused-head-zero3", lambda: check_fused_head_zero3(world))


#: the ignore_index values of ``ignore_index_cases``: ``ignore2-collide`` holds those that are also
#: shard-local column indices (``_distributed.local_ignore_index``)
IGNORE_SUITES = {"ignore2": (-1, -2, 10**6), "ignore2-collide": (0, 5)}
SUITES = {"tp2": tp_suite, "tp4": tp4_suite, "hf2": hf_suite, "zero3": zero3_suite, "trl_head": trl_head_suite,
          **{name: (lambda world, ii=ii: ignore_index_cases(world, ii)) for name, ii in IGNORE_SUITES.items()}}
