"""The optional statistics of the statistics pass (``log_sum_p2``, ``logit_mean``, ``is_top1``):
each against a float64 computation from the full logits, on both implementations and both
paths (logits, fused linear), through ``logprobs`` / ``linear_logprobs`` and the losses'
``return_stats``; near-certain tokens; ties (``is_top1`` against ``torch.argmax``); the
request (only what is asked is computed, in the same pass); the schema the ops are made from.

Error model of the float statistics: the float32 run (kernel or reference) against a float64
run on the same inputs must stay within twice the error of the reference itself run in
float32, plus 2e-6 relative (the same rule as ``test_kernels.check_against_reference``); on
near-certain tokens, within 1e-5 relative per token, the bound SPEC states for ``log p_t``
(``log sum p^2 = 2 log p_t + log1p(sum_{i != y} (p_i / p_t)^2)``).
"""

import math

import pytest
import torch

import ranktuner_kernels as rk
from helpers import DEVICE, make_batch, rel_err
from ranktuner_kernels import _schema, reference

IMPLS = ["reference", "triton"]
NEW = ("log_sum_p2", "logit_mean", "is_top1")
OPTS = [dict(), dict(softcap=6.0, temperature=0.7)]


def oracle(logits, target, softcap=None, temperature=1.0):
    """float64 ``log sum_i p_i^2``, ``mean_i z'_i`` and ``argmax(z) == y`` (torch's first-index
    rule, on the untransformed logits; False for a NaN row) of ``[..., V]`` logits."""
    z = logits.double()
    zt = z if softcap is None else softcap * torch.tanh(z / softcap)
    zt = zt / temperature
    p = torch.softmax(zt, -1)
    keep = target != -100
    return {"log_sum_p2": torch.where(keep, torch.log((p * p).sum(-1)), math.nan),
            "logit_mean": torch.where(keep, zt.mean(-1), math.nan),
            "is_top1": keep & (z.argmax(-1) == target) & ~z.isnan().any(-1)}


def linear_data(seed, b=2, t=5, d=12, v=301):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, 0] = -100
    y[0, 2] = int((h[0, 2] @ w.T + bias).argmax())  # one top-1 token at least
    return h, w, bias, y


def run(entry, impl, dtype, data, opts, return_stats=NEW):
    """The stats dict of one entry point (``logprobs``, ``cross_entropy``, ``linear_logprobs``,
    ``linear_cross_entropy``) on ``data`` cast to ``dtype``."""
    if entry in ("logprobs", "cross_entropy"):
        logits, y = data
        x = logits.to(DEVICE, dtype)
        if entry == "logprobs":
            return rk.logprobs(x, y, impl=impl, return_stats=return_stats, **opts)[2]
        return rk.cross_entropy(x, y, impl=impl, return_stats=return_stats, weighting="dft", **opts)[1]
    h, w, bias, y = data
    hh, ww, bb = (t.to(DEVICE, dtype) for t in (h, w, bias))
    if entry == "linear_logprobs":
        return rk.linear_logprobs(hh, ww, y, linear_bias=bb, impl=impl, chunk_size=3, return_stats=return_stats,
                                  **opts)[2]
    return rk.linear_cross_entropy(hh, ww, y, linear_bias=bb, impl=impl, chunk_size=3, return_stats=return_stats,
                                   weighting="dft", **opts)[1]


def check_stats(entry, impl, data, full_logits, target, opts):
    """``entry``'s three statistics in float32 against the float64 oracle of ``full_logits``,
    by the module's error model."""
    got = run(entry, impl, torch.float32, data, opts)
    ref32 = run(entry, "reference", torch.float32, data, opts)
    want = oracle(full_logits, target, **opts)
    assert set(got) == set(NEW)
    keep = target != -100
    for name in ("log_sum_p2", "logit_mean"):
        assert got[name].dtype == torch.float32 and got[name].shape == target.shape
        assert got[name][~keep].isnan().all()
        err, ref_err = rel_err(got[name][keep], want[name][keep]), rel_err(ref32[name][keep], want[name][keep])
        assert err <= 2 * ref_err + 2e-6, (name, err, ref_err)
    assert got["is_top1"].dtype == torch.bool and torch.equal(got["is_top1"], want["is_top1"])


