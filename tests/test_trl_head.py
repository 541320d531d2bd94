"""``add_fused_lm_head``: TRL's fused LM head on this library's kernels, against float64 truth.

The truth is the unpatched model run in float64: its logits (after its own scale / soft-cap),
divided by the temperature, through ``log_softmax`` and the definitions of TRL's fields; its
gradients by autograd through those logits. Tiny models from ``tests/_tiny_models.py`` (logit
scale, soft-cap and router loss away from the identity), no downloads.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny_models import tiny_model  # noqa: E402
from error_model import assert_no_less_accurate, error as error_of  # noqa: E402

from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402
from ranktuner_kernels.integrations.trl import add_fused_lm_head  # noqa: E402
from ranktuner_kernels.integrations.trl.statistics import FIELDS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

T = 0.7  # a temperature away from 1, as GRPO's
EPS32 = 2.0 ** -24  # float32's unit round-off
K = 4  # the float32 head may err K times the unpatched float32 model's own error (or one ulp of the value)
FAMILIES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "granite": "GraniteForCausalLM",
            "cohere": "CohereForCausalLM", "mixtral": "MixtralForCausalLM", "lora": "LlamaForCausalLM"}
FLOAT_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits")


def make_model(family="llama"):
    """The tiny model in eval mode (no dropout); ``"lora"``: a PEFT LoRA model (q, v and the
    LM head, B != 0 so that every adapter shows)."""
    model = tiny_model("llama" if family == "lora" else family, FAMILIES[family])
    if family == "mixtral":
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel on the CPU
    if family == "lora":
        peft = pytest.importorskip("peft")
        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "lm_head"]))
    return model


def make_batch(model, seed=0):
    """Ids, attention mask (row 1 right-padded) and labels (row 0's prompt and the padding -100)."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return ids, mask, labels


def truth(model, ids, mask, labels, temperature=T):
    """TRL's fields and loss from the unpatched model's logits, in the model's dtype."""
    out = model(input_ids=ids, attention_mask=mask)
    z = out.logits[:, :-1] / temperature
    y = labels[:, 1:]
    keep = y != -100
    logp = z.log_softmax(-1)
    zero = torch.zeros((), dtype=z.dtype)
    fields = {
        "log_probs": logp.gather(-1, y.clamp(min=0)[..., None])[..., 0],
        "entropy": -(logp.exp() * logp).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
        "mean_logits": z.mean(-1),
    }
    fields = {k: torch.where(keep, v, zero) for k, v in fields.items()}
    fields["is_top1"] = (z.argmax(-1) == y) & keep
    loss = -fields["log_probs"].sum() / keep.sum()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + model.config.get_text_config().router_aux_loss_coef * aux
    return fields, loss, z


def fused(model, ids, mask, labels, **kwargs):
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **kwargs)
    return {k: getattr(out, k) for k in FIELDS}, out.loss, out


