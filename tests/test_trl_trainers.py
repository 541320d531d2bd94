"""The drop-ins ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``, ``KTOTrainer`` of
``ranktuner_kernels.integrations.trl``: each runs TRL's class, ours (TRL's chunked kernel made to
raise) and the float64 truth (TRL's class on the float64 model with the definition head) for two
steps on a tiny Llama, same data and seed; every logged metric of ours is within K = 4 times TRL's
own float32 error of the truth (``tests/_trl_runs.py``). A reference model (beta > 0) is used
where the trainer has one, so both heads TRL installs are ours.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from _trl_runs import (V, assert_logs_close, step_logs, tiny_llama, trl_kernel_forbidden,  # noqa: E402
                       truth_trainer, word_tokenizer, words)

import ranktuner_kernels.integrations.trl as rktrl  # noqa: E402
from ranktuner_kernels.integrations.trl.head import has_fused_lm_head, head_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

COMMON = dict(max_steps=2, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", optim="sgd",
              disable_tqdm=True, seed=0)


def _rows(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 6, (n,), generator=g)]


def _reward(completions, **kwargs):
    """A reward that varies between completions: the sum of the token ids, mod 7."""
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def _online(config_cls, **extra):
    data = datasets.Dataset.from_list([{"prompt": words(p)} for p in _rows(8)])
    return data, lambda out, **kw: config_cls(output_dir=str(out), per_device_train_batch_size=4, num_generations=2,
                                              max_completion_length=4, learning_rate=0.1, beta=0.1, **COMMON, **kw)


def _dpo():
    prompts, good, bad = _rows(8, 1), _rows(8, 2), _rows(8, 3)
    data = datasets.Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                                       for p, c, r in zip(prompts, good, bad)])
    return data, lambda out, **kw: trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=2, learning_rate=0.5, beta=0.1, **COMMON,
                                                 **kw)


def _kto():
    prompts, completions = _rows(8, 1), _rows(8, 2)
    data = datasets.Dataset.from_list([{"prompt": words(p), "completion": " " + words(c), "label": i % 3 != 0}
                                       for i, (p, c) in enumerate(zip(prompts, completions))])
    return data, lambda out, **kw: trl.KTOConfig(output_dir=str(out), per_device_train_batch_size=4,
                                                 learning_rate=0.5, beta=0.1, **COMMON, **kw)


CASES = {
    "GRPOTrainer": lambda: _online(trl.GRPOConfig),
    "RLOOTrainer": lambda: _online(trl.RLOOConfig),
    "DPOTrainer": _dpo,
    "KTOTrainer": _kto,
    "DPOTrainer+peft": _dpo,  # LoRA on q/v: the head on the PEFT base model, the reference = adapters disabled
}


@pytest.mark.parametrize("name", list(CASES))
def test_drop_in_logs_what_trl_logs(name, tmp_path):
    data, config = CASES[name]()
    name, _, peft = name.partition("+")
    trl_cls, ours_cls = getattr(trl, name), getattr(rktrl, name)
    assert issubclass(ours_cls, trl_cls) and ours_cls.__name__ == name
    online = name in ("GRPOTrainer", "RLOOTrainer")
    path = tmp_path / "model"  # saved: the trainers build the reference model from the policy's path
    tiny_llama().save_pretrained(path)
    extra = {"reward_funcs": _reward} if online else {}
    if peft:
        peft = pytest.importorskip("peft")
        extra["peft_config"] = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"])

    def run(make, out, dtype):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        trainer = make(model=model, args=config(tmp_path / out), train_dataset=data,
                       processing_class=word_tokenizer(), **extra)
        trainer.train()
        assert trainer.model.dtype == getattr(torch, dtype)
        return step_logs(trainer), trainer

    theirs, _ = run(trl_cls, "a", "float32")
    with trl_kernel_forbidden():
        ours, trainer = run(ours_cls, "b", "float32")
    truth, _ = run(lambda **kw: truth_trainer(trl_cls, **kw), "c", "float64")
    assert has_fused_lm_head(trainer.model)
    ref = getattr(trainer, "ref_model", None)
    assert (ref is None) == bool(peft) and (peft or has_fused_lm_head(ref))  # beta > 0: the reference's head too
    if online:
        assert head_state(trainer.model).temperature == trainer.temperature
    assert len(ours) == 2
    assert_logs_close(theirs, ours, truth, name)


def test_trl_kernel_guard_can_fail():
    """The guard used above does stop TRL's kernel: TRL's own head raises inside it."""
    model = tiny_llama()
    trl.trainer.utils.add_fused_lm_head(model)
    ids = torch.randint(3, V, (1, 6))
    with trl_kernel_forbidden(), pytest.raises(AssertionError, match="_ChunkedLogProbFunction ran"):
        model(ids, labels=ids, fused_lm_head=True)
    model(ids, labels=ids, fused_lm_head=True)  # restored afterwards
