"""``patch_model(..., eval_logits=True)`` on tiny MoE models in eval mode: the logits path
(``rk.cross_entropy`` on the original forward's logits) adds the router auxiliary loss as the
model's own forward does, ``router_aux_loss_coef * aux_loss``.

The fused (training) path's router loss is compared for every MoE type by
``tests/test_model_coverage.py``; this file covers the evaluation path, which only runs in eval
mode with labels and ``eval_logits=True``. The coefficient is set far from 1 (0.3), so a path that
drops it (or adds the loss twice, or not at all) is off by about ``aux_loss`` (~2 here) and fails.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ranktuner_kernels as rk  # noqa: E402
from ranktuner_kernels.integrations.transformers import patch_model  # noqa: E402

V = 128
COEF = 0.3
#: (config class, model class): three MoE families with the router loss in their forward
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny_moe(family):
    config_name, model_name = MOE[family]
    config = getattr(transformers, config_name)(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, router_aux_loss_coef=COEF,
        output_router_logits=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def run(model, **kw):
    """The output and every parameter's gradient of one call with labels."""
    model.zero_grad(set_to_none=True)
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(MOE))
def test_eval_logits_adds_the_router_loss_with_its_coefficient(family):
    """sft: loss, aux_loss, logits and every gradient (the router's included) equal the
    unpatched model's, with ``output_router_logits=True`` passed to the call; without it, no
    router loss on either side."""
    base = tiny_moe(family)
    assert base.config.router_aux_loss_coef == COEF
    patched = patch_model(copy.deepcopy(base), weighting="sft", eval_logits=True)
    assert not patched.training
    for kw in ({"output_router_logits": True}, {}):
        want, want_grads = run(base, **kw)
        got, got_grads = run(patched, **kw)
        assert got.logits is not None  # the logits path ran, not the fused one
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        if kw:
            assert want.aux_loss is not None
            torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)
        else:
            assert getattr(want, "aux_loss", None) is None and getattr(got, "aux_loss", None) is None
        assert got_grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-9,
                                       msg=lambda m: f"{family} {name}: {m}")


def test_eval_logits_with_a_reweighting_adds_the_router_loss():
    """A reweighting in eval mode: ``rk.cross_entropy`` of the shifted logits plus
    ``router_aux_loss_coef * aux_loss``, both read off the unpatched model."""
    base = tiny_moe("mixtral")
    patched = patch_model(copy.deepcopy(base), weighting="ranktuner", eval_logits=True)
    ids, labels = batch()
    with torch.no_grad():
        want = base(input_ids=ids, output_router_logits=True, labels=labels)
        got = patched(input_ids=ids, output_router_logits=True, labels=labels)
    objective = rk.cross_entropy(want.logits[:, :-1], labels[:, 1:], weighting="ranktuner", impl="reference")
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.loss, objective + COEF * want.aux_loss, rtol=1e-5, atol=1e-6)
