"""``GRPOTrainer(east=..., thr=...)`` of ``ranktuner_kernels.integrations.trl``: on the trainer's
own generation batch (a tiny float64 Llama, ``_generate_and_score_completions`` called as
``train()`` calls it), the EAST weights multiply each prompt's advantages and loss exactly as
``rk.rl.east_weights`` says; the THR-adjusted advantages equal ``rk.rl.linear_thr_guided_advantages``
and the logits form ``rk.rl.thr_guided_advantages`` on hidden states computed here, by the
unpatched decoder, without a second forward when TRL already ran one; the metrics are logged;
bad options raise naming the argument; ``examples/grpo_trl.py --quick`` runs.
"""

import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from _trl_runs import V, tiny_llama, trl_kernel_forbidden, word_tokenizer, words  # noqa: E402
from helpers import load_example  # noqa: E402

import ranktuner_kernels.rl as rl  # noqa: E402
from ranktuner_kernels.integrations.trl import EASTOptions, GRPOTrainer, THROptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

PROMPTS, G = 4, 4  # prompts per generation batch, completions per prompt
T = 0.7  # the sampling temperature (the head's): THR's policy is softmax(z / T)
EPS32 = 2.0 ** -24


def _reward(completions, **kwargs):
    """Varies between completions: the sum of the token ids, mod 7."""
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def _answer(completion):
    """A coarse 'final answer' (so that completions share clusters): the first token id mod 3."""
    first = completion.split()[:1]
    return int(first[0][1:]) % 3 if first and first[0][1:].isdigit() else None


def _data():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (PROMPTS,), generator=g)
    prompts = [torch.randint(3, V, (int(k),), generator=g).tolist() for k in lengths]
    return datasets.Dataset.from_list([{"prompt": words(p), "label": i} for i, p in enumerate(prompts)])


def _trainer(tmp_path, dtype=torch.float64, steps_per_generation=1, max_steps=2, **options):
    model = tiny_llama().to(dtype)
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=PROMPTS * G // steps_per_generation,
                          steps_per_generation=steps_per_generation, num_generations=G, max_completion_length=5,
                          temperature=T, learning_rate=0.1, max_steps=max_steps, logging_steps=1, report_to=[],
                          use_cpu=True, bf16=False, save_strategy="no", optim="sgd", disable_tqdm=True, seed=0)
    return GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_data(),
                       processing_class=word_tokenizer(), **options)


def _generation(trainer):
    """One generation batch as ``train()`` makes it: each prompt ``G`` times; returns TRL's output
    (with our options applied) and TRL's own advantages, rewards and completions of it."""
    rows = [row for row in trainer.train_dataset for _ in range(G)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows)
    n = len(rows)
    plain = torch.tensor(list(trainer._logs["advantages"])[-n:])
    rewards = torch.tensor(list(trainer._logs["rewards"]["_reward"])[-n:])
    completions = list(trainer._logs["completion"])[-n:]
    return out, plain, rewards, completions


def _rows(batch, index):
    """The batch restricted to the completions ``index`` (the scalars as they are)."""
    return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def _loss(trainer, batch):
    trainer.model.eval()  # no gradient accumulation scaling; same normalizer for every call
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, batch)


def test_east_weights_multiply_each_prompts_advantages_and_loss(tmp_path):
    east = EASTOptions(a=1.5, extract_answer=_answer)
    trainer = _trainer(tmp_path, east=east)
    out, plain, _, completions = _generation(trainer)
    groups = [[_answer(c) for c in completions[i:i + G]] for i in range(0, len(completions), G)]
    entropy = rl.answer_entropy(groups)
    w = rl.east_weights(entropy, 1.5)
    assert w.min() < 0.9 and w.max() > 1.1, w  # the batch has prompts of unequal weight
    group = torch.arange(len(plain)) // G
    assert torch.equal(out["advantages"], plain * w[group])
    m = trainer._metrics["train"]
    assert (m["east/answer_entropy"][-1], m["east/weight_min"][-1], m["east/weight_max"][-1]) == pytest.approx(
        (float(entropy.mean()), float(w.min()), float(w.max())))

    # the loss (TRL's default, dapo: token sum over the batch's token count) of each prompt is its
    # weight times the plain loss; each advantage was rounded once to float32 (2^-24 relative)
    # and the float64 loss is linear in the advantages, so the bound is 2^-24 times the loss of |A|
    plain_batch = {**out, "advantages": plain}
    total = 0.0
    for q in range(PROMPTS):
        rows = group == q
        got = _loss(trainer, _rows(out, rows))
        want = w[q].double() * _loss(trainer, _rows(plain_batch, rows))
        scale = w[q].double() * _loss(trainer, _rows({**plain_batch, "advantages": -plain.abs()}, rows))
        assert abs(float(got - want)) <= 2 * EPS32 * float(scale) + 1e-15, (q, got, want)
        total = total + got
    torch.testing.assert_close(_loss(trainer, out), total, rtol=1e-12, atol=1e-15)  # prompts add up


