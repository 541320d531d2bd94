"""The log-probability custom ops (``ranktuner::logprobs``, ``ranktuner::linear_logprobs`` and
their backward ops) in 16-bit and float32: ``torch.library.opcheck`` (schema, fake
implementation against the real one, autograd registration), and ``torch.compile`` of
``rk.logprobs`` / ``rk.linear_logprobs`` giving eager's output dtypes (float32 for 16-bit
inputs) and values.

``tests/test_compile.py`` opchecks the loss ops and compiles the log-probability functions in
float32 only; a fake implementation that gives 16-bit outputs for 16-bit inputs (where the op
returns float32) passed it.
"""

import pytest
import torch

import ranktuner_kernels as rk
from ranktuner_kernels import _call, _ops

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

KINDS = ["logprobs", "linear_logprobs"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
#: the Triton implementation runs under the interpreter on CPU: the same fake, its own real outputs
IMPLS = ["reference", "triton"]


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


def op_cases(kind, dtype, impl):
    """``[(op, args)]``: the forward op and its backward op, with the arguments the public
    function passes them (the backward's saved tensors from a real forward)."""
    tensors, target = inputs(kind, dtype)
    g = torch.Generator().manual_seed(1)
    if kind == "logprobs":
        call = _call.prepare("logprobs", tensors[0], target, reduction="none", temperature=0.7, impl=impl)
        head = (call.input, call.target, list(call.params.shape))
        fwd = (_ops.logprobs_op, (*head, _ops.key_of(call.params)))
    else:
        call = _call.prepare("linear_logprobs", tensors[0], target, linear_weight=tensors[1],
                             linear_bias=tensors[2], reduction="none", temperature=0.7, chunk_size=4, impl=impl)
        head = (call.input, call.linear_weight, call.linear_bias, call.target, list(call.params.shape),
                call.params.rows)
        fwd = (_ops.linear_logprobs_op, (*head, _ops.key_of(call.params)))
    with torch.no_grad():
        logp, ent, lse = fwd[0](*fwd[1])
    grads = [torch.rand(logp.shape, generator=g, dtype=logp.dtype) for _ in range(2)]
    if kind == "logprobs":
        bwd = (_ops.logprobs_backward_op, (*grads, *head[:2], lse, logp, ent, *head[2:], _ops.key_of(call.params)))
    else:
        bwd = (_ops.linear_logprobs_backward_op,
               (*grads, *head[:4], lse, logp, ent, *head[4:], [True, True, True], _ops.key_of(call.params)))
    return [fwd, bwd]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_logprobs_ops(kind, dtype, impl):
    """Each op's fake implementation gives the real outputs' shapes, dtypes (float32 logp,
    entropy and lse for 16-bit inputs; the inputs' dtypes for the gradients) and devices."""
    for op, args in op_cases(kind, dtype, impl):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


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
