"""Triton kernels against the reference: on CUDA where present, else under TRITON_INTERPRET=1.

Low-precision results are judged by their error against a float64 reference of the same
logits, relative to the error the reference itself makes when run in that dtype.
"""

import pytest
import torch

import ranktuner_kernels as rk
from helpers import CONFIGS, DEVICE, ON_GPU, cid, loss_and_grads, make_batch, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_against_reference(obj, shape, dtype, reduction="mean", *, weights=False, num_items=None, seed=0):
    """Kernel loss, gradient and stats vs the float64 reference, on logits of ``shape``
    (``(N, V)`` or ``(B, T, V)``)."""
    logits, target = make_batch(*((1, *shape) if len(shape) == 2 else shape), dtype, DEVICE, seed=seed)
    if len(shape) == 2:
        logits, target = logits[0], target[0]
    kw = dict(reduction=reduction, num_items_in_batch=num_items, return_stats=True)
    if weights:
        g = torch.Generator().manual_seed(seed + 7)
        kw["token_weight"] = torch.rand(target.shape, generator=g).to(DEVICE)
        if target.dim() == 2:
            kw["sequence_weight"] = (torch.rand(target.shape[0], generator=g) + 0.5).to(DEVICE)

    def run(x, impl):
        out = {}

        def fn(z):
            loss, out["stats"] = rk.cross_entropy(z, target, weighting=obj, impl=impl, **kw)
            return loss

        loss, (grad,) = loss_and_grads(fn, [x])
        return loss, grad, out["stats"]

    k_loss, k_grad, k_stats = run(logits.clone().requires_grad_(), "triton")
    r_loss, r_grad, r_stats = run(logits.double().requires_grad_(), "reference")  # exact, same logits
    l_loss, l_grad, _ = run(logits.clone().requires_grad_(), "reference")  # the reference in this dtype

    assert k_grad.dtype == dtype and k_grad.shape == logits.shape
    assert torch.equal(k_stats["rank"], r_stats["rank"])  # compared in the logits' own precision
    for key in ("lse", "logp_t", "entropy", "p_max"):
        torch.testing.assert_close(k_stats[key].double(), r_stats[key], rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(k_stats["weight"].double(), r_stats["weight"], rtol=1e-4, atol=1e-6)
    assert rel_err(k_loss, r_loss) <= 2 * rel_err(l_loss, r_loss) + 2e-5
    assert rel_err(k_grad, r_grad) <= 2 * rel_err(l_grad, r_grad) + 2e-5
    assert not k_grad.isnan().any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("obj", CONFIGS, ids=cid)
def test_every_weighting(obj, dtype, reduction):
    check_against_reference(obj, (2, 3, 257), dtype, reduction)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (5, 3), (7, 257), (3, 1, 300), (2, 3, 4100)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sft", "ranktuner", "entropy_reg", "focal"])
def test_odd_shapes(name, dtype, shape):
    check_against_reference(rk.weightings.resolve(name), shape, dtype, "none", seed=sum(shape))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["ranktuner", "entropy_reg", "talr"])
def test_caller_weights_and_num_items(name, reduction):
    check_against_reference(rk.weightings.resolve(name), (3, 4, 129), torch.float32, reduction,
                            weights=True, num_items=17)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sft", "ranktuner", "entropy_reg", "eaft", "talr"])
def test_gpu_llm_vocabulary(name, dtype):
    check_against_reference(rk.weightings.resolve(name), (2, 64, 152064), dtype, "mean", seed=11)


# ---- the launchers write every element ------------------------------------------------


