"""Mixed precision: both losses under ``torch.autocast`` behave like ``F.linear`` /
``F.cross_entropy`` there, and every loss comes back in float32."""

import pytest
import torch
import torch.nn.functional as F

import ranktuner_kernels as rk
from helpers import DEVICE, rel_err

IMPLS = ["reference", "triton"]


def _setup(seed=0, n=12, d=16, v=90):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(v, d, generator=g) / 2).to(DEVICE).requires_grad_()
    b = torch.randn(v, generator=g).to(DEVICE).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[3] = -100
    return h, w, b, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weighting", ["sft", "ranktuner"])
def test_linear_under_autocast_matches_f_linear(weighting, impl):
    """fp32 parameters, bf16 autocast, hidden states requiring grad (what Trainer(bf16=True)
    does): same loss and gradients as F.linear + the loss on the autocast logits."""
    h, w, b, y = _setup()
    dev = h.device.type
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = rk.linear_cross_entropy(h, w, y, linear_bias=b, weighting=weighting, impl=impl, chunk_size=5)
    assert loss.dtype == torch.float32
    loss.backward()
    got = [t.grad.clone() for t in (h, w, b)]
    assert [g.dtype for g in got] == [torch.float32] * 3
    for t in (h, w, b):
        t.grad = None
    with torch.autocast(dev, dtype=torch.bfloat16):
        logits = F.linear(h, w, b)
        assert logits.dtype == torch.bfloat16
        want = rk.cross_entropy(logits, y, weighting=weighting, impl="reference")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    for a, t in zip(got, (h, w, b)):
        assert rel_err(a, t.grad) < 2e-2  # both round the logits and their gradient to bf16


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_under_autocast_and_float32_losses(impl):
    h, w, b, y = _setup(1)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        logits = F.linear(h, w, b)
        loss = rk.cross_entropy(logits, y, impl=impl)
        ref = F.cross_entropy(logits, y)
    assert loss.dtype == torch.float32 and ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        z = logits.detach().to(dtype)
        assert rk.cross_entropy(z, y, impl=impl).dtype == torch.float32
        assert rk.linear_cross_entropy(h.detach().to(dtype), w.detach().to(dtype), y, impl=impl).dtype == torch.float32
