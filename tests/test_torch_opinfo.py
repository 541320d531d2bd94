"""Drop-in semantics, checked with PyTorch's own test samples: the OpInfo entries of
``nn.functional.cross_entropy`` and ``nn.functional.linear_cross_entropy``, called exactly as
torch's functions are called. Every sample either matches torch (loss and every gradient)
or is refused by name with a ValueError/TypeError; the documented differences are checked to
be exactly the refused ones:

* class probabilities as targets (float ``target``): refused (``target``);
* class-first K-dimensional inputs ``[N, C, d1, ...]``: our class dimension is last
  (``[B, T, V]``); such samples are compared after ``movedim(1, -1)`` instead;
* K-dimensional linear outputs (a 3-D or larger ``linear_weight``): refused
  (``linear_weight``).
"""

import pytest
import torch

import ranktuner_kernels as rk

common = pytest.importorskip("torch.testing._internal.common_methods_invocations",
                             reason="torch's OpInfo database needs expecttest")

OPS = {op.name: op for op in common.op_db
       if op.name in ("nn.functional.cross_entropy", "nn.functional.linear_cross_entropy")}


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    diff = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad((out * g).sum(), diff, allow_unused=True) if diff else []
    return out.detach(), grads


def _run(name, sample, ours):
    x, args, kw = sample.input, list(sample.args), dict(sample.kwargs)
    if name == "nn.functional.cross_entropy":
        target = args[0]
        move = x.dim() >= 3 and not target.dtype.is_floating_point  # class-first K-dim: our class is last

        def theirs(inp):
            return torch.nn.functional.cross_entropy(inp, target, *args[1:], **kw)

        def mine(inp):
            return rk.cross_entropy(inp.movedim(1, -1) if move else inp, target, *args[1:], **kw)
        return (mine if ours else theirs), [x]
    w, target = args[0], args[1]
    bias = kw.pop("linear_bias", None)

    def theirs(inp, ww, *b):
        return torch.nn.functional.linear_cross_entropy(inp, ww, target, linear_bias=b[0] if b else None, **kw)

    def mine(inp, ww, *b):
        return rk.linear_cross_entropy(inp, ww, target, linear_bias=b[0] if b else None, **kw)
    return (mine if ours else theirs), [x, w] + ([bias] if bias is not None else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_torch_samples(name, dtype):
    matched, refused = 0, []
    for sample in OPS[name].sample_inputs("cpu", dtype, requires_grad=True):
        fn, tensors = _run(name, sample, ours=False)
        want, want_grads = _grads(fn, tensors)
        fn, tensors = _run(name, sample, ours=True)
        try:
            got, got_grads = _grads(fn, tensors)
        except (ValueError, TypeError) as e:
            refused.append(str(e).split(":")[0])
            continue
        tol = dict(rtol=5e-6, atol=5e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, equal_nan=True, **tol)
        matched += 1
    # the refused samples are exactly the documented differences
    assert set(refused) <= {"target", "linear_weight"}, refused
    assert matched >= (11 if name == "nn.functional.cross_entropy" else 20), (matched, refused)