@pytest.mark.parametrize("opts", OPTS, ids=["plain", "cap-temp"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", ["logprobs", "cross_entropy"])
def test_logits_path_against_float64(entry, impl, opts):
    logits, y = make_batch(2, 5, 301, torch.float64, "cpu", seed=3)
    logits[0, 3] = logits[0, 3] * 8 + 20  # LLM magnitudes
    check_stats(entry, impl, (logits, y), logits, y, opts)


@pytest.mark.parametrize("opts", OPTS, ids=["plain", "cap-temp"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", ["linear_logprobs", "linear_cross_entropy"])
def test_fused_linear_path_against_float64(entry, impl, opts):
    h, w, bias, y = linear_data(4)
    check_stats(entry, impl, (h, w, bias, y), h @ w.T + bias, y, opts)


@pytest.mark.parametrize("v", [1, 7, 2049])
def test_odd_vocabularies_kernel_against_reference(v):
    """One column, a ragged tile, a full tile plus one: the kernel's statistics equal the
    float64 reference's on the same float32 logits (the ragged tail and the target's tile are
    the masked paths of the accumulators)."""
    logits, y = make_batch(3, 4, v, torch.float32, DEVICE, seed=v)
    every = frozenset(reference.OPTIONAL_STATS)
    from ranktuner_kernels import kernels

    got = kernels.row_stats(logits, y.reshape(-1), -100, extra=every)[0]
    want = reference.row_stats(logits.double(), y.reshape(-1), -100, extra=every)
    for name in NEW:
        a, b = got[name], getattr(want, name)
        if b.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_log_sum_p2_of_near_certain_tokens(impl):
    """p_t from 1 - 3e-3 to 1 - 1e-8 at float32 logits ~ N(20, 4): log sum p^2 ~ -2 (1 - p_t)
    keeps the relative precision of log p_t (``2 log p_t + log1p(...)``: per token within 1.5
    times log p_t's relative error plus 1e-6; plain, within SPEC's 1e-5), where the float32
    softmax computed by torch loses it. Also soft-capped at 200 with T = 0.9 (logits to 70)."""
    from test_numerics import confident_rows

    z, y, _ = confident_rows(v=2048, n=24, seed=5)
    z[-1, y[-1]] += 4.0  # 1 - p_t ~ 1e-8 (float32 p_t rounds to 1)
    x = z.float()  # the float32 logits are the input: the float64 truth is taken from them
    for opts in ({}, {"softcap": 200.0, "temperature": 0.9}):
        _, _, got = rk.logprobs(x.to(DEVICE), y.to(DEVICE), impl=impl, return_stats=("log_sum_p2", "logp_t"), **opts)
        want = oracle(x, y, **opts)["log_sum_p2"]
        zt = x.double() if not opts else 200.0 * torch.tanh(x.double() / 200.0) / 0.9
        want_logp = torch.log_softmax(zt, -1).gather(1, y[:, None])[:, 0]
        assert (want.abs() < 7e-3).all() and want[-1].abs() < 1e-7
        err = ((got["log_sum_p2"].double().cpu() - want) / want).abs()
        err_logp = ((got["logp_t"].double().cpu() - want_logp) / want_logp).abs()
        assert (err <= 1.5 * err_logp + 1e-6).all(), (err - 1.5 * err_logp).max()
        assert opts or err.max() <= 1e-5, float(err.max())
        p = torch.softmax(zt.float(), -1)
        torch_err = ((torch.log((p * p).sum(-1)).double() - want) / want).abs().max()
        assert torch_err > 100 * err.max()  # the naive float32 formula really loses the digits here


@pytest.mark.parametrize("impl", IMPLS)
def test_is_top1_is_argmax_and_accuracy_counts_ties(impl):
    """bf16 logits of a few values (many ties): ``is_top1`` is ``argmax == y`` with torch's
    first-index rule, ``accuracy`` counts any tie at the max as correct."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (64, 200), generator=g).to(torch.bfloat16).to(DEVICE)
    target = torch.randint(0, 200, (64,), generator=g).to(DEVICE)
    top = logits.max(-1).values
    target[5] = int(torch.nonzero(logits[5] == top[5])[0])  # the first maximum: top-1
    target[7] = int(torch.nonzero(logits[7] == top[7])[-1])  # the last of several: accurate, not top-1
    st = rk.token_stats(logits, target, impl=impl)
    assert torch.equal(st["is_top1"], logits.argmax(-1) == target)
    assert torch.equal(st["accuracy"], logits.gather(1, target[:, None])[:, 0] == top)
    assert st["is_top1"][5] and st["accuracy"][7]
    assert (st["accuracy"] & ~st["is_top1"]).any()  # ties after the first maximum: the two differ


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_rows_and_ignored_tokens(impl):
    logits, y = make_batch(2, 3, 40, torch.float32, DEVICE, seed=8)
    y[0, 0] = int(logits[0, 0].argmax())
    logits[0, 0, 5] = float("nan")
    _, _, st = rk.logprobs(logits, y, impl=impl, return_stats=True)
    assert st["log_sum_p2"][0, 0].isnan() and st["logit_mean"][0, 0].isnan() and not st["is_top1"][0, 0]
    ignored = y == -100
    assert ignored.any() and not st["is_top1"][ignored].any() and st["log_sum_p2"][ignored].isnan().all()


# ---- the request ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_asked_statistics_are_computed_in_one_pass(impl, monkeypatch):
    """A tuple asks for those keys only; the statistics pass gets exactly the optional ones they
    need (the kernel's switches), runs once per chunk, and under no_grad nothing else runs."""
    from ranktuner_kernels import _dispatch

    backend = _dispatch.BACKENDS[impl]
    calls = []
    real = type(backend).row_stats

    def spy(self, logits, target, params, *a, **kw):
        calls.append(params.extra_stats)
        return real(self, logits, target, params, *a, **kw)

    monkeypatch.setattr(type(backend), "row_stats", spy)
    monkeypatch.setattr(type(backend), "row_grad", lambda *a, **kw: pytest.fail("a gradient pass ran"))
    h, w, bias, y = linear_data(1, v=50)
    with torch.no_grad():
        logp, ent, st = rk.linear_logprobs(h.float(), w.float(), y, impl=impl, chunk_size=4,
                                           return_stats=["is_top1", "p_t"])
    assert list(st) == ["is_top1", "p_t"] and st["p_t"].shape == y.shape
    assert calls == [frozenset({"is_top1"})] * 3  # 10 rows in chunks of 4: one pass each
    calls.clear()
    rk.logprobs((h @ w.T).float(), y, impl=impl)
    rk.cross_entropy((h @ w.T).float(), y, impl=impl, return_stats=True, label_smoothing=0.1)
    assert calls == [frozenset(), frozenset(reference.OPTIONAL_STATS)]


def test_bad_requests_name_the_argument():
    logits, y = make_batch(1, 3, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"return_stats: unknown statistics \['entropy_nats'\]; valid names: .*"
                                         r"'log_sum_p2'"):
        rk.logprobs(logits, y, return_stats=("entropy_nats",))
    with pytest.raises(ValueError, match="return_stats: unknown statistics \\['weight'\\]"):
        rk.logprobs(logits, y, return_stats=["weight"])  # a loss's statistic
    with pytest.raises(TypeError, match="return_stats: expected a bool or a tuple/list"):
        rk.cross_entropy(logits, y, return_stats="is_top1")
    with pytest.raises(ValueError, match="return_stats: 'z_loss'"):
        rk.cross_entropy(logits, y, return_stats=("z_loss",))
    loss, st = rk.cross_entropy(logits, y, return_stats=("z_loss", "weight"), z_loss=1e-3)
    assert list(st) == ["z_loss", "weight"]
    assert rk.logprobs(logits, y, return_stats=False)[0].shape == y.shape


def test_every_public_stat_is_in_every_dict():
    """``token_stats``, the losses' and ``logprobs``' ``return_stats=True`` give the same keys
    (the losses two more), in float32 with the statistics' own kinds."""
    logits, y = make_batch(2, 3, 30, torch.float32, "cpu", seed=1)
    names = [p.name for p in _schema.PUBLIC_STATS]
    ts = rk.token_stats(logits, y)
    _, _, lp = rk.logprobs(logits, y, return_stats=True)
    _, ce = rk.cross_entropy(logits, y, return_stats=True)
    assert list(ts) == list(lp) == names and list(ce) == names + ["weight"]
    for key in names:
        torch.testing.assert_close(ts[key], lp[key], equal_nan=True)
        torch.testing.assert_close(ts[key], ce[key], equal_nan=True)
    assert ts["rank"].dtype == torch.int64 and ts["is_top1"].dtype == torch.bool
    assert ts["log_sum_p2"].dtype == ts["logit_mean"].dtype == torch.float32
    assert not lp["logp_t"].requires_grad  # the dict is detached, logp itself is not


# ---- the schema ----------------------------------------------------------------------------


def test_the_schema_declares_every_statistic_once():
    """Every statistic is a ROW_STATS entry; the optional ones each have an accumulator, the
    kernel's launcher a slot named alike, a public key; every op's outputs come from it."""
    import importlib

    kernel = importlib.import_module("ranktuner_kernels.kernels.row_stats")  # the module, not its launcher

    names = reference.STAT_NAMES
    assert len(set(names)) == len(names) and set(NEW) <= set(reference.OPTIONAL_STATS)
    assert kernel.STAT_SLOTS == names
    assert set(kernel.OPTIONAL) == set(reference.OPTIONAL_STATS)
    for stat, acc in kernel.OPTIONAL.items():
        assert {a.name: a.stat for a in reference.ACCUMULATORS}[acc] == stat
    assert set(kernel.PARTIAL_SLOTS) == {a.name for a in reference.ACCUMULATORS}
    assert {p.name for p in _schema.PUBLIC_STATS} >= set(reference.OPTIONAL_STATS)
    for spec in (_schema.TOKEN_LOSS, _schema.LINEAR_LOSS, _schema.LOGPROBS, _schema.LINEAR_LOGPROBS):
        assert {o.name for o in spec.outputs} >= set(names)
        assert set(spec.saved) <= set(spec.inputs) | {o.name for o in spec.op_outputs}
        assert set(spec.differentiable) <= {o.name for o in spec.outputs}
