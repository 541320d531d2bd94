"""``torch.compile`` of ``rk.logprobs`` / ``rk.linear_logprobs`` on 16-bit inputs gives eager's
output dtypes (float32) and values, with code after the op that reads its outputs' dtype (the ops'
``opcheck`` in 16 bits is in ``tests/test_compile.py``). A fake implementation that gave 16-bit
outputs for 16-bit inputs passed the suite once: under inductor it silently reads the float32
buffer as 16-bit values.
"""

import pytest
import torch

import ranktuner_kernels as rk

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

KINDS = ["logprobs", "linear_logprobs"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def inputs(kind, dtype, seed=0):
    """``[2, 5, 13]`` logits (or ``[2, 5, 8]`` hidden states, a ``[13, 8]`` head and a bias) of
    ``dtype`` requiring grad, and ``[2, 5]`` targets with an ignored one."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 13, (2, 5), generator=g)
    target[0, 1] = -100
    if kind == "logprobs":
        tensors = [torch.randn(2, 5, 13, generator=g) * 3]
    else:
        tensors = [torch.randn(2, 5, 8, generator=g), torch.randn(13, 8, generator=g) / 2, torch.randn(13, generator=g)]
    return [t.to(dtype).requires_grad_() for t in tensors], target


#: dynamo's own trace ("eager": where the fake's dtype shows first), AOTAutograd with the
#: registered backward ("aot_eager"), and inductor, whose generated code reads the op's outputs
#: as the fake declares them (a C++ build: slow)
BACKENDS = ["eager", "aot_eager"]
COMPILED = [(kind, dtype, backend) for kind in KINDS for dtype in (torch.bfloat16, torch.float16) for backend in BACKENDS]
COMPILED += [pytest.param(kind, torch.bfloat16, "inductor", marks=pytest.mark.slow) for kind in KINDS]


@pytest.mark.parametrize("kind, dtype, backend", COMPILED, ids=str)
def test_compiled_logprobs_keep_eagers_dtypes(kind, dtype, backend):
    """``torch.compile(fullgraph=True)`` of the public function on 16-bit inputs, with ops after
    it that read its outputs' dtype: every output's dtype (float32) and value, and the inputs'
    gradients (their own dtypes), equal eager's."""
    fn = rk.logprobs if kind == "logprobs" else rk.linear_logprobs

    def f(*args):
        tensors, target = args[:-1], args[-1]
        kw = {} if kind == "logprobs" else dict(linear_bias=tensors[2], chunk_size=4)
        logp, ent = fn(*tensors[:2], target, temperature=0.7, impl="reference", **kw)
        # the graph after the op is traced with the fake's dtypes: a buffer created in logp's
        # dtype (a sequence log-probability accumulator), and a fused elementwise op
        seq = torch.zeros(logp.shape[0], dtype=logp.dtype).add_(logp.sum(-1))
        scaled = logp * 2 + ent
        return logp, ent, seq, scaled, seq.sum() + scaled.sum()

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    results = []
    for run in (compiled, f):
        tensors, target = inputs(kind, dtype)
        if kind == "logprobs":
            tensors = tensors[:1]
        *out, total = run(*tensors, target)
        total.backward()
        results.append(([*out, total], [t.grad for t in tensors]))
    (out_c, grads_c), (out_e, grads_e) = results
    assert [o.dtype for o in out_e] == [torch.float32] * 5
    assert [o.dtype for o in out_c] == [o.dtype for o in out_e]
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b)
    assert [g.dtype for g in grads_c] == [g.dtype for g in grads_e] == [dtype] * len(grads_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
