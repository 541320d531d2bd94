"""patch_model on PEFT models: LoRA on the attention and on the LM head, modules_to_save.

Tiny Llama models built from a config (no downloads). The reference is the unpatched PEFT model
itself: under the same seed (the same LoRA dropout masks), the patched loss and every trainable
gradient (adapters, saved copies, a trainable base head, the embeddings) equal its own, in
float32, with ``weighting="sft"``: no less accurate than its own against the same model in float64
(``tests/error_model.py``).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from error_model import assert_dicts_no_less_accurate, assert_no_less_accurate  # noqa: E402
from helpers import float64_copy  # noqa: E402
from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402

V = 96
CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LORA_CLASS = "peft.tuners.lora.layer.Linear"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def make_peft(tied=False, checkpointing=False, **lora):
    """A tiny Llama with a LoRA config; ``init_lora_weights=False`` makes B non-zero, so every
    adapter gradient (and the adapter's share of the logits) is non-trivial."""
    config = transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **lora}
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))


def make_batch(seed=0, b=2, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    labels[1, -2:] = -100
    return ids, labels


def loss_and_grads(model, seed=0, **kwargs):
    """One forward with labels and a backward, under ``torch.manual_seed(seed)`` (the dropout
    masks); ``(loss, {name: grad})`` over the parameters that got a gradient."""
    ids, labels = make_batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_as_accurate(got, want, truth):
    """``(loss, grads)`` of the patched model no less accurate than the unpatched model's, both
    against the unpatched model in float64 (``tests/error_model.py``)."""
    assert_no_less_accurate(got[0], want[0], truth[0], what="loss")
    assert_dicts_no_less_accurate(got[1], want[1], truth[1], what="grad")


def assert_patched_matches(model, train=True, **kwargs):
    """The patched copy's loss and gradients equal the unpatched model's (the error model)."""
    model.train(train)
    patched = rkt.patch_model(copy.deepcopy(model), weighting="sft")
    assert rkt.is_patched(patched)
    truth = loss_and_grads(float64_copy(model), **kwargs)
    want = loss_and_grads(model, **kwargs)
    assert_as_accurate(loss_and_grads(patched, **kwargs), want, truth)
    return want[1]


HEAD_CASES = {
    "qv": dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "head": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "head_dropout": dict(target_modules=["v_proj", "lm_head"], lora_dropout=0.3),
    "head_rslora": dict(target_modules=["lm_head"], r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.2),
    "head_tied": dict(target_modules=["lm_head"], lora_dropout=0.2, tied=True),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.1),
    "checkpointing": dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.3, checkpointing=True),
}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_patched_peft_model_matches_unpatched(case):
    options = dict(HEAD_CASES[case])
    model = make_peft(tied=options.pop("tied", False), checkpointing=options.pop("checkpointing", False), **options)
    grads = assert_patched_matches(model)
    if "lm_head" in options.get("target_modules", []):
        assert {"lm_head.lora_A", "lm_head.lora_B"} <= {".".join(n.split(".")[-4:-2]) for n in grads}
    if "modules_to_save" in options:
        assert any("lm_head.modules_to_save.default.weight" in n for n in grads)
        assert not any("original_module" in n for n in grads)


def test_head_dropout_masks_follow_the_seed():
    """With dropout, another seed gives another loss (the masks are drawn, and drawn alike)."""
    model = make_peft(target_modules=["lm_head"], lora_dropout=0.5).train()
    patched = rkt.patch_model(copy.deepcopy(model), weighting="sft")
    a, _ = loss_and_grads(patched, seed=0)
    b, _ = loss_and_grads(patched, seed=1)
    assert a != b
    # eval mode: no dropout, seed-independent, and equal to the unpatched model
    model.eval(), patched.eval()
    with torch.no_grad():
        ids, labels = make_batch()
        want = model(input_ids=ids, labels=labels).loss
        truth = float64_copy(model).eval()(input_ids=ids, labels=labels).loss
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert_no_less_accurate(patched(input_ids=ids, labels=labels).loss, want, truth, what=f"seed {seed}")


