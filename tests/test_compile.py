"""torch.compile: the losses are custom ops (``ranktuner_kernels._ops``), so compiled code
traces them with no graph break and no recompilation on later steps, with values and
gradients equal to eager; and eager users never import ``torch._dynamo``.

The compiled runs use the ``aot_eager`` backend (dynamo + AOTAutograd with the ops' fake
implementations and registered autograd, no C++ compiler needed); the Triton implementation
runs under the interpreter on CPU, inside the compiled graph (the op bodies run eagerly).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import ranktuner_kernels as rk
from ranktuner_kernels import _ops

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

#: the Triton cases run the interpreter inside the compiled graph: several seconds each
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.slow)]
STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t.clone()
            for t in tensors]


def _flat(out):
    """The tensors of a loss result: ``loss``, ``(loss, stats)``, ``(logp, entropy)``."""
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for x in out:
        flat.extend(x[k] for k in sorted(x)) if isinstance(x, dict) else flat.append(x)
    return flat


def check_compiled(fn, make_inputs, steps=STEPS, backend="aot_eager"):
    """Run ``fn(*inputs, g)`` compiled (``fullgraph=True``: a graph break raises) and eagerly for
    ``steps`` batches of one shape, with upstream gradients ``g`` of 1, 0.7 and 2 (the fused
    path's stored-gradient and recompute branches); outputs and the inputs' gradients must
    match, and the compiled function must be compiled once."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for step in range(steps):
        inputs = make_inputs(step)
        g = torch.tensor((1.0, 0.7, 2.0)[step % 3])
        results = []
        for f in (compiled, fn):
            leaves = _leaves(inputs)
            out = _flat(f(*leaves, g))
            # the differentiable outputs (the loss; or logp and entropy), times a random weight
            w = torch.Generator().manual_seed(step)
            total = sum((o.double() * torch.rand(o.shape, generator=w, dtype=torch.float64)).sum()
                        for o in out[:2] if o.requires_grad)
            total.backward()
            results.append((out, [t.grad for t in leaves if t.requires_grad]))
        (out_c, grads_c), (out_e, grads_e) = results
        assert len(out_c) == len(out_e)
        for a, b in zip(out_c, out_e):
            torch.testing.assert_close(a, b, equal_nan=True)
            assert a.requires_grad == b.requires_grad
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations for {steps} steps"


def _logits_batch(b=2, t=5, v=13):
    def make(step):
        gen = torch.Generator().manual_seed(100 + step)
        logits = (torch.randn(b, t, v, generator=gen) * 3).requires_grad_()
        target = torch.randint(0, v, (b, t), generator=gen)
        target[0, 1] = -100
        return [logits, target]
    return make


def _hidden_batch(b=2, t=5, d=8, v=13, bias=False):
    def make(step):
        gen = torch.Generator().manual_seed(200 + step)
        h = torch.randn(b, t, d, generator=gen).requires_grad_()
        w = (torch.randn(v, d, generator=gen) / 2).requires_grad_()
        target = torch.randint(0, v, (b, t), generator=gen)
        target[1, 0] = -100
        out = [h, w, target]
        if bias:
            out.append(torch.randn(v, generator=gen).requires_grad_())
        return out
    return make


# (weighting, extra options): row-local (fused into the Triton statistics kernel), batch-level
# (TALR's median), a config object (interned by its repr), an entropy term (beta), and the
# optional outputs (z-loss, label smoothing)
CASES = [
    ("dft", {}),
    ("talr", {}),
    (rk.RankTuner(xi="geo"), {"z_loss": 1e-3, "label_smoothing": 0.1}),
    ("entropy_reg", {"reduction": "sum"}),
]


def _cid(case):
    weighting, opts = case
    return "-".join([str(getattr(weighting, "name", weighting)), *opts])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_cross_entropy_compiled(case, impl):
    weighting, opts = case

    def fn(logits, target, g):
        loss, stats = rk.cross_entropy(logits, target, weighting=weighting, impl=impl, return_stats=True, **opts)
        return loss * g, stats

    check_compiled(fn, _logits_batch())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_linear_cross_entropy_compiled(case, impl):
    weighting, opts = case
    bias = weighting == "entropy_reg"

    def fn(h, w, target, *rest):
        *b, g = rest
        loss, stats = rk.linear_cross_entropy(h, w, target, linear_bias=b[0] if b else None, weighting=weighting,
                                              impl=impl, return_stats=True, chunk_size=4, **opts)
        return loss * g, stats

    check_compiled(fn, _hidden_batch(bias=bias))


def test_cross_entropy_none_reduction_compiled():
    def fn(logits, target, g):
        return rk.cross_entropy(logits, target, weighting="dft", reduction="none", impl="reference") * g

    check_compiled(fn, _logits_batch())


@pytest.mark.parametrize("return_stats", [False, ("log_sum_p2", "is_top1")], ids=["plain", "stats"])
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_compiled(impl, return_stats):
    def fn(logits, target, g):
        logp, ent, *stats = rk.logprobs(logits, target, temperature=0.7, impl=impl, return_stats=return_stats)
        return logp * g, ent, *stats

    check_compiled(fn, _logits_batch())


@pytest.mark.parametrize("return_stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_compiled(impl, return_stats):
    def fn(h, w, target, b, g):
        logp, ent, *stats = rk.linear_logprobs(h, w, target, linear_bias=b, impl=impl, chunk_size=4,
                                               return_stats=return_stats)
        return logp * g, ent, *stats

    check_compiled(fn, _hidden_batch(bias=True))


@pytest.mark.slow
def test_inductor_compiled():
    """The default backend (inductor, C++ on CPU) around the fused loss's op."""
    def fn(h, w, target, g):
        loss, stats = rk.linear_cross_entropy(h, w, target, weighting="dft", impl="reference", return_stats=True)
        return loss * g, stats

    check_compiled(fn, _hidden_batch(), backend="inductor")


def test_new_shapes_recompile_once_then_dynamic():
    """A new sequence length recompiles once, with dynamic shapes (the ops take ``shape`` and
    ``rows`` as arguments, not in the interned key); later lengths reuse that graph."""
    counter = CompileCounterWithBackend("aot_eager")

    def fn(h, w, target):
        loss, stats = rk.linear_cross_entropy(h, w, target, weighting="talr", impl="reference", chunk_size=3,
                                              return_stats=True)
        per_token = rk.cross_entropy(h @ w.T, target, weighting="dft", reduction="none", impl="reference")
        return loss + per_token.sum(), stats["entropy"]

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for step, t in enumerate((5, 7, 9, 4)):
        inputs = _hidden_batch(t=t)(step)
        results = []
        for f in (compiled, fn):
            leaves = _leaves(inputs)
            loss, entropy = f(*leaves)
            loss.backward()
            results.append((loss, entropy, leaves[0].grad, leaves[1].grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, equal_nan=True)
    assert counter.frame_count == 2


def test_no_grad_compiled():
    """Under no_grad the fused path forms no gradient in forward (the op's ``needs``)."""
    make = _hidden_batch()

    def fn(h, w, target):
        with torch.no_grad():
            return rk.linear_cross_entropy(h, w, target, weighting="dft", impl="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = make(0)
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))


def test_bad_target_raises_at_run_time():
    """The target-range check (a read-back) runs inside the op when compiled."""
    def fn(logits, target):
        return rk.cross_entropy(logits, target, impl="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    logits, target = _logits_batch()(0)
    target[1, 2] = 99
    with pytest.raises(ValueError, match="target: value 99"):
        compiled(logits, target)


def test_inplace_backward_runs_eagerly_when_compiled():
    """``inplace_backward=True`` cannot be an op (it hands the logits' memory back as their
    gradient): the call runs eagerly (one graph break), with eager's values and gradients."""
    def fn(x, target):
        return rk.cross_entropy(x * 1.5, target, weighting="dft", impl="reference", inplace_backward=True) * 2

    logits, target = _logits_batch()(0)
    assert dynamo.explain(fn)(logits.detach(), target).graph_break_count == 1
    results = []
    for f in (torch.compile(fn, backend="aot_eager"), fn):
        x = logits.detach().clone().requires_grad_()
        loss = f(x, target)
        loss.backward()
        results.append((loss, x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_eager_functions_break_the_graph_once():
    """``token_stats`` stays eager inside compiled code (one graph break, no recompilation)."""
    def fn(logits, target):
        return rk.token_stats(logits * 2, target, impl="reference")["entropy"].nansum()

    logits, target = _logits_batch()(0)
    explained = dynamo.explain(fn)(logits, target)
    assert explained.graph_break_count == 1
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter)
    for step in range(STEPS):
        logits, target = _logits_batch()(step)
        torch.testing.assert_close(compiled(logits, target), fn(logits, target))
    assert counter.frame_count == 2  # the graphs before and after the break, each compiled once


def _opcheck_args(kind, dtype=torch.float32, impl="reference"):
    """The forward op of ``kind`` and its arguments: the tensors (``spec.inputs``, the floating
    ones in ``dtype``), the shape, rows, requires-grad flags and the interned settings key."""
    from ranktuner_kernels import _dispatch, _params, _schema

    weighting = "talr" if kind.endswith("talr") else "dft"
    extra = frozenset(rk.reference.OPTIONAL_STATS) if kind.endswith("stats") else frozenset()
    params = _params.LossParams(rk.weightings.resolve(weighting), _dispatch.BACKENDS[impl], (),
                                acc_policy="compact", asked_stats=extra)
    key = _ops.key_of(params)
    if kind.startswith(("token_loss", "logprobs")):
        logits, target = _logits_batch()(0)
        logits = logits.detach().to(dtype).requires_grad_()
        if kind.startswith("logprobs"):
            tensors, spec = [logits, target.reshape(-1)], _schema.LOGPROBS
        else:
            norm = torch.tensor(float((target != -100).sum()))
            tensors, spec = [logits, target.reshape(-1), None, norm], _schema.TOKEN_LOSS
        rows = 0
    else:
        h, w, target, b = _hidden_batch(bias=True)(0)
        if kind.startswith("linear_loss_bf16"):  # gradients in backward only (TALR): 16-bit placeholders
            h, w, b = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
        if dtype != torch.float32:
            h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h, w, b))
        h = h.reshape(-1, h.shape[-1])
        if kind.startswith("linear_logprobs"):
            tensors, spec = [h, w, b, target.reshape(-1)], _schema.LINEAR_LOGPROBS
        else:
            norm = torch.tensor(float((target != -100).sum()))
            tensors, spec = [h, w, b, target.reshape(-1), None, norm], _schema.LINEAR_LOSS
        rows = 4
    needs = [t is not None and t.requires_grad for t in tensors]
    given = [t is not None for t in tensors]
    tensors = [torch.empty(0) if t is None else t for t in tensors]
    return _ops.OPS[spec.name][1], (tensors, given, list(target.shape), rows, needs, key)


#: every op made from a ``FunctionSpec``, with and without the optional statistics; the
#: log-probability ops also in 16 bits on both implementations (their outputs stay float32: a fake
#: giving 16-bit ones passed the suite once)
OPCHECKS = [(kind, torch.float32, "reference") for kind in
            ("token_loss", "token_loss_stats", "linear_loss", "linear_loss_bf16_talr", "logprobs_stats",
             "linear_logprobs", "linear_logprobs_stats")]
OPCHECKS += [(kind, dtype, impl) for kind in ("logprobs", "linear_logprobs") for dtype in (torch.bfloat16, torch.float16)
             for impl in ("reference", "triton")]


@pytest.mark.parametrize("kind, dtype, impl", OPCHECKS, ids=str)
def test_opcheck(kind, dtype, impl):
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with
    the op's real behaviour; AOT dispatch also runs the backward op against its fake."""
    op, args = _opcheck_args(kind, dtype, impl)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                "test_aot_dispatch_dynamic"))


