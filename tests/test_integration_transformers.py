"""The transformers integration: patch_model, make_compute_loss_func, NLL logging, Trainer, TRL.

Tiny models built from configs (no downloads). The reference is each model's own forward
(transformers' ForCausalLMLoss) for ``weighting="sft"`` and ``rk.cross_entropy`` on the
unpatched model's logits for the other weightings.
"""

import copy
import inspect
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ranktuner_kernels as rk  # noqa: E402
from error_model import assert_dicts_no_less_accurate, assert_no_less_accurate  # noqa: E402
from helpers import causal_lm_loss_float64, float64_copy  # noqa: E402
from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402
from transformers.modeling_utils import slice_logits_to_keep  # noqa: E402 - for the forwards below

V = 128
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": None, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4}),
}
HAS_SOFTCAP = "softcap" in inspect.signature(rk.linear_cross_entropy).parameters
AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and on a loaded 2-core machine several
    threads spin-waiting on each other make every op ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family="llama", tied=False, seed=0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, "tie_word_embeddings": tied, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def make_batch(seed=0, b=2, t=9):
    """Token ids and labels: a masked prompt in row 0, right padding (-100) in row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def with_truth(model, fn):
    """``(fn(model), fn(float64 copy of model))``: a float32 reference and its truth."""
    return fn(model), fn(float64_copy(model))


def assert_as_accurate(got, want, truth, what):
    """``(loss, grads)`` of ours no less accurate than ``want``'s (the unpatched model's), both
    against ``truth`` (the same computation on :func:`float64_copy`) — the suite's error model."""
    assert_no_less_accurate(got[0], want[0], truth[0], what=f"{what} loss")
    assert_dicts_no_less_accurate(got[1], want[1], truth[1], what=f"{what} grad")


