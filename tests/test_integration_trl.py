"""The TRL drop-in: ``from ranktuner_kernels.integrations.trl import SFTTrainer``.

A tiny Llama built from a config and a tiny token dataset made here; the references are TRL's
own ``trl.SFTTrainer`` on the same model, data and seed, and that trainer in float64 with the
fused head by the definitions (``tests/_trl_runs.py``).
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

from _trl_runs import (V, assert_logs_close, step_logs, tiny_llama, trl_kernel_forbidden,  # noqa: E402
                       truth_trainer, word_tokenizer)

from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402
from ranktuner_kernels.integrations import trl as rktrl  # noqa: E402
from ranktuner_kernels.integrations.trl.head import has_fused_lm_head  # noqa: E402

METRICS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread
_model, _tokenizer = tiny_llama, word_tokenizer


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
                         save_strategy="no", optim="sgd", learning_rate=0.5, disable_tqdm=True, seed=0,
                         bf16=False)  # SFTConfig defaults to bf16 autocast, on the CPU too
    data = _data()
    make = (lambda **kw: truth_trainer(trl.SFTTrainer, **kw)) if cls == "truth" else cls
    trainer = make(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(5)),
                   processing_class=_tokenizer(), **kwargs)
    trainer.train()
    return step_logs(trainer), trainer.evaluate(), trainer


class _ModelsOwnLoss(trl.SFTTrainer):
    """TRL's SFTTrainer with transformers' compute_loss: the unpatched model's own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                 num_items_in_batch=num_items_in_batch)


def test_drop_in_logs_what_trl_logs(tmp_path):
    """weighting="sft", two SGD steps with gradient accumulation 2 over prompt-masked rows, then
    an evaluation, three ways: TRL's SFTTrainer, ours (TRL's kernel made to raise), and TRL's on
    the float64 model with the definition head (the truth). Every metric both log (loss,
    grad_norm, entropy, mean_token_accuracy, num_tokens, learning_rate, epoch, eval_*) is within
    K = 4 times TRL's own float32 error of the truth (``tests/_trl_runs.py``: the fixed rel=1e-4
    this replaces was what one machine printed); ``nll`` is logged next to ``loss`` and, for
    "sft", equals it up to the float32 sum of the same per-token terms (1e-5)."""
    from ranktuner_kernels.integrations.trl import SFTTrainer  # the documented one-line switch

    base = _model()
    trl_steps, trl_eval, _ = _run(trl.SFTTrainer, copy.deepcopy(base), tmp_path / "a")
    with trl_kernel_forbidden():
        got, got_eval, trainer = _run(SFTTrainer, copy.deepcopy(base), tmp_path / "b")
    want, want_eval, _ = _run("truth", copy.deepcopy(base).double(), tmp_path / "c")
    assert issubclass(SFTTrainer, trl.SFTTrainer) and has_fused_lm_head(trainer.model)
    assert all(k in g for g in got for k in METRICS) and len(got) == 2
    for g in got:
        assert g["nll"] == pytest.approx(g["loss"], rel=1e-5)  # sft: the objective is the NLL
    assert got_eval["eval_nll"] == pytest.approx(got_eval["eval_loss"], rel=1e-5)  # one eval batch
    drop = lambda log: {k: v for k, v in log.items() if k not in ("nll", "eval_nll")}  # noqa: E731
    assert_logs_close(trl_steps, [drop(g) for g in got], want, "SFTTrainer")
    assert_logs_close([trl_eval], [drop(got_eval)], [want_eval], "SFTTrainer evaluate")
    assert got[-1]["num_tokens"] > got[0]["num_tokens"] > 0 and got[-1]["mean_token_accuracy"] > 0


def test_drop_in_moe_router_loss(tmp_path):
    """A tiny Mixtral (router loss coefficient 0.02): the loss carries TRL's router term (divided
    by the accumulation steps) and aux_loss is logged; every metric within K of the float64
    truth as above."""
    from _tiny_models import tiny_model

    base = tiny_model("mixtral", "MixtralForCausalLM").train()
    base.set_experts_implementation("eager")  # grouped_mm has no float64 kernel on the CPU
    trl_steps, _, _ = _run(trl.SFTTrainer, copy.deepcopy(base), tmp_path / "a")
    with trl_kernel_forbidden():
        got, _, _ = _run(rktrl.SFTTrainer, copy.deepcopy(base), tmp_path / "b")
    want, _, _ = _run("truth", copy.deepcopy(base).double(), tmp_path / "c")
    assert all("aux_loss" in g for g in got)
    assert_logs_close(trl_steps, [{k: v for k, v in g.items() if k != "nll"} for g in got], want, "SFTTrainer MoE")


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
    assert has_fused_lm_head(trainer.model) and len(own) == len(got) == 2
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
    assert trainer.loss_options == {"weighting": "ranktuner", "temperature": 1.0, "chunk_size": 32}
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
    """One fresh interpreter: importing the package imports neither TRL nor transformers; without
    TRL, asking for any trainer class raises an ImportError that names the extra."""
    code = ("import sys, ranktuner_kernels.integrations.trl as m\n"
            "assert 'trl' not in sys.modules and 'transformers' not in sys.modules\n"
            "sys.modules['trl'] = None\n"
            "for name in ('SFTTrainer', 'GRPOTrainer', 'RLOOTrainer', 'DPOTrainer', 'KTOTrainer'):\n"
            "    try:\n        getattr(m, name)\n    except ImportError as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.count("ranktuner-kernels[trl]") == 5, out.stdout + out.stderr
    assert "integrations.trl.GRPOTrainer needs TRL" in out.stdout