def test_nll_meter_records_from_compiled_code():
    """The meter is updated when the compiled code runs, even when the returned mean is unused
    (the op is effectful, not dead code), and tracing reads none of its state (no recompile)."""
    from ranktuner_kernels.integrations.transformers import NLLMeter

    meter = NLLMeter()

    def fn(x):
        total, count = (x.detach() ** 2).sum(), (x.detach() > 0).sum().float()
        meter.record("train", total, count)  # result dropped
        return (x * 2).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    expected = []
    for step in range(STEPS):
        x = torch.randn(6, generator=torch.Generator().manual_seed(step), requires_grad=True)
        compiled(x).backward()
        expected.append(float((x.detach() ** 2).sum() / (x.detach() > 0).sum()))
        meter.end_step()
    assert counter.frame_count == 1
    assert meter.pop_train() == pytest.approx(sum(expected) / len(expected))


# ----------------------------------------------------------------------------- a patched model


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _batch(step, b=2, t=8, v=64):
    gen = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(0, v, (b, t), generator=gen)
    labels = ids.clone()
    labels[step % b, : 2 + step] = -100
    return ids, labels


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_patched_model_compiled(impl):
    """``torch.compile(patched_model, fullgraph=True)``: no graph break (``explain``), one
    compilation for three training steps, loss / every gradient / the logged NLL equal eager."""
    from ranktuner_kernels.integrations.transformers import patch_model

    model = _tiny_llama()
    reference = copy.deepcopy(model)
    patch_model(model, weighting="sft", impl=impl)
    patch_model(reference, weighting="sft", impl=impl)

    if impl == "reference":  # (fullgraph=True below raises on a break too)
        ids, labels = _batch(0)
        assert dynamo.explain(model)(input_ids=ids, labels=labels).graph_break_count == 0
        dynamo.reset()
        model._ranktuner_patch.meter.reset()  # explain ran the model once

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for step in range(STEPS):
        ids, labels = _batch(step)
        out = compiled(input_ids=ids, labels=labels)
        expected = reference(input_ids=ids, labels=labels)
        out.loss.backward()
        expected.loss.backward()
        torch.testing.assert_close(out.loss, expected.loss)
        torch.testing.assert_close(out.nll, expected.nll)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
            p.grad = q.grad = None
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations for {STEPS} steps"
    assert model._ranktuner_patch.meter.pop_train() == pytest.approx(reference._ranktuner_patch.meter.pop_train())


# ----------------------------------------------------------------------------- no compiler at start-up

_FIRST_CALL = r"""
import sys, time
import torch
import ranktuner_kernels as rk
x = torch.randn(2, 5, 11, requires_grad=True)
y = torch.randint(0, 11, (2, 5))
h = torch.randn(2, 5, 8, requires_grad=True)
w = torch.randn(11, 8, requires_grad=True)
rk.cross_entropy(x, y, weighting="dft").backward()
rk.linear_cross_entropy(h, w, y, return_stats=True)[0].backward()
sum(t.sum() for t in rk.logprobs(x, y)).backward()
rk.token_stats(x, y)
print("torch._dynamo" in sys.modules)
"""


def test_first_eager_call_does_not_import_dynamo():
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_JIT"}
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