def shifted(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


# ----------------------------------------------------------------------------- the patched forward


def test_importing_does_not_import_transformers():
    code = ("import sys, ranktuner_kernels, ranktuner_kernels.integrations.transformers; "
            "assert 'transformers' not in sys.modules and 'trl' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert issubclass(rkt.NLLLoggingCallback, transformers.TrainerCallback)  # built on first access


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_matches_unpatched(family, tied, autocast):
    """Loss and every parameter's gradient: sft against the model's own loss, ranktuner against
    rk.cross_entropy on the unpatched logits; outputs.nll is the model's own (sft) loss."""
    model = make_model(family, tied).train()
    ids, labels = make_batch()
    ctx = (lambda: torch.autocast(**AUTOCAST)) if autocast else torch.enable_grad

    def ranktuner_on_logits(m):
        logits = m(ids).logits
        return rk.cross_entropy(logits[:, :-1], labels[:, 1:], weighting="ranktuner", impl="reference")

    truth = float64_copy(model)  # autocast leaves float64 alone: the truth of both runs
    own64 = loss_and_grads(truth, lambda: truth(ids, labels=labels).loss)
    rt64 = loss_and_grads(truth, lambda: ranktuner_on_logits(truth))
    with ctx():
        own = loss_and_grads(model, lambda: model(ids, labels=labels).loss)
        rt = loss_and_grads(model, lambda: ranktuner_on_logits(model))
        rkt.patch_model(model, weighting="sft")
        out = model(ids, labels=labels)
        assert out.logits is None and out.objective == "sft"
        got = loss_and_grads(model, lambda: model(ids, labels=labels).loss)
        rkt.patch_model(model, weighting="ranktuner")
        out_rt = model(ids, labels=labels)
        got_rt = loss_and_grads(model, lambda: model(ids, labels=labels).loss)

    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_as_accurate(got, own, own64, "sft")
    assert_as_accurate(got_rt, rt, rt64, "ranktuner")
    assert out_rt.objective == "ranktuner" and not out_rt.nll.requires_grad and out_rt.nll.dtype == torch.float32
    # the plain NLL is the sft loss whatever the objective
    assert_no_less_accurate(out_rt.nll, own[0], own64[0], what="nll")
    got, got_rt = got[0], got_rt[0]
    assert not torch.allclose(got_rt, got)


@pytest.mark.xfail(not HAS_SOFTCAP, reason="the core's rk.linear_cross_entropy has no softcap= yet", strict=True)
def test_gemma2_final_logit_softcapping():
    model = make_model("gemma2", tied=True, final_logit_softcapping=2.0).train()
    ids, labels = make_batch()

    def own_loss(m):
        return m(ids, labels=labels).loss

    def ranktuner_on_logits(m):
        return rk.cross_entropy(m(ids).logits[:, :-1], labels[:, 1:], weighting="ranktuner", impl="reference")

    truth = float64_copy(model)
    own64, rt64 = loss_and_grads(truth, lambda: own_loss(truth)), loss_and_grads(truth, lambda: ranktuner_on_logits(truth))
    own, rt = loss_and_grads(model, lambda: own_loss(model)), loss_and_grads(model, lambda: ranktuner_on_logits(model))
    rkt.patch_model(model, weighting="sft")
    assert_as_accurate(loss_and_grads(model, lambda: own_loss(model)), own, own64, "sft")
    rkt.patch_model(model, weighting="ranktuner")
    assert_as_accurate(loss_and_grads(model, lambda: own_loss(model)), rt, rt64, "ranktuner")


def test_caller_temperature_divides_the_models_logits_and_a_second_softcap_is_refused():
    model = make_model("gemma2", tied=True, final_logit_softcapping=2.0).train()
    with pytest.raises(ValueError, match="'gemma2'.*softcap"):
        rkt.patch_model(model, softcap=5.0)
    ids, labels = make_batch()

    def on_logits(m):
        return rk.cross_entropy(m(ids).logits[:, :-1], labels[:, 1:], temperature=1.5, impl="reference")

    truth, want = on_logits(float64_copy(model)), on_logits(model)
    got = rkt.patch_model(model, temperature=1.5)(ids, labels=labels).loss
    assert_no_less_accurate(got, want, truth, what="loss")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(as_tensor):
    model = make_model()
    ids, labels = make_batch()
    kept = int((shifted(labels) != -100).sum())
    n = 3 * kept + 1
    n_arg = torch.tensor(n) if as_tensor else n
    truth = float64_copy(model)
    own, own64 = (m(ids, labels=labels, num_items_in_batch=n_arg).loss for m in (model, truth))
    plain, plain64 = (m(ids, labels=labels).loss for m in (model, truth))
    rkt.patch_model(model, weighting="sft")
    got = model(ids, labels=labels, num_items_in_batch=n_arg)
    assert_no_less_accurate(got.loss, own, own64, what="loss over num_items_in_batch")
    assert_no_less_accurate(got.loss, plain * kept / n, plain64 * kept / n, what="loss = mean * kept / n")
    assert_no_less_accurate(got.nll, plain, plain64, what="nll")  # the NLL is a mean over kept tokens


def test_logits_to_keep():
    model = make_model()
    ids, labels = make_batch(t=10)
    k = 4
    # labels shaped like the kept positions: transformers' own semantics
    own, own64 = with_truth(model, lambda m: m(ids, labels=labels[:, -k:], logits_to_keep=k).loss)
    # full-length labels are sliced like the hidden states (transformers raises there)
    pos = torch.tensor([1, 4, 6])
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) > 0.4

    def on_logits(m):
        full, target = m(ids).logits, shifted(labels)
        return [rk.cross_entropy(full[:, -k:], target[:, -k:], weighting="ranktuner", impl="reference"),
                rk.cross_entropy(full[:, pos], target[:, pos], weighting="ranktuner", impl="reference"),
                rk.cross_entropy(full[mask], target[mask], weighting="ranktuner", impl="reference")]

    wants, truths = with_truth(model, on_logits)
    rkt.patch_model(model, weighting="sft")
    assert_no_less_accurate(model(ids, labels=labels[:, -k:], logits_to_keep=k).loss, own, own64, what="kept labels")
    rkt.patch_model(model, weighting="ranktuner")
    for keep, want, truth in zip((k, pos, mask), wants, truths):  # an int, 1-D positions, a 2-D boolean mask
        assert_no_less_accurate(model(ids, labels=labels, logits_to_keep=keep).loss, want, truth, what=str(keep))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :5], logits_to_keep=k)


def test_shift_labels():
    model = make_model()
    ids, labels = make_batch()
    shift = labels.roll(1, dims=1)  # any pre-shifted targets
    own, own64 = with_truth(model, lambda m: m(ids, labels=labels, shift_labels=shift).loss)
    rkt.patch_model(model, weighting="sft")
    assert_no_less_accurate(model(ids, labels=labels, shift_labels=shift).loss, own, own64, what="with labels")
    assert_no_less_accurate(model(ids, shift_labels=shift).loss, own, own64, what="no labels needed")


