"""Shared test helpers: batches with a realistic spread of p_t, the configs of the registry, error
measures, the example scripts as modules."""

import importlib.util
import os
import sys

import pytest
import torch

import ranktuner_kernels as rk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

def configs(registry=None):
    """Every registered weighting (``rk.weightings.WEIGHTINGS``) with its default options and each
    of its ``variants`` (every non-default option at least once)."""
    registry = rk.weightings.WEIGHTINGS if registry is None else registry
    return [cfg for cls in registry.values() for cfg in (cls(), *(cls(**kw) for kw in cls.variants))]


#: The registry's configs and names when the tests are collected.
CONFIGS = configs()
NAMES = sorted(rk.weightings.WEIGHTINGS)


def cid(obj):
    return repr(obj).replace(" ", "")


def make_batch(b, t, v, dtype=torch.float32, device=DEVICE, seed=0, ignore=True):
    """``[B, T, V]`` logits and ``[B, T]`` targets: random logits, each target's logit boosted by
    a random amount so p_t spans hard (~1/V) to confident (~1); a few targets ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, v, (b, t), generator=g)
    boost = torch.rand(b, t, generator=g, dtype=torch.float64) * 12 - 2
    logits.scatter_add_(2, target[..., None], boost[..., None])
    if ignore and b * t > 2:
        target.view(-1)[1] = -100
    return logits.to(dtype).to(device), target.to(device)


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def upstream_like(loss, seed=1):
    """A random upstream gradient of the loss's shape (non-uniform for ``"none"``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.device)


def loss_and_grads(fn, inputs, upstream_seed=1):
    """Run ``fn(*inputs)`` and backprop a random upstream gradient; returns (loss, grads)."""
    for x in inputs:
        x.grad = None
    loss = fn(*inputs)
    g = upstream_like(loss, upstream_seed).to(loss.dtype)
    (loss * g).sum().backward()
    return loss.detach(), [x.grad.detach().clone() for x in inputs]


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


def load_example(name):
    """``examples/<name>.py`` as the module ``rk_example_<name>``; skips the test outside a source
    checkout (an installed wheel has no examples/)."""
    path = os.path.join(EXAMPLES, f"{name}.py")
    if not os.path.isfile(path):
        pytest.skip("examples/ is not beside tests/ (not a source checkout)")
    spec = importlib.util.spec_from_file_location(f"rk_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def causal_lm_loss_float64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                           shift_labels=None, **kwargs):
    """transformers' ``ForCausalLMLoss`` without its ``logits.float()``: in the logits' own dtype, so
    that a float64 model's loss is float64 throughout (the truth of ``tests/error_model.py``)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                                             ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch).to(loss.device)
    return loss


def float64_copy(model):
    """A float64 copy of a model, its transformers loss computed in float64 too (the model's own
    ``ForCausalLMLoss`` casts the logits to float32): the truth a float32 comparison is measured
    against (``tests/error_model.py``)."""
    import copy

    twin = copy.deepcopy(model).double()
    for module in twin.modules():  # the transformers models inside (a PEFT model wraps one)
        if isinstance(getattr(type(module), "loss_function", None), property):
            module.loss_function = causal_lm_loss_float64
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", "eager") != "eager":
            # MoE experts by torch's grouped_mm take no float64: the eager loop computes the same
            config._experts_implementation = "eager"
    return twin


def record_prepared_calls(monkeypatch, field: str) -> list:
    """Spy on ``_call.prepare`` (every loss and statistics call goes through it): returns the list
    to which each call's ``params.<field>`` (e.g. ``asked_stats``) is appended."""
    from ranktuner_kernels import _call

    calls = []
    prepare = _call.prepare

    def spy(*args, **kwargs):
        call = prepare(*args, **kwargs)
        calls.append(getattr(call.params, field))
        return call

    monkeypatch.setattr(_call, "prepare", spy)
    return calls
