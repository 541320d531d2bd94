"""The fused linear path's two weight-gradient policies told apart, each by what it promises:
``"accurate"`` rounds the weight gradient once (a float32 accumulator, cast at the end), so its
bf16 error does not grow with the number of row chunks; ``"compact"`` adds each chunk into the
weight-dtype gradient, so its error grows with the chunks, and it holds no float32 copy of
``dW``. dh does not depend on the policy."""

import pytest
import torch

import ranktuner_kernels as rk
from helpers import DEVICE, ON_GPU, rel_err
from test_linear import make_head

def bf16_errors(impl, runs, n=128, d=32, v=300):
    """``{(policy, chunk_size): (dh error, dW error)}`` of the fused loss in bf16, relative to
    the float64 gradients of the same bf16 inputs."""
    h, w, _, target = make_head((n,), d, v, torch.bfloat16, False, seed=4)
    hh, ww = (t.detach().double().requires_grad_() for t in (h, w))
    rk.cross_entropy(hh @ ww.T, target, impl="reference").backward()
    exact = (hh.grad, ww.grad)
    err = {}
    for policy, chunk_size in runs:
        hh, ww = (t.detach().requires_grad_() for t in (h, w))
        rk.linear_cross_entropy(hh, ww, target, acc_policy=policy, chunk_size=chunk_size, impl=impl).backward()
        assert ww.grad.dtype == torch.bfloat16 and hh.grad.dtype == torch.bfloat16
        err[policy, chunk_size] = (rel_err(hh.grad, exact[0]), rel_err(ww.grad, exact[1]))
    return err


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.slow)])
def test_each_policy_by_its_bf16_error(impl):
    """32 chunks against one: the accurate policy's dW error stays that of one rounding (within
    2 %), the compact one's grows by more than 1.2x (measured 0.00485 -> 0.00629 at N = 128);
    dh does not depend on the policy."""
    err = bf16_errors(impl, [("compact", 4), ("accurate", 4), ("accurate", 128), ("compact", 128)])
    assert err["compact", 4][0] == err["accurate", 4][0]  # dh: the policy does not enter
    one = err["accurate", 128][1]
    assert err["compact", 128][1] == pytest.approx(one, rel=0.01)  # one chunk: one rounding either way
    assert err["accurate", 4][1] <= 1.02 * one, err
    assert err["compact", 4][1] >= 1.2 * one, err


@pytest.mark.parametrize("policy, dw_dtype", [("compact", torch.bfloat16), ("accurate", torch.float32),
                                              ("auto", torch.bfloat16)])
def test_each_policy_by_the_memory_it_holds(monkeypatch, policy, dw_dtype):
    """The weight-gradient buffer each policy keeps through the backward sweep: ``2 V D`` bytes
    for compact (the default for 16-bit weights), ``4 V D`` for accurate."""
    from ranktuner_kernels import _chunks

    held = []
    real = _chunks.Grads.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        held.append(self.dw)

    monkeypatch.setattr(_chunks.Grads, "__init__", spy)
    h, w, _, target = make_head((16,), 8, 40, torch.bfloat16, False)
    hh, ww = (t.detach().requires_grad_() for t in (h, w))
    rk.linear_cross_entropy(hh, ww, target, acc_policy=policy, chunk_size=4).backward()
    assert held and all(t.dtype == dw_dtype and t.shape == w.shape for t in held)
    assert held[0].nbytes == (4 if dw_dtype == torch.float32 else 2) * w.numel()
    assert ww.grad.dtype == torch.bfloat16


@pytest.mark.gpu
def test_gpu_peak_memory_of_each_policy():
    """On CUDA (no float32 temporaries in a bf16 GEMM): accurate peaks above compact by about
    the float32 accumulator, 4 V D bytes (at least 2 V D asserted)."""
    assert ON_GPU
    n, d, v = 512, 1024, 32768
    peaks = {}
    for policy in ("compact", "accurate"):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g).bfloat16().to(DEVICE).requires_grad_()
        w = (torch.randn(v, d, generator=g) / d**0.5).bfloat16().to(DEVICE).requires_grad_()
        target = torch.randint(0, v, (n,), generator=g).to(DEVICE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        rk.linear_cross_entropy(h, w, target, acc_policy=policy, chunk_size=64).backward()
        torch.cuda.synchronize()
        peaks[policy] = torch.cuda.max_memory_allocated() - base
    assert peaks["accurate"] - peaks["compact"] >= 2 * v * d, peaks