def test_without_labels_the_original_forward_runs():
    model = make_model().eval()
    ids, labels = make_batch()
    want = model(ids)
    want_gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    rkt.patch_model(model)
    got = model(ids)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), want_gen)
    # return_dict=False: a tuple without the (absent) logits, the loss first
    tup = model(ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], model(ids, labels=labels).loss)
    # labels passed by position follow the class's signature
    torch.testing.assert_close(model(ids, None, None, None, None, labels).loss, model(ids, labels=labels).loss)


def test_nll_masks_ignored_positions_itself(monkeypatch):
    """The core may leave NaN in the statistics of ignored positions: the NLL must not see them."""
    model = make_model()
    ids, labels = make_batch()
    own, own64 = with_truth(model, lambda m: m(ids, labels=labels).loss)
    real = rk.linear_cross_entropy

    def nan_stats(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        target = args[2]
        stats = {k: torch.where(target == -100, float("nan"), v.float()) for k, v in stats.items()}
        return loss, stats

    monkeypatch.setattr(rk, "linear_cross_entropy", nan_stats)
    rkt.patch_model(model, weighting="dft")
    out = model(ids, labels=labels)
    assert_no_less_accurate(out.nll, own, own64, what="nll")
    assert math.isnan(float(model(ids, labels=torch.full_like(labels, -100)).nll))  # no kept token


def test_unpatch_restores_the_original_forward():
    model = make_model().train()
    ids, labels = make_batch()
    want = model(ids, labels=labels)
    rkt.patch_model(model, weighting="ranktuner")
    assert rkt.is_patched(model) and "forward" in model.__dict__
    assert not torch.equal(model(ids, labels=labels).loss, want.loss)
    assert rkt.unpatch_model(model) is model and not rkt.is_patched(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is type(model).forward
    got = model(ids, labels=labels)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    rkt.unpatch_model(model)  # not patched: a no-op

    # an instance forward that was there before comes back (the same object)
    calls = []
    orig = model.forward

    def mine(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    model.forward = mine
    rkt.patch_model(model, weighting="sft")
    model(ids)  # no labels: through `mine`
    assert calls == [1]
    rkt.unpatch_model(model)
    assert model.forward is mine


def test_unpatch_after_a_wrapper_passes_through():
    model = make_model()
    ids, labels = make_batch()
    want = model(ids, labels=labels).loss
    rkt.patch_model(model, weighting="ranktuner")
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)  # e.g. TRL or accelerate wrapping it afterwards
    with pytest.warns(UserWarning, match="wrapped"):
        rkt.unpatch_model(model)
    assert torch.equal(model(ids, labels=labels).loss, want)


def test_peft_style_wrapper_patches_the_inner_model():
    class Wrapper(torch.nn.Module):  # what matters of PEFT's PeftModel: get_base_model, inner forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, *args, **kwargs):
            return self.inner.forward(*args, **kwargs)

    inner = make_model()
    wrapper = Wrapper(inner)
    ids, labels = make_batch()
    want, truth = with_truth(inner, lambda m: rk.cross_entropy(m(ids).logits[:, :-1], labels[:, 1:],
                                                               weighting="ranktuner", impl="reference"))
    assert rkt.patch_model(wrapper, weighting="ranktuner") is wrapper
    assert rkt.is_patched(wrapper) and rkt.is_patched(inner) and "forward" not in wrapper.__dict__
    assert_no_less_accurate(wrapper(ids, labels=labels).loss, want, truth, what="loss")
    assert rkt.unpatch_model(wrapper) is wrapper and not rkt.is_patched(inner)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = rkt.patch_model(make_model(), weighting="ranktuner")
    ids, labels = make_batch()
    clone = copy.deepcopy(model)
    assert rkt.is_patched(clone) and clone.forward.__self__ is clone
    loss = clone(ids, labels=labels).loss
    torch.testing.assert_close(loss, model(ids, labels=labels).loss, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_pickling_a_patched_model_refuses_and_names_save_pretrained(tmp_path):
    """Issue 24: ``torch.save(model)`` of a patched model loaded back running the class's plain
    forward (plain cross-entropy) while still marked patched. Pickling now raises, naming the
    way that keeps the objective: save_pretrained, load, patch_model again, which gives the
    same loss; unpatched, the model pickles and loads as any model."""
    import io
    import pickle

    model = rkt.patch_model(make_model(), weighting="ranktuner")
    ids, labels = make_batch()
    want = model(ids, labels=labels).loss.detach()
    plain = make_model()(ids, labels=labels).loss.detach()
    assert float(abs(want - plain)) > 1e-3  # the two objectives differ: losing the patch would show
    for dump in (lambda: torch.save(model, io.BytesIO()), lambda: pickle.dumps(model)):
        with pytest.raises(TypeError, match=r"patched by patch_model cannot be pickled.*save_pretrained.*"
                                            r"patch_model again"):
            dump()
    assert rkt.is_patched(model)  # the failed dump left the model as it was
    torch.testing.assert_close(model(ids, labels=labels).loss.detach(), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    rkt.patch_model(loaded, weighting="ranktuner")
    torch.testing.assert_close(loaded(ids, labels=labels).loss.detach(), want, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(rkt.unpatch_model(model), buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert not rkt.is_patched(restored)
    torch.testing.assert_close(restored(ids, labels=labels).loss.detach(), plain, rtol=0, atol=0)


def test_nll_meter_averages_like_trainer():
    """Train: the mean over optimizer steps of each step's token mean (Trainer averages its
    logged loss over steps); eval: the token-weighted mean."""
    meter = rkt.NLLMeter()
    t = torch.tensor
    meter.add("train", t(6.0), t(3.0))  # step 1: two micro-batches, 10 / 4 = 2.5
    meter.add("train", t(4.0), t(1.0))
    meter.end_step()
    meter.add("train", t(1.0), t(2.0))  # step 2: 0.5
    meter.add("eval", t(3.0), t(1.0))
    meter.add("eval", t(3.0), t(5.0))
    assert meter.take_last_eval().tolist() == [3.0, 5.0] and meter.take_last_eval() is None
    assert meter.pop_train() == pytest.approx(1.5)
    assert meter.pop_eval() == pytest.approx(1.0)
    assert meter.pop_train() is None and meter.pop_eval() is None
    with pytest.raises(ValueError, match="mode"):
        meter.add("test", t(1.0), t(1.0))


class _ShiftedLlama(transformers.LlamaForCausalLM):
    """A forward with a logit transform the fused loss does not reproduce (``+ 1``)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        logits = logits + 1.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _ScaledCappedLlama(transformers.LlamaForCausalLM):
    """Transforms the fused loss folds: a scale before a soft-cap, a division after it."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        logits = logits * self.config.pre_scale
        if (cap := self.config.cap) is not None:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        logits = logits / self.config.post_scale
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_scales_and_softcap_fold_into_the_core_transform():
    """c tanh(a z / c) / b = (a / b) (c/a) tanh(z / (c/a)): softcap c/a, temperature b/a."""
    model = _ScaledCappedLlama(make_model().config)
    model.config.pre_scale, model.config.cap, model.config.post_scale = 3.0, 2.0, 0.7
    model.train()
    ids, labels = make_batch()
    want, truth = with_truth(model, lambda m: loss_and_grads(m, lambda: m(ids, labels=labels).loss))
    rkt.patch_model(model)
    assert_as_accurate(loss_and_grads(model, lambda: model(ids, labels=labels).loss), want, truth, "sft")


def test_a_forward_that_cannot_be_reproduced_is_refused_by_name():
    shifted_model = _ShiftedLlama(make_model().config)
    with pytest.raises(ValueError, match=r"'llama' \(_ShiftedLlama\).*logits = logits \+ 1\.0"):
        rkt.patch_model(shifted_model)
    model = make_model()
    model.loss_function = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match="'llama'.*loss_function"):
        rkt.patch_model(model)
    assert not rkt.is_patched(model) and not rkt.is_patched(shifted_model)


def test_default_weighting_is_sft():
    """Every entry point defaults to plain cross-entropy: patch_model(model) gives the model's own loss."""
    model = make_model().train()
    ids, labels = make_batch()
    want, truth = with_truth(model, lambda m: m(ids, labels=labels).loss)
    got = rkt.patch_model(model)(ids, labels=labels)
    assert got.objective == "sft"
    assert_no_less_accurate(got.loss, want, truth, what="loss")
    assert rkt.make_compute_loss_func().objective == "sft"
    for fn in (rkt.patch_model, rkt.make_compute_loss_func):
        assert inspect.signature(fn).parameters["weighting"].default == "sft"


def test_bad_input_raises_naming_it():
    with pytest.raises(TypeError, match="model"):
        rkt.patch_model(torch.nn.Linear(2, 2))
    model = make_model()
    with pytest.raises(ValueError, match="weighting"):
        rkt.patch_model(model, weighting="nope")
    with pytest.raises(TypeError, match="chunk_sise"):
        rkt.patch_model(model, chunk_sise=4)
    with pytest.raises(TypeError, match="reduction"):
        rkt.patch_model(model, reduction="sum")
    with pytest.raises(TypeError, match="ignore_index"):
        rkt.patch_model(model, ignore_index="x")
    assert not rkt.is_patched(model)
    with pytest.raises(TypeError, match="inplace"):
        rkt.make_compute_loss_func(inplace=True)
    with pytest.raises(ValueError, match="weighting"):
        rkt.make_compute_loss_func("nope")


def test_options_reach_the_core():
    model = make_model()
    ids, labels = make_batch()
    want, truth = with_truth(model, lambda m: rk.cross_entropy(
        m(ids).logits[:, :-1], labels[:, 1:], weighting=rk.RankTuner(xi="geo"), impl="reference"))
    rkt.patch_model(model, weighting=rk.RankTuner(xi="geo"), chunk_size=3, impl="reference")
    out = model(ids, labels=labels)
    assert_no_less_accurate(out.loss, want, truth, what="loss")
    assert out.objective == "ranktuner"


def test_compute_loss_func():
    model = make_model()
    ids, labels = make_batch()
    outputs = model(ids)
    n = 17
    # the truth: the same float32 logits, the loss computed in float64
    logits64 = transformers.modeling_outputs.CausalLMOutputWithPast(logits=outputs.logits.double())
    fn = rkt.make_compute_loss_func("sft")
    for kw in ({"num_items_in_batch": n}, {}):
        own = model.loss_function(outputs.logits, labels, V, **kw)
        truth = causal_lm_loss_float64(logits64.logits, labels, V, **kw)
        assert_no_less_accurate(fn(outputs, labels, **kw), own, truth, what=f"sft {kw}")
    fn = rkt.make_compute_loss_func(rk.DFT())
    want = rk.cross_entropy(outputs.logits[:, :-1], labels[:, 1:], weighting="dft", impl="reference")
    truth = rk.cross_entropy(logits64.logits[:, :-1], labels[:, 1:], weighting="dft", impl="reference")
    assert_no_less_accurate(fn(outputs, labels), want, truth, what="dft")
    with pytest.raises(ValueError, match="logits"):
        fn(transformers.modeling_outputs.CausalLMOutputWithPast(loss=outputs.logits.sum()), labels)



def test_the_loss_pass_computes_no_optional_statistic(monkeypatch):
    """The patched forward (fused and eval_logits paths) and make_compute_loss_func ask the core
    only for the statistics they read (log p_t, entropy, accuracy): the optional accumulators of
    the statistics pass (log_sum_p2, logit_mean, is_top1) stay off in a training step."""
    from helpers import record_prepared_calls

    calls = record_prepared_calls(monkeypatch, "extra_stats")
    ids, labels = make_batch()
    model = rkt.patch_model(make_model(), weighting="ranktuner", eval_logits=True)
    model.train()(ids, labels=labels)
    model.eval()(ids, labels=labels)  # eval_logits: the logits, then rk.cross_entropy
    rkt.make_compute_loss_func("dft")(model(ids), labels)
    assert calls == [frozenset()] * 3


# ----------------------------------------------------------------------------- Trainer


def _dataset(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 7) % 9  # unequal lengths, so micro-batches hold unequal token counts
        ids = torch.randint(3, V, (length,), generator=g)
        labels = ids.clone()
        labels[: i % 4] = -100  # a masked "prompt"
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def _collate(batch):
    width = max(len(b["input_ids"]) for b in batch)
    out = {"input_ids": torch.zeros(len(batch), width, dtype=torch.long),
           "labels": torch.full((len(batch), width), -100),
           "attention_mask": torch.zeros(len(batch), width, dtype=torch.long)}
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
        out["labels"][i, :n] = torch.tensor(b["labels"])
        out["attention_mask"][i, :n] = 1
    return out


def _train(model, tmp_path, nll=False, **trainer_kwargs):
    pytest.importorskip("accelerate")  # Trainer needs it
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=3,
        gradient_accumulation_steps=2, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", learning_rate=1e-2, disable_tqdm=True, seed=0)
    data = _dataset()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:7],
                                   data_collator=_collate, **trainer_kwargs)
    if nll:
        rkt.add_nll_logging(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return steps, metrics, trainer


def _eval_token_mean_nll(model):
    """Token-weighted mean NLL of the eval set, from the unpatched model's logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 7, 3):
            batch = _collate(_dataset()[:7][start:start + 3])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = shifted(batch["labels"])
            total += float(torch.nn.functional.cross_entropy(  # in the model's dtype (float32, or float64)
                logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def test_trainer_patched_sft_logs_what_the_default_logs(tmp_path):
    """Gradient accumulation 2 over unequal micro-batches: the patched model (and
    compute_loss_func) log the default's losses and gradient norms, each no less accurate than the
    default's against the same run in float64; nll is logged next to loss; evaluate() reports
    eval_loss and eval_nll."""
    base = make_model()
    want_steps, want_eval, _ = _train(copy.deepcopy(base), tmp_path / "a")
    true_steps, true_eval, true_trainer = _train(float64_copy(base), tmp_path / "t")
    patched = rkt.patch_model(copy.deepcopy(base), weighting="sft")
    got_steps, got_eval, _ = _train(patched, tmp_path / "b", nll=True)
    fn_steps, fn_eval, _ = _train(copy.deepcopy(base), tmp_path / "c", nll=True,
                                  compute_loss_func=rkt.make_compute_loss_func("sft"))
    assert len(want_steps) == len(got_steps) == len(fn_steps) == len(true_steps) == 3
    for step, (want, got, fn, true) in enumerate(zip(want_steps, got_steps, fn_steps, true_steps)):
        for key in ("loss", "grad_norm"):
            for name, run in (("patched", got), ("compute_loss_func", fn)):
                assert_no_less_accurate(run[key], want[key], true[key], what=f"{name} step {step} {key}")
        assert "nll" not in want
        for run in (got, fn):  # sft: the objective is the NLL
            assert_no_less_accurate(run["nll"], want["loss"], true["loss"], what=f"step {step} nll")
    for run in (got_eval, fn_eval):
        assert_no_less_accurate(run["eval_loss"], want_eval["eval_loss"], true_eval["eval_loss"], what="eval_loss")
    # both models hold the same weights after the same three steps
    want_nll, true_nll = _eval_token_mean_nll(rkt.unpatch_model(patched)), _eval_token_mean_nll(true_trainer.model)
    for run in (got_eval, fn_eval):
        assert_no_less_accurate(run["eval_nll"], want_nll, true_nll, what="eval_nll")


def test_trainer_ranktuner_run_logs_nll_and_evaluates(tmp_path):
    model = rkt.patch_model(make_model(), weighting="ranktuner")
    steps, metrics, trainer = _train(model, tmp_path, nll=True)
    for step in steps:
        assert math.isfinite(step["loss"]) and math.isfinite(step["nll"]) and step["loss"] != step["nll"]
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_nll"])
    # no labels: the original forward's logits, in float32 and (the truth) in float64
    want, truth = _eval_token_mean_nll(model), _eval_token_mean_nll(float64_copy(model))
    assert_no_less_accurate(metrics["eval_nll"], want, truth, what="eval_nll")
    # predict() (no logits to return: an empty tuple) and a later evaluate() report the same NLL, exactly: the
    # same computation on the same weights and batches
    model.eval()
    model(**_collate(_dataset()[:2]))  # an eval-mode call outside Trainer's loops is not counted
    prediction = trainer.predict(_dataset()[:7])
    assert prediction.predictions == () and prediction.metrics["test_nll"] == metrics["eval_nll"]
    assert trainer.evaluate()["eval_nll"] == metrics["eval_nll"]


def test_trainer_eval_logits_for_compute_metrics(tmp_path):
    """compute_metrics needs logits: eval_logits=True materialises them in eval mode only."""
    seen = []

    def compute_metrics(pred):
        seen.append(pred.predictions)
        return {"n_predictions": float(len(pred.predictions))}

    base = make_model()
    _, fused, _ = _train(rkt.patch_model(copy.deepcopy(base), weighting="ranktuner"), tmp_path / "a")
    model = rkt.patch_model(copy.deepcopy(base), weighting="ranktuner", eval_logits=True)
    _, metrics, trainer = _train(model, tmp_path / "b", compute_metrics=compute_metrics)
    assert seen and seen[-1].shape[0] == 7 and seen[-1].shape[-1] == V
    # the same trained weights (both runs train on the fused loss) evaluated on the logits, in float64
    truth_trainer = transformers.Trainer(model=float64_copy(trainer.model), args=trainer.args,
                                         eval_dataset=_dataset()[:7], data_collator=_collate)
    truth = truth_trainer.evaluate()["eval_loss"]
    assert_no_less_accurate(metrics["eval_loss"], fused["eval_loss"], truth, what="eval_loss on the logits")


# ----------------------------------------------------------------------------- TRL


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(V)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2")


def test_trl_sft_trainer_recipe(tmp_path):
    """TRL's SFTTrainer computes its loss with a fused head of its own and never calls the
    model with labels; the recipe routes compute_loss back to the model's loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")

    class RankTunerSFTTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                     num_items_in_batch=num_items_in_batch)

    g = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_list(
        [{"input_ids": torch.randint(3, V, (5 + (i * 7) % 9,), generator=g).tolist()} for i in range(8)])

    def run(cls, model, out, evaluate=True):
        args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             learning_rate=1e-2, disable_tqdm=True, seed=0)
        trainer = cls(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=_tokenizer())
        if rkt.is_patched(model):
            rkt.add_nll_logging(trainer)
        trainer.train()
        steps = [h for h in trainer.state.log_history if "loss" in h]
        return steps, (trainer.evaluate() if evaluate else None)

    base = make_model()
    trl_default, _ = run(trl.SFTTrainer, copy.deepcopy(base), tmp_path / "a", evaluate=False)
    own, own_eval = run(RankTunerSFTTrainer, copy.deepcopy(base), tmp_path / "b")  # the model's own loss
    got, got_eval = run(RankTunerSFTTrainer, rkt.patch_model(copy.deepcopy(base), weighting="sft"), tmp_path / "c")
    true, true_eval = run(RankTunerSFTTrainer, float64_copy(base), tmp_path / "t")  # the truth: float64
    assert len(trl_default) == len(own) == len(got) == len(true) == 2
    # same weights and batch at step 1: TRL's own loss is the same NLL
    assert_no_less_accurate(got[0]["loss"], trl_default[0]["loss"], true[0]["loss"], what="step 0 loss vs TRL")
    for step, (w, g_, t) in enumerate(zip(own, got, true)):
        for key in ("loss", "grad_norm"):
            assert_no_less_accurate(g_[key], w[key], t[key], what=f"step {step} {key}")
        assert_no_less_accurate(g_["nll"], w["loss"], t["loss"], what=f"step {step} nll")
    assert_no_less_accurate(got_eval["eval_loss"], own_eval["eval_loss"], true_eval["eval_loss"], what="eval_loss")
    # one eval batch of 8 rows: the batch mean is the token mean
    assert_no_less_accurate(got_eval["eval_nll"], own_eval["eval_loss"], true_eval["eval_loss"], what="eval_nll")

    ranktuner, _ = run(RankTunerSFTTrainer, rkt.patch_model(copy.deepcopy(base), weighting="ranktuner"),
                       tmp_path / "d", evaluate=False)
    assert all(math.isfinite(h["loss"]) and h["loss"] != pytest.approx(h["nll"]) for h in ranktuner)


@pytest.mark.slow
def test_fsdp2_patched_model_head_as_its_own_unit(tmp_path):
    """patch_model under FSDP2 on 2 gloo ranks: per-layer + root units (untied and tied heads),
    and the LM head as its own fully_shard unit (rk.distributed.head_cross_entropy), against the unpatched model."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import distributed_cases

    distributed_cases.run_suite("hf2", 2, str(tmp_path), cases=4)


@pytest.mark.slow
def test_deepspeed_zero3_patched_model(tmp_path):
    """patch_model under DeepSpeed ZeRO-3 on 2 gloo ranks, every parameter partitioned (the head's
    included): untied and tied heads, a batch-level weighting (the head read again in backward),
    ranktuner, a model loaded by from_pretrained under deepspeed.zero.Init, LoRA on q/v and the
    head, and two Trainer steps with a ZeRO-3 deepspeed= config, against the unpatched model."""
    import torch.distributed as dist

    pytest.importorskip("deepspeed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import distributed_cases

    distributed_cases.run_suite("zero3", 2, str(tmp_path), cases=7)

