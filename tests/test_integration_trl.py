"""The TRL drop-in: ``from ranktuner_kernels.integrations.trl import SFTTrainer``.

A tiny Llama built from a config and a tiny token dataset made here; the reference is TRL's own
``trl.SFTTrainer`` on the same model, data and seed.
"""

import copy
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402
from ranktuner_kernels.integrations import trl as rktrl  # noqa: E402

V = 96
CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
METRICS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(V)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2")


def _data(n=8):
    """Prompt-completion rows of unequal lengths (TRL masks the prompt out of the loss)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + (i * 7) % 9
        prompt, completion = (torch.randint(3, V, (n,), generator=g).tolist() for n in (2 + i % 3, length))
        rows.append({"prompt": " ".join(f"w{t}" for t in prompt),
                     "completion": " " + " ".join(f"w{t}" for t in completion)})
    return datasets.Dataset.from_list(rows)


def _run(cls, model, out, **kwargs):
    args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=5,
                         gradient_accumulation_steps=2, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                         save_strategy="no", optim="sgd", learning_rate=0.5, disable_tqdm=True, seed=0)
    data = _data()
    trainer = cls(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(5)),
                  processing_class=_tokenizer(), **kwargs)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return steps, trainer.evaluate(), trainer


class _ModelsOwnLoss(trl.SFTTrainer):
    """TRL's SFTTrainer with transformers' compute_loss: the unpatched model's own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                 num_items_in_batch=num_items_in_batch)


def test_drop_in_logs_what_trl_logs(tmp_path):
    """weighting="sft", two SGD steps with gradient accumulation 2 over prompt-masked rows, then
    an evaluation: the losses and gradient norms equal the unpatched model's own loss run through
    the same trainer (tight), and TRL's own SFTTrainer's (whose chunked head rounds its gradient
    differently: 1e-4); TRL's metrics (entropy, mean_token_accuracy, num_tokens, and eval_*)
    equal TRL's; nll is logged next to loss."""
    from ranktuner_kernels.integrations.trl import SFTTrainer  # the documented one-line switch

    base = _model()
    trl_steps, trl_eval, _ = _run(trl.SFTTrainer, copy.deepcopy(base), tmp_path / "a")
    own, own_eval, _ = _run(_ModelsOwnLoss, copy.deepcopy(base), tmp_path / "b")
    got, got_eval, trainer = _run(SFTTrainer, copy.deepcopy(base), tmp_path / "c")
    assert issubclass(SFTTrainer, trl.SFTTrainer)
    assert rkt.is_patched(trainer.model) and len(trl_steps) == len(own) == len(got) == 2
    for t, o, g in zip(trl_steps, own, got):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(o[key], rel=1e-6), key
            assert g[key] == pytest.approx(t[key], rel=1e-4), key
        for key in ("entropy", "mean_token_accuracy", "num_tokens"):
            assert g[key] == pytest.approx(t[key], rel=1e-4), key
        assert g["nll"] == pytest.approx(g["loss"], rel=1e-5)  # sft: the objective is the NLL
    assert got[0]["loss"] == pytest.approx(trl_steps[0]["loss"], rel=1e-6)  # same weights, same batch
    assert got[-1]["num_tokens"] > got[0]["num_tokens"] > 0 and got[-1]["mean_token_accuracy"] > 0
    assert got_eval["eval_loss"] == pytest.approx(own_eval["eval_loss"], rel=1e-6)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert got_eval[key] == pytest.approx(trl_eval[key], rel=1e-4), key
    assert got_eval["eval_nll"] == pytest.approx(got_eval["eval_loss"], rel=1e-5)  # one eval batch


def test_drop_in_with_peft_config(tmp_path):
    """TRL wraps the model with PEFT (peft_config: LoRA on q_proj and v_proj with dropout, the
    head in modules_to_save); the drop-in patches the inner model and trains exactly like the
    unpatched PEFT model's own loss (same seed, same dropout masks). (TRL 1.16 refuses a LoRA
    adapter on lm_head itself, for its trainer and so for this one.)"""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                             lora_dropout=0.1, init_lora_weights=False, modules_to_save=["lm_head"])
    base = _model()
    own, own_eval, _ = _run(_ModelsOwnLoss, copy.deepcopy(base), tmp_path / "a", peft_config=config)
    got, got_eval, trainer = _run(rktrl.SFTTrainer, copy.deepcopy(base), tmp_path / "b", peft_config=config)
    assert rkt.is_patched(trainer.model) and len(own) == len(got) == 2
    assert type(trainer.model.get_output_embeddings()).__name__ == "ModulesToSaveWrapper"
    for o, g in zip(own, got):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(o[key], rel=1e-5), key
    assert got_eval["eval_loss"] == pytest.approx(own_eval["eval_loss"], rel=1e-5)


def test_drop_in_weighting_and_options(tmp_path):
    """Another weighting changes the loss but not what the metrics measure at step 1 (same
    weights, same batch); loss options reach the core."""
    base = _model()
    sft, _, _ = _run(rktrl.SFTTrainer, copy.deepcopy(base), tmp_path / "a")
    rt, _, trainer = _run(rktrl.SFTTrainer, copy.deepcopy(base), tmp_path / "b", weighting="ranktuner",
                          chunk_size=32)
    assert rkt._unwrap(trainer.model)._ranktuner_patch.options == {"chunk_size": 32}
    assert all(math.isfinite(h["loss"]) and h["loss"] != pytest.approx(h["nll"]) for h in rt)
    for key in ("nll", "entropy", "mean_token_accuracy", "num_tokens"):
        assert rt[0][key] == pytest.approx(sft[0][key], rel=1e-5), key


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(chunk_sise=32), TypeError, "chunk_sise: neither an argument of trl.SFTTrainer nor a loss option"),
    (dict(weighting="no_such_weighting"), ValueError, "no_such_weighting"),
    (dict(compute_loss_func=lambda *a, **k: 0), ValueError, "compute_loss_func"),
    (dict(args_loss_type="dft"), ValueError, "loss_type='dft'.*weighting="),
    (dict(patched=True), ValueError, "already patched"),
])
def test_drop_in_refusals(tmp_path, kwargs, error, match):
    model = _model()
    if kwargs.pop("patched", False):
        rkt.patch_model(model, weighting="sft")
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type=kwargs.pop("args_loss_type",
                                                                                                    "nll"))
    with pytest.raises(error, match=match):
        rktrl.SFTTrainer(model=model, args=args, train_dataset=_data(2), processing_class=_tokenizer(), **kwargs)


def test_trl_is_imported_lazily_and_its_absence_names_the_extra():
    """One fresh interpreter: importing the module imports neither TRL nor transformers; without
    TRL, asking for the class raises an ImportError that names the extra."""
    code = ("import sys, ranktuner_kernels.integrations.trl as m\n"
            "assert 'trl' not in sys.modules and 'transformers' not in sys.modules\n"
            "sys.modules['trl'] = None\n"
            "try:\n    m.SFTTrainer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ranktuner-kernels[trl]" in out.stdout, out.stdout + out.stderr