def objective(fields, loss, seed=1):
    """A random linear function of log_probs, entropy and loss (random upstream gradients)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(fields["log_probs"].shape, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    dtype = fields["log_probs"].dtype
    return (a.to(dtype) * fields["log_probs"]).sum() + (b.to(dtype) * fields["entropy"]).sum() + 0.7 * loss


def grads(model, value):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in params], torch.autograd.grad(value, [p for _, p in params], allow_unused=True)))


def with_head(model, **kwargs):
    add_fused_lm_head(model, **kwargs)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_field_and_gradient_equals_float64_truth(family):
    """Llama, Gemma-2 (soft-cap 3), Granite (logits_scaling 2.5), Cohere (logit_scale 0.3), Mixtral
    (router loss, coefficient 0.02), LoRA on q/v/lm_head; temperature 0.7, every field requested.

    In float64 the head is the definition: every field and every gradient of a random linear
    function of ``log_probs``, ``entropy`` and ``loss`` equal the truth to 1e-9. In float32 each
    field's and gradient's largest error against the float64 truth is at most K = 4 times the
    unpatched float32 model's own (its float32 logits through the same definitions), or K ulps of
    the value where that is smaller; ``is_top1`` equals the truth wherever the float64 margin
    between the two largest logits exceeds 1e-4 (float32 logits err by ~1e-6 here)."""
    base = make_model(family)
    ids, mask, labels = make_batch(base)
    outputs = FIELDS
    m64 = copy.deepcopy(base).double()
    want, want_loss, z64 = truth(m64, ids, mask, labels)
    want_grads = grads(m64, objective(want, want_loss))
    head64 = with_head(copy.deepcopy(base).double(), temperature=T, outputs=outputs)
    got64, loss64, out64 = fused(head64, ids, mask, labels)
    for k in FLOAT_FIELDS:
        torch.testing.assert_close(got64[k], want[k], rtol=1e-9, atol=1e-11, msg=lambda m: f"{family} {k}: {m}")
    assert torch.equal(got64["is_top1"], want["is_top1"]) and torch.equal(out64.label_mask, labels[:, 1:] != -100)
    torch.testing.assert_close(loss64, want_loss, rtol=1e-9, atol=0)
    assert (out64.aux_loss is not None) == (family == "mixtral")
    for name, g in grads(head64, objective(got64, loss64)).items():
        assert g is not None, name
        torch.testing.assert_close(g, want_grads[name], rtol=1e-8, atol=1e-10 * float(want_grads[name].abs().max()),
                                   msg=lambda m: f"{family} float64 grad {name}: {m}")

    ref32 = copy.deepcopy(base)
    r32, r32_loss, _ = truth(ref32, ids, mask, labels)
    ref_grads = grads(ref32, objective(r32, r32_loss))
    head32 = with_head(copy.deepcopy(base), temperature=T, outputs=outputs)
    g32, l32, out32 = fused(head32, ids, mask, labels)
    assert g32["log_probs"].dtype == torch.float32 and l32.dtype == torch.float32
    assert g32["is_top1"].dtype == torch.bool and out32.label_mask.dtype == torch.bool

    def within(name, got, ref, true):
        err, err_ref = (float((x.double() - true).abs().max()) for x in (got, ref))
        floor = EPS32 * float(true.abs().max())
        assert err <= K * max(err_ref, floor), f"{family} {name}: error {err:.3g}, unpatched float32 {err_ref:.3g}"

    for k in FLOAT_FIELDS:
        within(k, g32[k], r32[k], want[k])
    within("loss", l32, r32_loss, want_loss)
    top2 = z64.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(g32["is_top1"][clear], want["is_top1"][clear]) and clear.float().mean() > 0.9
    for name, g in grads(head32, objective(g32, l32)).items():
        within(f"grad {name}", g, ref_grads[name], want_grads[name])


def test_ignored_positions_zero_unrequested_fields_none_and_label_mask():
    model = with_head(make_model(), outputs=("log_probs", "is_top1"))
    ids, mask, labels = make_batch(model)
    fields, loss, out = fused(model, ids, mask, labels)
    keep = labels[:, 1:] != -100
    assert fields["entropy"] is None and fields["log_sum_sq_probs"] is None and fields["mean_logits"] is None
    assert out.aux_loss is None and torch.equal(out.label_mask, keep)
    assert fields["log_probs"].shape == keep.shape and (fields["log_probs"][~keep] == 0).all()
    assert (fields["log_probs"][keep] < 0).all() and not fields["is_top1"][~keep].any()
    torch.testing.assert_close(loss, -fields["log_probs"].sum() / keep.sum(), rtol=0, atol=0)


def test_shift_labels_and_num_items_in_batch():
    """``shift_labels`` (already shifted, [B, T]) are scored as given: the fields of ``labels``
    shifted by hand, one more position; ``num_items_in_batch`` divides the summed NLL."""
    model = with_head(make_model(), temperature=T, outputs=("log_probs", "entropy"))
    ids, mask, labels = make_batch(model)
    fields, _, _ = fused(model, ids, mask, labels)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    got, loss, out = fused(model, ids, mask, None, shift_labels=shifted, num_items_in_batch=7)
    assert got["log_probs"].shape == ids.shape and not out.label_mask[:, -1].any()
    for k in ("log_probs", "entropy"):
        torch.testing.assert_close(got[k][:, :-1], fields[k], rtol=1e-6, atol=1e-7)
        assert (got[k][:, -1] == 0).all()
    torch.testing.assert_close(loss, -got["log_probs"].sum() / 7, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"shift_labels: expected \[B, T\]"):
        fused(model, ids, mask, None, shift_labels=shifted[:, 1:])
    with pytest.raises(ValueError, match="labels: fused_lm_head=True needs labels"):
        fused(model, ids, mask, None)


def test_all_masked_micro_batch_gives_a_differentiable_zero():
    """A micro-batch without a kept label: loss 0 (not 0/0), backward runs, every gradient 0."""
    model = with_head(make_model(), outputs=("log_probs", "entropy"))
    ids, mask, labels = make_batch(model)
    fields, loss, _ = fused(model, ids, mask, torch.full_like(labels, -100))
    assert loss.item() == 0 and loss.requires_grad and (fields["log_probs"] == 0).all()
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
    assert model.get_output_embeddings().weight.grad is not None


def test_without_fused_lm_head_forward_and_generate_are_unchanged():
    plain = make_model()
    model = with_head(copy.deepcopy(plain), temperature=T, outputs=FIELDS)
    ids, mask, labels = make_batch(model)
    want, got = plain(ids, attention_mask=mask, labels=labels), model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert type(got) is type(want)
    got_f = model(ids, attention_mask=mask, labels=labels, fused_lm_head=False)
    torch.testing.assert_close(got_f.loss, want.loss, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kw), plain.generate(ids[:1], **kw))


def test_cast_lm_head_to_fp32_projects_in_float32_under_autocast():
    """Under bfloat16 autocast the head projects in bfloat16, or in float32 with
    ``cast_lm_head_to_fp32``: then ``log_probs`` are no less accurate than torch's float32
    projection of the same (autocast) hidden states (``tests/error_model.py``); without the
    cast they carry bfloat16's error, at least a quarter of torch's bfloat16 projection's."""
    model = make_model()
    ids, mask, labels = make_batch(model)
    hidden = []
    model.model.register_forward_hook(lambda m, i, o: hidden.append(o.last_hidden_state.detach()))
    got = {}
    for cast in (False, True):
        add_fused_lm_head(model, cast_lm_head_to_fp32=cast)
        hidden.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fields, loss, _ = fused(model, ids, mask, labels)
        assert fields["log_probs"].dtype == torch.float32 and loss.dtype == torch.float32
        z = hidden[0][:, :-1].double() @ model.lm_head.weight.double().T
        y = labels[:, 1:]
        want = torch.where(y != -100, z.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
        got[cast] = fields["log_probs"]
        h, w = hidden[0][:, :-1], model.lm_head.weight
        torch_logp = {dt: torch.where(y != -100, (h.to(dt) @ w.to(dt).T).float().log_softmax(-1).gather(
            -1, y.clamp(min=0)[..., None])[..., 0], 0.0) for dt in (torch.float32, torch.bfloat16)}
    assert_no_less_accurate(got[True], torch_logp[torch.float32], want, what="cast_lm_head_to_fp32=True")
    assert error_of(got[False], want) >= 0.25 * error_of(torch_logp[torch.bfloat16], want) > 0, "not projected in bf16"


def test_refusals_name_the_model_type_and_the_argument():
    bart = pytest.importorskip("transformers").BartForCausalLM
    model = tiny_model("bart", bart.__name__)
    with pytest.raises(ValueError, match=r"model_type 'bart' \(BartForCausalLM\) cannot be patched"):
        add_fused_lm_head(model)
    assert "_ranktuner_fused_head" not in model.__dict__ and "forward" not in model.__dict__
    with pytest.raises(TypeError, match="model: expected a transformers causal LM"):
        add_fused_lm_head(torch.nn.Linear(2, 2))
    model = make_model()
    for kwargs, error, match in [
        (dict(outputs="entropy"), TypeError, "outputs: expected a tuple"),
        (dict(outputs=("log_probs", "logits")), ValueError, "outputs: unknown field.*'logits'"),
        (dict(temperature=0.0), ValueError, "temperature: expected a positive"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(cast_lm_head_to_fp32=1), TypeError, "cast_lm_head_to_fp32: expected a bool"),
    ]:
        with pytest.raises(error, match=match):
            add_fused_lm_head(model, **kwargs)
    assert "_ranktuner_fused_head" not in model.__dict__
    add_fused_lm_head(model)
    ids, mask, labels = make_batch(model)
    with pytest.raises(ValueError, match="logits_to_keep: 3 with fused_lm_head=True"):
        fused(model, ids, mask, labels, logits_to_keep=3)


def test_near_certain_tokens_keep_their_relative_precision():
    """Logits of 20-40 with targets at p = 1 - 1e-10 .. 1 - 1e-6 (the head's row of the target
    aligned with the hidden states): against float64 on the same float32 hidden states and head,
    ``log p`` (about -(1 - p)), the entropy and the gradient of the target's head row keep a
    relative error within K times what the float32 logits' own error ``dz`` (the matmul's
    round-off, measured) allows, ``2 dz + 4 eps`` per token. float32 ``log_softmax`` of the same
    logits rounds ``log p`` to 0 (relative error 1), as TRL's float32 head does."""
    model = make_model()
    ids, mask, _ = make_batch(model)
    mask = torch.ones_like(mask)
    hidden = []
    model.model.register_forward_hook(lambda m, i, o: hidden.append(o.last_hidden_state.detach()))
    with torch.no_grad():
        model(ids, attention_mask=mask)
        h = hidden.pop()[:, :-1].reshape(-1, model.config.hidden_size)
        g = torch.Generator().manual_seed(2)
        w = torch.randn(model.lm_head.weight.shape, generator=g) * 0.05
        y = 5
        u = h.mean(0)
        w[y] = u * (23.3 / (h @ u).median())  # z_y ~ 23: 1 - p ~ 1e-8 at the median row
        model.lm_head.weight.copy_(w)
    z64 = h.double() @ w.double().T
    logp64 = z64.log_softmax(-1)
    one_minus_p = -logp64[:, y]
    keep = ((one_minus_p > 1e-10) & (one_minus_p < 1e-6)).reshape(ids.shape[0], -1)
    assert keep.sum() >= 4 and float(z64[keep.reshape(-1)].max()) > 20
    labels = torch.full_like(ids, -100)
    labels[:, 1:][keep] = y
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    fields, _, _ = fused(model, ids, mask, labels)
    flat = keep.reshape(-1)
    dz = ((h @ w.T).double() - z64).abs().max(-1).values[flat]
    allowed = K * (2 * dz + 4 * EPS32)
    truth_lp = logp64[flat, y]
    truth_ent = -(logp64.exp() * logp64).sum(-1)[flat]

    def rel(got, want):
        return (got.double() - want).abs() / want.abs()

    assert (rel(fields["log_probs"][keep], truth_lp) <= allowed).all()
    assert (rel(fields["entropy"][keep], truth_ent) <= allowed).all()
    assert (rel(torch.log_softmax(h @ w.T, -1)[flat, y], truth_lp) > 0.5).any()  # the regime is real
    (fields["log_probs"].sum()).backward()
    w64 = w.double().requires_grad_()
    (h.double() @ w64.T).log_softmax(-1)[flat, y].sum().backward()
    got_row, want_row = model.lm_head.weight.grad[y].double(), w64.grad[y]
    assert float((got_row - want_row).abs().max() / want_row.abs().max()) <= float(allowed.max())


def test_pickling_refuses_deepcopy_keeps_the_head():
    import io

    model = with_head(make_model(), temperature=T, outputs=("log_probs", "entropy"))
    ids, mask, labels = make_batch(model)
    with pytest.raises(TypeError, match="add_fused_lm_head cannot be pickled.*save_pretrained.*add_fused_lm_head"):
        torch.save(model, io.BytesIO())
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    want, _, _ = fused(model, ids, mask, labels)
    got, loss, _ = fused(clone, ids, mask, labels)
    torch.testing.assert_close(got["entropy"], want["entropy"], rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None for p in model.parameters()) and clone.lm_head.weight.grad is not None


def test_calling_again_replaces_the_options_and_patch_model_coexists():
    """A second call replaces temperature and outputs (one head); a model patched by patch_model
    afterwards keeps its objective for calls with labels, while fused_lm_head=True calls go to the
    head."""
    model = with_head(make_model(), temperature=T, outputs=("log_probs", "entropy"))
    ids, mask, labels = make_batch(model)
    forward = model.forward
    add_fused_lm_head(model, outputs=("mean_logits",))
    assert model.forward.__func__ is forward.__func__
    fields, _, _ = fused(model, ids, mask, labels)
    assert fields["entropy"] is None and fields["mean_logits"] is not None
    want, _, _ = fused(with_head(make_model()), ids, mask, labels)
    torch.testing.assert_close(fields["log_probs"], want["log_probs"], rtol=0, atol=0)  # temperature 1 again
    plain_loss = make_model()(ids, attention_mask=mask, labels=labels).loss
    rkt.patch_model(model, weighting="ranktuner")
    assert float(abs(model(ids, attention_mask=mask, labels=labels).loss - plain_loss)) > 1e-3  # the objective
    again, _, _ = fused(model, ids, mask, labels)
    torch.testing.assert_close(again["log_probs"], want["log_probs"], rtol=0, atol=0)


def test_peft_disabled_adapters_score_the_base_model():
    """DPO/KTO's reference pass disables the adapters of the policy: the head follows PEFT."""
    lora = with_head(make_model("lora"), outputs=("log_probs",))
    base = with_head(make_model("llama"), outputs=("log_probs",))
    ids, mask, labels = make_batch(base)
    adapted, _, _ = fused(lora, ids, mask, labels)
    with lora.disable_adapter():
        disabled, _, _ = fused(lora, ids, mask, labels)
    want, _, _ = fused(base, ids, mask, labels)
    torch.testing.assert_close(disabled["log_probs"], want["log_probs"], rtol=1e-6, atol=1e-6)
    assert float((adapted["log_probs"] - want["log_probs"]).abs().max()) > 1e-3


@pytest.mark.slow
def test_fsdp2_and_zero3_heads_equal_the_single_process_call(tmp_path):
    """On 2 gloo ranks (``tests/distributed_cases.py``, suite ``trl_head``): the head as its own
    FSDP2 unit, and a ZeRO-3 partitioned head; each rank's fields and every gradient against the
    single-process model."""
    import sys
    from pathlib import Path

    import torch.distributed as dist

    pytest.importorskip("deepspeed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    sys.path.insert(0, str(Path(__file__).parent))
    import distributed_cases

    distributed_cases.run_suite("trl_head", 2, str(tmp_path), cases=2)


def test_without_trl_the_output_is_a_model_output_with_trls_fields():
    """One fresh interpreter with TRL made unimportable: the head still works and returns a
    transformers ModelOutput with TRL's fields, in TRL's order."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None\n"
            "import torch, transformers\n"
            "from ranktuner_kernels.integrations.trl import add_fused_lm_head, FusedCausalLMOutput\n"
            "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=1, head_dim=8)\n"
            "m = transformers.LlamaForCausalLM(cfg)\n"
            "add_fused_lm_head(m, outputs=('entropy',))\n"
            "ids = torch.randint(0, 32, (2, 5))\n"
            "out = m(ids, labels=ids, fused_lm_head=True)\n"
            "assert type(out) is FusedCausalLMOutput and isinstance(out, transformers.utils.ModelOutput)\n"
            "print(type(out).__module__, list(out.keys()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['loss', 'log_probs', 'entropy', 'label_mask']" in done.stdout and "trl.head" in done.stdout


@pytest.mark.parametrize("weighting", [None, "sft"])
def test_the_pass_computes_only_the_statistics_of_the_asked_fields(monkeypatch, weighting):
    """One streaming pass per call, whose optional accumulators (``log_sum_p2``, ``logit_mean``,
    ``is_top1``) are on exactly for the asked fields: GRPO's ``("log_probs", "entropy")`` pays
    for none of them; with an objective (the SFT head) too."""
    from helpers import record_prepared_calls
    from ranktuner_kernels.integrations.trl.head import install_head

    calls = record_prepared_calls(monkeypatch, "asked_stats")
    model = make_model()
    ids, mask, labels = make_batch(model)
    core = {"log_sum_sq_probs": "log_sum_p2", "mean_logits": "logit_mean", "is_top1": "is_top1"}
    for outputs in (("log_probs",), ("log_probs", "entropy"), ("log_probs", "is_top1"), FIELDS):
        install_head(model, outputs=outputs, weighting=weighting)
        calls.clear()
        fields, _, _ = fused(model, ids, mask, labels)
        assert calls == [frozenset(core[k] for k in outputs if k in core)], (outputs, calls)
        assert all((fields[k] is None) == (k not in outputs) for k in FIELDS)