def _at_least(k):
    """A THR correctness predicate called like a reward function (checks it gets the columns)."""

    def correct(prompts, completions, completion_ids, rewards, label, **kwargs):
        assert len(label) == len(prompts) == len(completions) == len(rewards) and "trainer_state" not in kwargs
        return [r >= k for r in rewards]

    return correct


@pytest.mark.parametrize("path, rule", [("own forward", None), ("own forward", 2.5), ("TRL's forward", "callable")])
def test_thr_advantages_equal_the_linear_and_the_logits_forms(tmp_path, path, rule):
    """``path``: TRL runs no policy forward at generation (on-policy), so THR runs one without
    gradient; or TRL computes old log-probabilities (steps_per_generation=2 > 1 accumulation
    step), whose forward hands THR its hidden states. One forward in both cases."""
    correct = _at_least(3) if rule == "callable" else rule
    options = THROptions(p=0.2, tau="nthr", entropy_top=0.2, correct=correct)
    trainer = _trainer(tmp_path, steps_per_generation=2 if path == "TRL's forward" else 1, thr=options)
    calls = []
    forward = trainer._get_per_token_logps_and_entropies

    def counted(model, *args, **kwargs):
        calls.append(model is trainer.model)
        return forward(model, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = counted
    with trl_kernel_forbidden():
        out, plain, rewards, _ = _generation(trainer)
    assert calls == [True] and (("old_per_token_logps" in out) == (path == "TRL's forward"))

    group = torch.arange(len(plain)) // G
    if rule is None:
        correct = rewards > rewards.view(-1, G).mean(1).repeat_interleave(G)
    else:
        correct = rewards >= 3 if rule == "callable" else rewards > rule
    ids, mask = out["completion_ids"], out["completion_mask"]
    model = trainer.model
    with torch.no_grad():  # the unpatched decoder: hidden state t predicts token t + 1
        hidden = model.model(input_ids=torch.cat([out["prompt_ids"], ids], 1),
                             attention_mask=torch.cat([out["prompt_mask"], mask], 1)).last_hidden_state
    hidden = hidden[:, :-1][:, -ids.shape[1]:]
    weight = model.lm_head.weight.detach()
    kw = dict(mask=mask, p=0.2, entropy_top=0.2)
    linear, info = rl.linear_thr_guided_advantages(hidden, weight, ids, plain, correct, group, temperature=T, **kw)
    logits, _ = rl.thr_guided_advantages(hidden @ weight.T / T, ids, plain, correct, group, hidden=hidden,
                                         impl="naive", **kw)
    assert info["active"].any() and (info["high_thr"].any() or info["high_entropy"].any())
    assert out["advantages"].shape == ids.shape
    assert torch.equal(out["advantages"], linear) and torch.equal(out["advantages"], logits)
    assert not torch.equal(out["advantages"], plain[:, None].expand_as(ids) * mask)  # THR changed some
    m = trainer._metrics["train"]
    active = info["active"]
    assert m["thr/mean"][-1] == pytest.approx(float(info["thr"][active].mean()), rel=1e-6)
    assert m["thr/active_frac"][-1] == pytest.approx(float(active.sum() / mask.sum()))


def test_metrics_are_logged_in_training(tmp_path):
    trainer = _trainer(tmp_path, dtype=torch.float32, east=EASTOptions(a=1.0, extract_answer=_answer),
                       thr=THROptions(p=-0.1))
    with trl_kernel_forbidden():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert {"reward", "entropy", "east/answer_entropy", "east/weight_min", "east/weight_max",
                "thr/active_frac", "thr/adjusted_frac"} <= log.keys()
        assert log["east/weight_min"] <= 1 + 1e-6 and log["east/weight_max"] >= 1 - 1e-6  # mean 1
        assert all(0.0 <= v <= 1.0 for k, v in log.items() if k.startswith("thr/") and k.endswith("_frac"))
    assert any({"thr/mean", "thr/tau", "thr/high_frac", "thr/zeroed_frac"} <= log.keys() for log in logs)
    assert all(math.isfinite(v) for log in logs for k, v in log.items() if k.startswith(("east/", "thr/")))


def test_without_options_it_is_trls_trainer(tmp_path):
    trainer = _trainer(tmp_path, dtype=torch.float32)
    out, plain, _, _ = _generation(trainer)
    assert torch.equal(out["advantages"], plain)
    assert not any(k.startswith(("east/", "thr/")) for k in trainer._metrics["train"])


def test_bad_options_raise_naming_the_argument(tmp_path):
    with pytest.raises(TypeError, match="a:"):
        EASTOptions(a="1", extract_answer=_answer)
    with pytest.raises(ValueError, match="a:"):
        EASTOptions(a=math.nan, extract_answer=_answer)
    with pytest.raises(TypeError, match="extract_answer"):
        EASTOptions(a=1.0, extract_answer="first word")
    with pytest.raises(ValueError, match="eps"):
        EASTOptions(a=1.0, extract_answer=_answer, eps=-1.0)
    with pytest.raises(ValueError, match="p:"):
        THROptions(p=1.5)
    with pytest.raises(TypeError, match="p:"):
        THROptions(p=True)
    with pytest.raises(ValueError, match="tau"):
        THROptions(p=0.1, tau="median")
    with pytest.raises(ValueError, match="entropy_top"):
        THROptions(p=0.1, entropy_top=1.2)
    with pytest.raises(TypeError, match="correct"):
        THROptions(p=0.1, correct="yes")
    with pytest.raises(ValueError, match="normalize"):
        THROptions(p=0.1, normalize="tokens")
    with pytest.raises(TypeError, match="keep_low"):
        THROptions(p=0.1, keep_low=1)
    with pytest.raises(TypeError, match="east"):
        _trainer(tmp_path, east={"a": 1.0})
    with pytest.raises(TypeError, match="thr"):
        _trainer(tmp_path, thr=0.1)
    trainer = _trainer(tmp_path, east=EASTOptions(a=1.0, extract_answer=lambda c: c.split()))  # a list
    with pytest.raises(TypeError, match="unhashable list"):
        _generation(trainer)
    trainer = _trainer(tmp_path, thr=THROptions(p=0.1, correct=lambda **kw: [True]))
    with pytest.raises(ValueError, match="one bool per completion"):
        _generation(trainer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        THROptions(p=0.1).p = 0.2


def test_example_quick_run(tmp_path):
    """``examples/grpo_trl.py --quick``: both variants run through the drop-in, the options'
    metrics reach the histories, the table and the files are written."""
    example = load_example("grpo_trl")
    result = example.run(example.Config(**example.QUICK), str(tmp_path), quiet=True)
    assert [r["variant"] for r in result["runs"]] == ["plain", "both"]
    plain, both = result["runs"]
    assert not any(k.startswith(("east/", "thr/")) for k in plain["history"])
    assert {"east/answer_entropy", "east/weight_min", "east/weight_max", "thr/active_frac"} <= both["history"].keys()
    for r in result["runs"]:
        assert len(r["history"]["reward"]) == example.QUICK["steps"]
        assert 0.0 <= r["greedy_accuracy"] <= 1.0 and r["seconds"] > 0
    assert "| plain |" in result["table"] and "| both |" in result["table"]
    assert (tmp_path / "grpo_trl.json").stat().st_size > 0


def test_committed_results_are_the_default_run_and_the_docs_show_them():
    """``examples/results/grpo_trl/``: the json is the example's default experiment (its config,
    every variant x seed with the full history), its summary is ``summarize`` of its runs, and
    docs/rl.md and the README show the example's ``table`` of it (a rerun with ``--update``
    that changes the numbers fails here until the docs follow)."""
    import json
    import pathlib

    example = load_example("grpo_trl")
    root = pathlib.Path(example.HERE).parent
    result = json.loads((pathlib.Path(example.RESULTS) / "grpo_trl.json").read_text("utf-8"))
    assert (pathlib.Path(example.RESULTS) / "grpo_trl.png").stat().st_size > 0
    cfg = example.Config(**{**result["config"], "variants": tuple(result["config"]["variants"])})
    assert cfg == example.Config()
    assert result["command"] == "python examples/grpo_trl.py --update"
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [(v, s) for s in range(cfg.seeds)
                                                                   for v in cfg.variants]
    assert all(len(r["history"]["reward"]) == cfg.steps for r in result["runs"])
    rows = example.summarize(result["runs"], cfg)
    assert json.loads(json.dumps(rows)) == result["summary"]
    table = example.table(rows)
    for doc in ("docs/rl.md", "README.md"):
        assert table in (root / doc).read_text("utf-8"), f"{doc} does not show the committed results' table"