def test_trainable_base_head_and_two_active_adapters():
    """The base head weight trainable too, and two LoRA adapters active at once on the head."""
    model = make_peft(target_modules=["lm_head"], lora_dropout=0.2)
    model.add_adapter("second", peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head"], r=2,
                                                lora_alpha=3, lora_dropout=0.1, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    model.base_model.model.lm_head.base_layer.weight.requires_grad_(True)
    grads = assert_patched_matches(model)
    assert any("lora_B.second" in n for n in grads) and "base_model.model.lm_head.base_layer.weight" in grads


def test_disabled_and_merged_adapters():
    model = make_peft(target_modules=["v_proj", "lm_head"], lora_dropout=0.2)
    patched, twin = rkt.patch_model(copy.deepcopy(model), weighting="sft"), float64_copy(model)
    ids, labels = make_batch()

    def losses(*models):
        out = []
        for m in models:
            torch.manual_seed(0)  # the same dropout masks
            out.append(m(input_ids=ids, labels=labels).loss)
        return out

    with model.disable_adapter(), patched.disable_adapter(), twin.disable_adapter():
        assert_no_less_accurate(*losses(patched, model, twin), what="adapters disabled")
    for m in (model, patched, twin):
        m.eval(), m.merge_adapter()
    with torch.no_grad():
        assert_no_less_accurate(*losses(patched, model, twin), what="adapters merged")
        with patched.disable_adapter(), pytest.raises(ValueError, match=LORA_CLASS + ".*merged"):
            patched(input_ids=ids, labels=labels)


def test_unsupported_heads_are_refused_at_patch_model_by_name():
    dora = make_peft(target_modules=["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match=LORA_CLASS + ".*DoRA"):
        rkt.patch_model(dora, weighting="sft")
    assert not rkt.is_patched(dora)

    config = transformers.LlamaConfig(**CONFIG)
    ia3 = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                              peft.IA3Config(task_type="CAUSAL_LM", target_modules=["lm_head"], feedforward_modules=[]))
    with pytest.raises(TypeError, match=r"peft\.tuners\.ia3\.layer\.Linear"):
        rkt.patch_model(ia3, weighting="sft")


def test_mixed_adapter_batches_are_refused():
    """adapter_names= hooks arguments into the head's forward, which the fused loss bypasses."""
    model = make_peft(target_modules=["lm_head"]).eval()
    model.add_adapter("second", peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head"], r=2))
    rkt.patch_model(model, weighting="sft")
    ids, labels = make_batch()
    with torch.no_grad(), pytest.raises(ValueError, match=LORA_CLASS + ".*adapter_names"):
        model(input_ids=ids, labels=labels, adapter_names=["default", "second"])
    with torch.no_grad():  # without labels: PEFT's own forward, logits as usual
        assert model(input_ids=ids, adapter_names=["default", "second"]).logits.shape == (2, 7, V)


def test_linear_operands_reproduce_the_head_with_lora_bias():
    """The operands alone, float64, on a head with a bias and ``lora_bias=True``: the logits and
    the gradients (random upstream) of the hidden states and every parameter equal the head's."""
    from ranktuner_kernels.integrations import _heads

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 11)

    torch.manual_seed(0)
    net = peft.get_peft_model(Net().double(), peft.LoraConfig(target_modules=["head"], r=3, lora_alpha=7,
                                                              lora_bias=True, lora_dropout=0.4,
                                                              init_lora_weights=False)).train()
    head = net.base_model.model.head
    head.base_layer.weight.requires_grad_(True)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 11, dtype=torch.float64)
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    assert len(params) == 5  # hidden, W, A, B and B's bias

    def run(fn):
        torch.manual_seed(3)
        out = fn()
        return [out.detach()] + list(torch.autograd.grad((out * upstream).sum(), params))

    def fused():
        h, w, b = _heads.linear_operands(head, hidden)
        assert h.shape[-1] == w.shape[-1] == 8 + 3
        return torch.nn.functional.linear(h, w, b)

    for got, want in zip(run(fused), run(lambda: head(hidden))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lora_head_under_autocast():
    """bf16 autocast: the concatenated head runs in bf16 like PEFT's; loss and gradients are no
    less accurate than the unpatched model's bf16 ones, both against float64 (PEFT rounds the
    base and adapter logits separately, the fused loss accumulates them together)."""
    model = make_peft(target_modules=["q_proj", "lm_head"], lora_dropout=0.2).train()
    patched = rkt.patch_model(copy.deepcopy(model), weighting="sft")
    truth = loss_and_grads(float64_copy(model))  # autocast leaves float64 alone: outside it anyway
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(model)
        got = loss_and_grads(patched)
    assert got[0].dtype == torch.float32
    assert_as_accurate(got, want, truth)


def test_patch_before_peft_wraps_the_head():
    """Patched first, then wrapped by PEFT with LoRA on the head: the head is resolved at every
    step, so the adapter is used (and trained) all the same."""
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head"], r=4, lora_alpha=8, lora_dropout=0.2,
                           init_lora_weights=False)
    models = []
    for patch in (False, True):
        inner = copy.deepcopy(base)
        if patch:
            rkt.patch_model(inner, weighting="sft")
        torch.manual_seed(1)  # the same random A and B
        models.append(peft.get_peft_model(inner, lora).train())
    truth = loss_and_grads(float64_copy(models[0]))
    want = loss_and_grads(models[0])
    got = loss_and_grads(models[1])
    assert rkt.is_patched(models[1]) and any("lm_head.lora_B" in n for n in got[1])
    with torch.no_grad():
        assert models[1](input_ids=make_batch()[0], labels=make_batch()[1]).logits is None  # the fused path ran
    assert_as_accurate(got, want, truth)
