"""Fused per-token log-probabilities and entropies (RL): values and gradients through both
against float64 autograd on materialised logits, both paths and implementations; and a
clipped policy-gradient loss through the fused-linear path against its float64 reference."""

import pytest
import torch

import ranktuner_kernels as rk
from helpers import DEVICE, rel_err
from ranktuner_kernels.rl import policy_loss

IMPLS = ["reference", "triton"]


def _data(seed=0, b=2, t=5, d=12, v=70):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, 0] = -100
    a = torch.randn(b, t, generator=g, dtype=torch.float64)
    c = torch.randn(b, t, generator=g, dtype=torch.float64)
    return h, w, bias, y, a, c


def _oracle(logits, y, temperature, softcap):
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(z / temperature, -1)
    keep = y != -100
    logp = torch.where(keep, logp_all.gather(-1, y.clamp_min(0)[..., None])[..., 0], 0)
    ent = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0)
    return logp, ent


@pytest.mark.parametrize("opts", [dict(temperature=1.0, softcap=None), dict(temperature=0.6, softcap=3.0)], ids=["plain", "T_cap"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_logprobs_and_entropy_with_gradients_through_both(path, impl, opts):
    h, w, bias, y, a, c = _data()
    y = y.to(DEVICE)
    a, c = a.to(DEVICE), c.to(DEVICE)

    def run(dtype, fn):
        params = [t.to(DEVICE, dtype).requires_grad_() for t in (h, w, bias)]
        logp, ent = fn(*params)
        ((logp * a.to(logp.dtype)).sum() + (ent * c.to(ent.dtype)).sum()).backward()
        return logp.detach(), ent.detach(), [p.grad for p in params]

    def ours(hh, ww, bb):
        if path == "logits":
            return rk.logprobs(hh @ ww.T + bb, y, impl=impl, **opts)
        return rk.linear_logprobs(hh, ww, y, linear_bias=bb, chunk_size=3, impl=impl, **opts)

    lp, en, grads = run(torch.float32, ours)
    lp64, en64, grads64 = run(torch.float64, lambda hh, ww, bb: _oracle(hh @ ww.T + bb, y, **opts))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(en.double(), en64, rtol=1e-5, atol=1e-6)
    assert torch.all(lp[y == -100] == 0) and torch.all(en[y == -100] == 0)
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < 1e-5


def test_no_grad_is_the_statistics_pass_only(monkeypatch):
    from ranktuner_kernels import _chunks

    h, w, bias, y, _, _ = _data()
    calls = []
    monkeypatch.setattr(_chunks.Grads, "add_chunk", lambda *a: calls.append(1))
    with torch.no_grad():
        lp, _ = rk.linear_logprobs(h.float().requires_grad_(), w.float().requires_grad_(), y, chunk_size=2)
    assert not calls and not lp.requires_grad


@pytest.mark.parametrize("ratio", ["token", "gspo_token"])
def test_clipped_policy_loss_through_the_fused_linear_path(ratio):
    """GRPO/GSPO on log-probabilities from hidden states: gradients w.r.t. the hidden states
    and the head equal float64 autograd through materialised logits."""
    h, w, bias, y, adv, _ = _data(3)
    mask = y != -100
    g = torch.Generator().manual_seed(5)
    old = torch.where(mask, _oracle(h @ w.T, y, 1.0, None)[0] + 0.3 * torch.randn(y.shape, generator=g,
                                                                                   dtype=torch.float64), 0)

    def loss_of(logp, ent):
        loss, _ = policy_loss(logp, old.to(logp.dtype), adv.to(logp.dtype), mask, ratio=ratio, entropy=ent,
                              entropy_coef=0.01)
        return loss

    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    loss_of(*rk.linear_logprobs(hh, ww, y, chunk_size=4)).backward()
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_of(*_oracle(h64 @ w64.T, y, 1.0, None)).backward()
    assert rel_err(hh.grad, h64.grad) < 1e-4 and rel_err(ww.grad, w64.grad) < 1e-4
