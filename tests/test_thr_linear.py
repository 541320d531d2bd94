"""THR from hidden states and the LM head (``rl.linear_token_hidden_reward`` and
``rl.linear_thr_guided_advantages``) against the logits form on the logits it never forms
(itself checked against the pair-by-pair definition in ``test_thr.py``): float64 to 1e-10,
float32/bf16 within 3x the logits form's own error against float64; groups, ignored and masked
tokens, a bias, temperature and soft-cap, ragged vocabulary chunks, strided inputs."""

import pytest
import torch

from helpers import rel_err
from ranktuner_kernels.reference import Transform
from ranktuner_kernels.reference import thr as ref
from ranktuner_kernels.reference.transform import apply as apply_transform
from ranktuner_kernels.rl import (linear_thr_guided_advantages, linear_token_hidden_reward, thr_guided_advantages,
                                  token_hidden_reward)
from thr_cases import DEVICE, every_other, stored_as

OPTIONS = {"plain": {}, "bias": {"bias": True}, "temp_cap": {"temperature": 0.7, "softcap": 30.0},
           "all": {"bias": True, "temperature": 1.3, "softcap": 20.0}}


def head_case(b=6, t=7, d=13, v=97, seed=0, bias=False):
    """Hidden states pulled towards their token's head row by a random amount: logits up to
    about 40, tokens from near-certain (1 - 1e-8) to unlikely (1e-8); three groups of two
    responses (group ids out of order, the last group without a correct one), padding and a
    masked span."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 1.5
    tokens = torch.randint(0, v, (b, t), generator=g)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    h = h + torch.rand(b, t, 1, generator=g, dtype=torch.float64) * 0.6 * w[tokens]
    tokens[0, -2:] = -100
    tokens[3, -1] = -100
    tokens[2, 0] = tokens[0, 0]  # a repeated token across responses
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    correct = torch.tensor([True, False, True, True, False, False][:b])
    group = torch.tensor([1, 0, 0, 1, 2, 2][:b])  # not sorted, a wrong response first in group 0
    bias_t = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    return h, w, bias_t, tokens, correct, group, mask


def logits_of(h, w, bias, temperature=1.0, softcap=None):
    z = h @ w.T + (0 if bias is None else bias)
    return apply_transform(z, Transform(softcap, temperature))


def run_both(case, dtype, opts, impl="naive", **kw):
    """``(linear, logits form)`` THR of ``case`` cast to ``dtype``; the logits form gets the
    logits computed in float32 (float64 for float64) from the cast inputs, as the fused-linear
    form computes its chunks."""
    h, w, bias, tokens, correct, group, mask = case
    h, w = h.to(dtype), w.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    tr = {k: opts[k] for k in ("temperature", "softcap") if k in opts}
    lin = linear_token_hidden_reward(h, w, tokens, correct, group, linear_bias=bias, mask=mask, **tr, **kw)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    z = logits_of(h.to(work), w.to(work), None if bias is None else bias.to(work), **tr)
    hid = None if kw.get("hidden_factor") is False else h
    form = token_hidden_reward(z, tokens, correct, group, mask=mask, hidden=hid,
                               normalize=kw.get("normalize", "none"), impl=impl)
    return lin, form


@pytest.mark.parametrize("chunk_size", [None, 16, 1000])
@pytest.mark.parametrize("normalize", ["none", "length"])
@pytest.mark.parametrize("hidden_factor", [True, False], ids=["hidden", "no_hidden"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=str)
def test_float64_matches_logits_form(opts, hidden_factor, normalize, chunk_size):
    opts = OPTIONS[opts]
    case = head_case(seed=1, bias=opts.get("bias", False))
    lin, form = run_both(case, torch.float64, opts, hidden_factor=hidden_factor, normalize=normalize,
                         chunk_size=chunk_size)
    assert lin.dtype == torch.float64 and lin.shape == form.shape
    torch.testing.assert_close(lin, form, rtol=1e-10, atol=1e-10 * float(form.abs().max()))
    assert (lin[case[3] == -100] == 0).all() and (lin[1, 4:] == 0).all() and (lin[4:] == 0).all()
    assert (lin[:4][(case[3][:4] != -100) & (case[6][:4] != 0)] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", ["plain", "all"])
def test_low_precision_within_logits_forms_error(dtype, opts):
    """Against float64 on the same (rounded) inputs, the fused-linear THR is no further than 3x
    the logits form's error (float32 logits of those inputs, THR's float32 streaming path)."""
    opts = OPTIONS[opts]
    case = head_case(b=6, t=9, d=24, v=301, seed=2, bias=opts.get("bias", False))
    rounded = [x.to(dtype).double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in case]
    exact, _ = run_both(rounded, torch.float64, opts, chunk_size=64)
    lin, form = run_both(case, dtype, opts, impl="reference", chunk_size=64)
    assert lin.dtype == torch.float32
    ours, theirs = rel_err(lin, exact), rel_err(form, exact)
    assert ours <= 3 * theirs + 1e-7, (ours, theirs)


def test_guided_advantages_match_the_logits_form():
    case = head_case(seed=3, bias=True)
    h, w, bias, tokens, correct, group, mask = case
    adv = torch.tensor([1.0, -1.0, 0.7, 0.7, -0.5, 0.5], dtype=torch.float64)
    opts = dict(temperature=0.9, softcap=25.0)
    out, info = linear_thr_guided_advantages(h, w, tokens, adv, correct, group, linear_bias=bias, mask=mask, p=0.2,
                                             chunk_size=10, **opts)
    z = logits_of(h, w, bias, **opts)
    want, info_w = thr_guided_advantages(z, tokens, adv, correct, group, mask=mask, hidden=h, p=0.2, impl="reference")
    for key in ("thr", "entropy"):
        torch.testing.assert_close(info[key], info_w[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for key in ("high_thr", "high_entropy", "active"):
        assert torch.equal(info[key], info_w[key])
    keep = (tokens != -100) & (mask != 0)
    assert (out[keep & info["active"]] == 0).any() and (out[keep] != 0).any()  # the rule selected tokens


def test_lse_and_entropy_pass():
    """The chunked statistics against logsumexp and -Σ p log p, float64 and float32, with
    near-certain rows (entropy ~1e-7: no cancellation of two ~40-sized numbers in float32)."""
    h, w, bias, *_ = head_case(seed=4, bias=True)
    h, tr = h.reshape(-1, h.shape[-1]), Transform(30.0, 0.8)
    z = logits_of(h, w, bias, 0.8, 30.0)
    lse_w = torch.logsumexp(z, -1)
    logp = torch.log_softmax(z, -1)
    ent_w = -(logp.exp() * logp).sum(-1)
    lse, ent = ref.linear_lse_entropy(h, w, bias, transform=tr, chunk=7)
    torch.testing.assert_close(lse, lse_w, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(ent, ent_w, rtol=1e-10, atol=1e-13)
    lse32, ent32 = ref.linear_lse_entropy(h.float(), w.float(), bias.float(), transform=tr, chunk=7)
    assert lse32.dtype == torch.float32
    assert float((lse32.double() - lse_w).abs().max()) < 1e-5
    assert float(((ent32.double() - ent_w).abs() / (ent_w + 1e-3)).max()) < 1e-3


def test_strided_inputs_and_untouched_arguments():
    h, w, bias, tokens, correct, group, mask = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x
                                                for x in head_case(seed=5, bias=True)]
    h, w, bias = h.float(), w.float(), bias.float()
    want = linear_token_hidden_reward(h, w, tokens, correct, group, linear_bias=bias, mask=mask, chunk_size=32)
    for hv in (stored_as(h, [1, 0, 2]), every_other(h)):
        for wv in (stored_as(w, [1, 0]), every_other(w)):
            before = (hv.clone(), wv.clone())
            got = linear_token_hidden_reward(hv, wv, tokens, correct, group, linear_bias=every_other(bias),
                                             mask=mask, chunk_size=32)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
            assert torch.equal(hv, before[0]) and torch.equal(wv, before[1])


def test_never_forms_more_than_a_chunk(monkeypatch):
    """Every logits block the function forms is ``[kept tokens, <= chunk_size]``."""
    h, w, bias, tokens, correct, group, mask = head_case(v=500, seed=6)
    shapes = []
    real = ref._head_logits
    monkeypatch.setattr(ref, "_head_logits", lambda *a: shapes.append(real(*a).shape) or real(*a))
    linear_thr_guided_advantages(h, w, tokens, torch.ones(6), correct, group, mask=mask, chunk_size=64)
    kept = int(((tokens != -100) & (mask != 0)).sum())
    assert shapes and all(s[0] == kept and s[1] <= 64 for s in shapes)
    assert sum(s[1] for s in shapes) == 2 * 500  # two passes over the vocabulary


def test_nan_in_nan_out_and_edge_cases():
    h, w, bias, tokens, correct, group, mask = head_case(seed=7)
    h_nan = h.clone()
    h_nan[0, 1, 3] = float("nan")  # a kept token of a correct response of group 1 (responses 0 and 3)
    thr = linear_token_hidden_reward(h_nan, w, tokens, correct, group, mask=mask)
    kept = (tokens != -100) & (mask != 0)
    assert thr[[0, 3]][kept[[0, 3]]].isnan().all()
    assert not thr[[1, 2, 4, 5]].isnan().any()
    none = linear_token_hidden_reward(h, w, tokens, torch.zeros(6, dtype=torch.bool), group)
    assert (none == 0).all()
    empty = linear_token_hidden_reward(h, w, torch.full_like(tokens, -100), correct, group)
    assert empty.shape == tokens.shape and (empty == 0).all()
    one = linear_token_hidden_reward(h[:1, :1], w, tokens[:1, :1], torch.tensor([True]))
    z = logits_of(h[0, 0], w, None)
    q = torch.nn.functional.one_hot(tokens[0, 0], w.shape[0]).double() - torch.softmax(z, -1)
    torch.testing.assert_close(one[0, 0], (q @ q) * (h[0, 0] @ h[0, 0]), rtol=1e-10, atol=0)


def test_bad_inputs():
    h, w, bias, tokens, correct, group, mask = head_case()
    call = linear_token_hidden_reward
    cases = [
        (ValueError, "hidden", lambda: call(h[0], w, tokens, correct)),
        (ValueError, "linear_weight", lambda: call(h, w[0], tokens, correct)),
        (ValueError, "hidden", lambda: call(h[..., :-1], w, tokens, correct)),
        (ValueError, "linear_bias", lambda: call(h, w, tokens, correct, linear_bias=torch.zeros(3))),
        (TypeError, "hidden", lambda: call(h.long(), w, tokens, correct)),
        (TypeError, "tokens", lambda: call(h, w, tokens.double(), correct)),
        (ValueError, "tokens", lambda: call(h, w, tokens.clamp_min(0) + 97, correct)),
        (ValueError, "correct", lambda: call(h, w, tokens, correct[:3])),
        (ValueError, "group_index", lambda: call(h, w, tokens, correct, group[:3])),
        (ValueError, "mask", lambda: call(h, w, tokens, correct, mask=mask[:, :3])),
        (ValueError, "temperature", lambda: call(h, w, tokens, correct, temperature=0.0)),
        (ValueError, "softcap", lambda: call(h, w, tokens, correct, softcap=-1.0)),
        (ValueError, "chunk_size", lambda: call(h, w, tokens, correct, chunk_size=0)),
        (ValueError, "normalize", lambda: call(h, w, tokens, correct, normalize="mean")),
        (ValueError, "p", lambda: linear_thr_guided_advantages(h, w, tokens, torch.ones(6), correct, p=3.0)),
    ]
    for exc, name, fn in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_zero_softcap_is_refused():
    """``softcap`` divides the logits (``c tanh(z / c)``): 0 is refused like a negative one."""
    h, w, bias, tokens, correct, group, mask = head_case()
    with pytest.raises(ValueError, match="softcap"):
        linear_token_hidden_reward(h, w, tokens, correct, softcap=0.0)
