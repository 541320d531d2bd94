"""Clipped policy losses (ranktuner_kernels.rl.policy_loss) against float64 references written
element by element: python loops over tokens, the clip written out, stop-gradients as python
floats. Values and gradients (w.r.t. the log-probabilities and the entropies) are compared."""

import math

import pytest
import torch

from ranktuner_kernels.rl import aggregate, policy_loss

B, T = 4, 6
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def make(seed=0, spread=0.3, per_seq_adv=False, dtype=torch.float64):
    """Random log-probabilities around per-sequence shifts (+0.6, -0.6, 0, 0), advantages of
    both signs (alternating per token, or +, -, +, - per sequence): the clip is active on both
    sides for the token and the sequence ratios, and inactive elsewhere."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    shift = torch.tensor([0.6, -0.6, 0.0, 0.0], dtype=torch.float64)[:, None]
    logp = old + shift + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    if per_seq_adv:
        sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
        adv = (torch.rand(B, generator=g, dtype=torch.float64) + 0.2) * sign
    else:
        sign = torch.tensor([1.0, -1.0] * (T // 2), dtype=torch.float64)[None, :] * torch.tensor(
            [1.0, -1.0, 1.0, 1.0], dtype=torch.float64)[:, None]
        adv = (torch.rand(B, T, generator=g, dtype=torch.float64) + 0.2) * sign
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False  # padding
    mask[2, 1:] = False
    mask[3, :] = False  # a fully dropped sequence
    return [x.to(dtype) if x.dtype.is_floating_point else x for x in (logp, old, adv, ref, ent, mask)]


def naive(logp, old, adv, mask, *, lo, hi, ratio, ref=None, kl_coef=0.0, ent=None, ent_coef=0.0, agg, dual=None):
    """The loss, summed up from per-token python scalars."""
    b_size, t_size = logp.shape
    adv2 = adv if adv.dim() == 2 else adv[:, None].expand(b_size, t_size)
    terms = [[None] * t_size for _ in range(b_size)]  # per-token (pg, kl, entropy) scalar tensors
    const = logp.detach()  # the stop-gradient values
    for i in range(b_size):
        kept = [t for t in range(t_size) if mask[i, t]]
        if ratio == "gspo_token" and kept:
            mean_log = sum(float(const[i, t]) - float(old[i, t]) for t in kept) / len(kept)
            s_i = math.exp(mean_log)  # a python float: no gradient
        for t in kept:
            a = float(adv2[i, t])
            if ratio == "token":
                r = torch.exp(logp[i, t] - float(old[i, t]))
            else:
                r = s_i * torch.exp(logp[i, t] - float(const[i, t]))  # value s_i, gradient s_i · d logp
            unclipped = -a * r
            clipped = -a * torch.clamp(r, 1 - lo, 1 + hi)
            pg = unclipped if float(unclipped.detach()) >= float(clipped.detach()) else clipped
            if dual is not None and a < 0 and float(pg.detach()) > -a * dual:
                pg = pg * 0 + (-a * dual)
            kl = torch.zeros((), dtype=logp.dtype)
            if ref is not None:
                d = float(ref[i, t]) - logp[i, t]
                kl = torch.exp(d) - d - 1
            e = ent[i, t] if ent is not None else torch.zeros((), dtype=logp.dtype)
            terms[i][t] = (pg, kl, e)

    def reduce(k):
        if agg == "token-mean":
            vals = [terms[i][t][k] for i in range(b_size) for t in range(t_size) if terms[i][t] is not None]
            return sum(vals) / len(vals) if vals else torch.zeros((), dtype=logp.dtype)
        seqs = []
        for i in range(b_size):
            vals = [terms[i][t][k] for t in range(t_size) if terms[i][t] is not None]
            if vals:
                seqs.append(sum(vals) / len(vals) if agg == "seq-mean-token-mean" else sum(vals))
        return sum(seqs) / len(seqs) if seqs else torch.zeros((), dtype=logp.dtype)

    return reduce(0) + kl_coef * reduce(1) - ent_coef * reduce(2)


def grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)], out


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio", ["token", "gspo_token"])
@pytest.mark.parametrize("per_seq_adv", [False, True], ids=["adv_BT", "adv_B"])
@pytest.mark.parametrize("extras", [False, True], ids=["pg", "pg+kl+entropy"])
def test_against_naive(ratio, agg, per_seq_adv, extras):
    logp, old, adv, ref, ent, mask = make(seed=AGGS.index(agg) + 3 * per_seq_adv, per_seq_adv=per_seq_adv)
    kw = dict(clip_low=0.2, clip_high=0.28)
    ex = dict(ref_logp=ref, kl_coef=0.05, entropy=None, entropy_coef=0.01) if extras else {}

    def ours(lp, en):
        e = dict(ex)
        if extras:
            e["entropy"] = en
        return policy_loss(lp, old, adv, mask, ratio=ratio, aggregation=agg, **kw, **e)

    def theirs(lp, en):
        return naive(lp, old, adv, mask, lo=0.2, hi=0.28, ratio=ratio, agg=agg,
                     ref=ref if extras else None, kl_coef=0.05 if extras else 0.0,
                     ent=en if extras else None, ent_coef=0.01 if extras else 0.0)

    l1, (g1, ge1), (_, metrics) = grads(ours, logp, ent)
    l2, (g2, ge2), _ = grads(theirs, logp, ent)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge1, ge2, rtol=1e-12, atol=1e-12)
    assert (g1[~mask] == 0).all()
    # the data exercises both clip sides and both advantage signs
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    torch.testing.assert_close(metrics["clip_frac"], metrics["clip_frac_low"] + metrics["clip_frac_high"])


def test_metrics_against_naive():
    logp, old, adv, ref, ent, mask = make(seed=3)
    loss, m = policy_loss(logp, old, adv, mask, eps=0.2, ref_logp=ref, entropy=ent)
    kept = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    r = {(i, t): math.exp(float(logp[i, t] - old[i, t])) for i, t in kept}
    low = sum(1 for k in kept if r[k] < 0.8 and adv[k] < 0) / len(kept)
    high = sum(1 for k in kept if r[k] > 1.2 and adv[k] > 0) / len(kept)
    assert math.isclose(float(m["clip_frac_low"]), low) and math.isclose(float(m["clip_frac_high"]), high)
    assert math.isclose(float(m["ratio_mean"]), sum(r.values()) / len(kept), rel_tol=1e-12)
    assert math.isclose(float(m["ratio_max"]), max(r.values()), rel_tol=1e-12)
    assert math.isclose(float(m["ratio_min"]), min(r.values()), rel_tol=1e-12)
    kl = [math.exp(float(ref[k] - logp[k])) - float(ref[k] - logp[k]) - 1 for k in kept]
    assert math.isclose(float(m["kl"]), sum(kl) / len(kept), rel_tol=1e-12)
    assert math.isclose(float(m["approx_kl_old"]), sum(float(old[k] - logp[k]) for k in kept) / len(kept), rel_tol=1e-12)
    assert math.isclose(float(m["entropy"]), sum(float(ent[k]) for k in kept) / len(kept), rel_tol=1e-12)
    assert math.isclose(float(m["pg_loss"]), float(loss), rel_tol=1e-12)  # no coefficients: loss = pg
    assert all(not v.requires_grad for v in m.values())


def test_on_policy_gradient_is_plain_policy_gradient():
    """r = 1 everywhere: nothing is clipped and dL/dlogp = -A / n (token-mean)."""
    logp, _, adv, _, _, mask = make(seed=5)
    loss, (g,), (_, m) = grads(lambda lp: policy_loss(lp, logp.detach(), adv, mask), logp)
    n = mask.sum()
    torch.testing.assert_close(g, torch.where(mask, -adv / n, 0.0))
    assert float(m["clip_frac"]) == 0.0 and math.isclose(float(m["ratio_mean"]), 1.0)


def test_gspo_token_equals_sequence_gspo():
    """GSPO-token with per-sequence advantages and seq-mean-token-mean equals GSPO (value and
    gradient), written here at the sequence level with a differentiable s_i."""
    logp, old, adv, _, _, mask = make(seed=7, spread=0.5, per_seq_adv=True)
    lo, hi = 0.1, 0.15

    def gspo(lp):
        seqs = []
        for i in range(B):
            kept = [t for t in range(T) if mask[i, t]]
            if not kept:
                continue
            s = torch.exp(sum(lp[i, t] - old[i, t] for t in kept) / len(kept))
            a = float(adv[i])
            seqs.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - lo, 1 + hi)))
        return sum(seqs) / len(seqs)

    l1, (g1,), (_, m) = grads(lambda lp: policy_loss(lp, old, adv, mask, ratio="gspo_token", clip_low=lo, clip_high=hi), logp)
    l2, (g2,), _ = grads(gspo, logp)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    assert float(m["clip_frac"]) > 0  # some sequence ratios were clipped


def test_gspo_token_ratio_is_sequence_level():
    logp, old, adv, _, _, mask = make(seed=9, spread=2.0)
    _, m = policy_loss(logp, old, adv, mask, ratio="gspo_token")
    s = [math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(T) if mask[i, t]) / int(mask[i].sum()))
         for i in range(B) if mask[i].any()]
    assert math.isclose(float(m["ratio_max"]), max(s), rel_tol=1e-12)
    assert math.isclose(float(m["ratio_min"]), min(s), rel_tol=1e-12)


def test_dual_clip():
    logp, old, adv, _, _, mask = make(seed=11, spread=2.5)
    l1, (g1,), (_, m) = grads(lambda lp: policy_loss(lp, old, adv, mask, dual_clip=3.0), logp)
    l2, (g2,), _ = grads(lambda lp: naive(lp, old, adv, mask, lo=0.2, hi=0.2, ratio="token", agg="token-mean", dual=3.0), logp)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    assert float(m["dual_clip_frac"]) > 0


def test_garbage_at_dropped_positions():
    logp, old, adv, ref, ent, mask = make(seed=13)
    l_ref, (g_ref,), _ = grads(lambda lp: policy_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=0.1), logp)
    bad = ~mask
    lp2, old2, adv2, ref2 = logp.clone(), old.clone(), adv.clone(), ref.clone()
    lp2[bad], old2[bad], adv2[bad], ref2[bad] = float("nan"), float("inf"), float("nan"), -float("inf")
    l2, (g2,), _ = grads(lambda lp: policy_loss(lp, old2, adv2, mask, ref_logp=ref2, kl_coef=0.1), lp2)
    torch.testing.assert_close(l2, l_ref)
    torch.testing.assert_close(g2, g_ref)


@pytest.mark.parametrize("agg", AGGS)
def test_nothing_kept(agg):
    logp, old, adv, _, ent, _ = make()
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, (g, ge), (_, m) = grads(lambda lp, en: policy_loss(lp, old, adv, mask, aggregation=agg, entropy=en,
                                                             entropy_coef=0.1), logp, ent)
    assert float(loss) == 0.0 and (g == 0).all() and (ge == 0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_num_items_in_batch_and_aggregate():
    logp, old, adv, _, _, mask = make(seed=2)
    full, _ = policy_loss(logp, old, adv, mask)
    scaled, _ = policy_loss(logp, old, adv, mask, num_items_in_batch=100)
    torch.testing.assert_close(scaled, full * mask.sum() / 100)
    seq, _ = policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum")
    seq_n, _ = policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum", num_items_in_batch=6)
    torch.testing.assert_close(seq_n, seq * 3 / 6)  # 3 sequences have kept tokens
    v = torch.arange(B * T, dtype=torch.float64).view(B, T)
    torch.testing.assert_close(aggregate(v, mask, "token-mean"), v[mask].mean())
    with pytest.raises(ValueError):
        aggregate(v, mask, "sum")


def test_float32_and_float_mask():
    logp, old, adv, ref, ent, mask = make(seed=4)
    l64, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    l32, _ = policy_loss(logp.float(), old.float(), adv.float(), mask.float(), ref_logp=ref.float(), kl_coef=0.1)
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    logp, old, adv, ref, ent, mask = make()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, ratio="sequence")
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError):
        policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask.double() * 0.5)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError):
        policy_loss(logp[0], old[0], adv[0], mask[0])


def test_dual_clip_frac_against_naive():
    """``dual_clip_frac``: the kept tokens with ``A < 0`` whose clipped loss exceeds ``-c·A``."""
    logp, old, adv, _, _, mask = make(seed=11, spread=2.5)
    c = 3.0
    _, m = policy_loss(logp, old, adv, mask, dual_clip=c)
    kept = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    active = 0
    for k in kept:
        a, r = float(adv[k]), math.exp(float(logp[k] - old[k]))
        pg = max(-a * r, -a * min(max(r, 0.8), 1.2))
        active += a < 0 and pg > -a * c
    assert 0 < active < sum(1 for k in kept if adv[k] < 0)  # the data has active and inactive A < 0 tokens
    assert math.isclose(float(m["dual_clip_frac"]), active / len(kept), rel_tol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_negative_coefficients(agg):
    """A negative ``kl_coef`` / ``entropy_coef`` (a KL reward, an entropy penalty) enters the loss
    with its sign, like a positive one."""
    logp, old, adv, ref, ent, mask = make(seed=5)
    ours = lambda lp, en: policy_loss(lp, old, adv, mask, aggregation=agg, ref_logp=ref, kl_coef=-0.05,
                                      entropy=en, entropy_coef=-0.01)
    theirs = lambda lp, en: naive(lp, old, adv, mask, lo=0.2, hi=0.2, ratio="token", agg=agg, ref=ref,
                                  kl_coef=-0.05, ent=en, ent_coef=-0.01)
    l1, (g1, ge1), _ = grads(ours, logp, ent)
    l2, (g2, ge2), _ = grads(theirs, logp, ent)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge1, ge2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_nothing_kept_ratio_metrics(agg):
    """With no kept token the ratio's extremes are the neutral ratio 1 (not a min over nothing)."""
    logp, old, adv, _, _, _ = make()
    _, m = policy_loss(logp, old, adv, torch.zeros(B, T, dtype=torch.bool), aggregation=agg)
    assert float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0


def test_options_are_keyword_only():
    logp, old, adv, _, _, mask = make()
    with pytest.raises(TypeError):
        policy_loss(logp, old, adv, mask, 0.2)