@pytest.mark.parametrize("v", [1, 257, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_write_every_output(dtype, v):
    """Every output element is written (outputs start NaN-poisoned by the caching allocator on
    the GPU; here the launchers' own buffers are checked for NaN and against the reference)."""
    from ranktuner_kernels import kernels, reference
    from ranktuner_kernels.reference import GradCoefs

    logits, target = make_batch(2, 3, v, dtype, DEVICE, seed=v)
    target = target.reshape(-1)
    n = target.numel()
    every = frozenset(reference.OPTIONAL_STATS)
    stats, _ = kernels.row_stats(logits, target, -100, extra=every)
    ref = reference.row_stats(logits.double(), target, -100, extra=every)
    assert tuple(stats) == reference.STAT_NAMES  # the launcher names its outputs as the schema does
    for name, got in stats.items():
        want = getattr(ref, name)
        assert got.dtype == reference.stat_dtype(name, torch.float32) and not got.double().isnan().any()
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-5)
    g = torch.Generator().manual_seed(v)
    c_p, c_onehot, c_uniform, c_entropy = (torch.rand(n, generator=g).to(DEVICE) for _ in range(4))
    lse, logp, ent = stats["lse"], stats["logp_t"], stats["entropy"]
    for coefs in (GradCoefs(c_p), GradCoefs(c_p, c_onehot, c_uniform, c_entropy)):
        out = torch.full_like(logits, float("nan"))
        kernels.row_grad(logits, target, lse, logp, ent, coefs, -100, out)
        want = reference.row_grad(logits.double(), target, ref.lse, ref.logp_t, ref.entropy,
                                  coefs.map(torch.Tensor.double), -100, torch.empty_like(logits, dtype=torch.float64))
        assert not out.isnan().any()
        assert torch.all(out.reshape(n, v)[target == -100] == 0)
        assert rel_err(out, want) <= 2 * rel_err(want.to(dtype), want) + 1e-6


def test_rank_with_ties_in_bf16():
    """bf16 logits drawn from a few values: many ties; ties count against the target."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (64, 200), generator=g).to(torch.bfloat16).to(DEVICE) * 0.5
    target = torch.randint(0, 200, (64,), generator=g).to(DEVICE)
    got = rk.token_stats(logits, target, impl="triton")["rank"]
    z_y = logits.gather(1, target[:, None])
    want = (logits >= z_y).sum(1)
    assert torch.equal(got, want)
    assert (want > 1).all() and len(set(want.tolist())) > 3


def test_autotune_config_list_is_valid():
    from ranktuner_kernels.kernels import config

    for c in config.autotune_configs():
        assert c.kwargs["BLOCK_V"] & (c.kwargs["BLOCK_V"] - 1) == 0
    assert config.fixed_config(257)["BLOCK_V"] == 512 and config.fixed_config(257, 16)["num_warps"] == 4
    assert config.fixed_config(152064)["BLOCK_V"] == config.BLOCK_V


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error path")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target = make_batch(1, 2, 5, device="cpu")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        rk.cross_entropy(logits, target, impl="triton")


@pytest.mark.parametrize("scale", [1e-4, 300.0])
@pytest.mark.parametrize("name", ["ranktuner", "entropy_reg", "focal"])
def test_flat_and_peaked_rows(name, scale):
    """Near-uniform rows (entropy ~ log V, every rank tied) and rows so peaked that most
    exp(z - m) underflow to 0: the online sums must stay finite and match the reference."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, 300, generator=g, dtype=torch.float64) * scale).float().to(DEVICE)
    target = torch.randint(0, 300, (6,), generator=g).to(DEVICE)
    obj = rk.weightings.resolve(name)
    loss, (grad,) = loss_and_grads(lambda z: rk.cross_entropy(z, target, weighting=obj, impl="triton", reduction="none"),
                                   [logits.clone().requires_grad_()])
    ref, (ref_grad,) = loss_and_grads(lambda z: rk.cross_entropy(z, target, weighting=obj, impl="reference", reduction="none"),
                                      [logits.double().requires_grad_()])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("v, k", [(50, 20), (10, 20), (4100, 20), (300, 1), (300, 64), (2049, 7)], ids=str)
def test_streaming_topk_entropy(v, k):
    """EAFT's top-K entropy kernel against torch.topk: K above and below V, several tiles, a
    max in the last tile, ties (bf16 logits of few values), -inf, NaN, a confident row."""
    from ranktuner_kernels import kernels, reference

    g = torch.Generator().manual_seed(v + k)
    z = torch.randn(1, 8, v, generator=g) * 3
    z[0, 2, -1] = 40.0  # confident, the max found last
    z[0, 3] = torch.randint(-2, 3, (v,), generator=g).float()  # many ties
    z[0, 4, : v // 2] = float("-inf")
    z[0, 5, v // 3] = float("nan")
    y = torch.randint(0, v, (8,), generator=g)
    y[1] = -100
    for dtype in (torch.float32, torch.bfloat16):
        x = z.to(dtype).to(DEVICE)
        got = kernels.topk_entropy(x, y.to(DEVICE), k, -100)
        want = reference.topk_entropy(x.double(), y.to(DEVICE), k, -100)
        # relative: the confident row's entropy is ~1e-13 (measured errors <= 7.3e-7 relative)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0, equal_nan=True)
        assert got[5].isnan() and got[1] == 0
        assert k == 1 or 0 < want[2] < 1e-10  # the confident row: a tiny entropy, judged relatively
    got = kernels.topk_entropy(z.to(DEVICE), y.to(DEVICE), k, -100, softcap=5.0, temperature=0.5)
    want = reference.topk_entropy(z.double().to(DEVICE), y.to(DEVICE), k, -100, reference.Transform(5.0, 0.5))
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="k"):
        kernels.topk_entropy(z.to(DEVICE), y.to(DEVICE), 65, -100)
