"""examples/grpo_toy.py, shortened: GRPO through rk.cross_entropy and rl.policy_loss really
learns (the reward goes up), plain and with THR-adjusted advantages, EAST weights and the
GSPO-token ratio. About 10-20 s per run on one CPU thread."""

import importlib.util
import os

import pytest
import torch

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "grpo_toy.py")


@pytest.fixture(scope="module")
def grpo_toy():
    spec = importlib.util.spec_from_file_location("grpo_toy", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("variant", [dict(), dict(thr_p=0.1, east_a=1.0, ratio="gspo_token")], ids=["grpo", "thr+east+gspo"])
def test_reward_improves(grpo_toy, one_thread, variant):
    hist = grpo_toy.train(steps=40, questions=16, seed=0, progress=False, **variant)
    r = hist["reward"]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.1, (first, last)
    assert hist["answer_entropy"][-1] < hist["answer_entropy"][0]  # the policy commits to answers
    if "thr_p" in variant:
        kept = [k for k in hist["thr_kept"] if k == k]
        assert kept and all(0 < k <= 1 for k in kept)


def test_main_prints_curve(grpo_toy, one_thread, capsys):
    hist = grpo_toy.main(["--steps", "3", "--questions", "4", "--group", "4", "--no-progress", "--thr-p", "-0.1"])
    out = capsys.readouterr().out
    assert "mean reward" in out and "greedy accuracy" in out and len(hist["reward"]) == 3


def test_east_example_feeds_sequence_weights_to_both_paths():
    """examples/east_weights.py: the EAST weights as sequence_weight give the same loss and
    head gradient through the logits and the fused-linear path (asserted inside the example
    at every step), and the weighted loss falls."""
    path = os.path.join(os.path.dirname(EXAMPLE), "east_weights.py")
    spec = importlib.util.spec_from_file_location("east_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first = mod.main(["--steps", "1"])
    last = mod.main(["--steps", "15"])
    assert last < 0.8 * first
