"""examples/see_it_matter.py: the multi-seed comparison of the objectives.

The quick run (``--quick``, what CI runs) is compared with the figures committed in
``examples/results/see_it_matter_quick/``: when the code no longer produces them (a change to
a weighting, the data, the training loop, the evaluation), the test fails and the committed
figures must be re-made with the command they record."""

import json
import math
import os
import statistics

import pytest

from helpers import EXAMPLES, load_example

COMMITTED = os.path.join(EXAMPLES, "results", "see_it_matter_quick", "see_it_matter.json")


def test_corruption_is_after_the_first_step():
    sim = load_example("see_it_matter")
    cfg = sim.MatterConfig(n_train=200, n_test=50, seed=3)
    data = sim.make_data(cfg)
    noisy = [(c, r) for (_, c, _), (_, r, n) in zip(data["train"], data["finetune"]) if n]
    assert len(noisy) == round(0.3 * 200)
    for clean, r in noisy:
        cut = clean.index(".") + 1
        assert r.startswith(clean[:cut] + " ") and r.endswith(clean[cut:])
        inserted = r[cut + 1: len(r) - len(clean[cut:])]
        assert inserted[0].isupper() and inserted.endswith(".") and not any(ch.isdigit() for ch in inserted)
    assert all(r == c for (_, c, _), (_, r, n) in zip(data["train"], data["finetune"]) if not n)
    assert not {p for p, _, _ in data["train"]} & {p for p, _, _ in data["test"]}
    assert sim.make_data(cfg) == data  # a seed fixes the data


def test_summarize_mean_and_sample_std():
    sim = load_example("see_it_matter")
    rows = [{"weighting": w, "accuracy": a, "noisy_sampled": None, "clean_nll": n}
            for w, a, n in [("a", 0.5, 1.0), ("a", 0.7, 2.0), ("a", 0.9, 4.0), ("b", 0.2, 0.5)]]
    s = sim.summarize(rows, ["b", "a", "c"])
    assert list(s) == ["b", "a"]
    assert s["a"]["accuracy"][0] == pytest.approx(0.7) and s["a"]["accuracy"][1] == pytest.approx(0.2)
    assert s["a"]["clean_nll"][1] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert s["b"]["accuracy"][1] == 0.0 and "noisy_sampled" not in s["a"]
    assert "| `a` | 70.0 ± 20.0 % | 2.3333 ± 1.5275 |" in sim.summary_table(s)  # no column for a metric no row has


def test_quick_writes_to_a_scratch_folder_unless_told():
    sim, ft = load_example("see_it_matter"), load_example("finetune")
    repo = os.path.abspath(os.path.join(EXAMPLES, os.pardir))
    cfg, _ = sim.parse_args(["--quick"])
    assert cfg.out_dir == sim.QUICK_OUT and not os.path.abspath(cfg.out_dir).startswith(repo)
    assert sim.parse_args(["--quick", "--out", "x"])[0].out_dir == "x"
    assert sim.parse_args([])[0].out_dir == os.path.join("examples", "results", "see_it_matter")
    cfg, _ = ft.parse_args(["--quick"])
    assert cfg.out_dir == ft.QUICK_OUT and not os.path.abspath(cfg.out_dir).startswith(repo)
    assert ft.parse_args(["--quick", "--out", "y"])[0].out_dir == "y"
    assert ft.parse_args([])[0].out_dir == ft.SCRATCH_OUT and ft.parse_args(["--update"])[0].out_dir == ft.RESULTS


def _close(a, b, rel, abs_):
    return a is None and b is None or (a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_))


@pytest.mark.slow
def test_quick_run_reproduces_the_committed_figures(tmp_path):
    """Re-runs the committed quick configuration (with the committed run's thread count) and
    compares it with the committed figures: the first steps' mean weights and NLLs to 5e-3 (they
    follow from the weighting code and the pre-trained model), the final figures with room for
    float rounding that grows over training (another CPU's kernels)."""
    sim = load_example("see_it_matter")
    if not os.path.isfile(COMMITTED):
        pytest.fail(f"{COMMITTED} is missing: run python examples/see_it_matter.py --quick "
                    "--out examples/results/see_it_matter_quick")
    with open(COMMITTED) as f:
        committed = json.load(f)
    args = committed["provenance"]["command"].split()[2:]  # the committed figures are the quick run's
    assert "--quick" in args and set(args) <= {"--quick", "--out", "examples/results/see_it_matter_quick", "--quiet"}
    cfg, _ = sim.parse_args(["--quick", "--out", str(tmp_path)])
    import torch

    threads = torch.get_num_threads()
    # the committed run's thread count: another count changes the float rounding of every matmul,
    # and 200 pre-training steps carry that to ~3e-3 in the first fine-tuning NLL (measured: 2 threads
    # against the committed 1)
    torch.set_num_threads(committed["provenance"]["threads"])
    try:
        res = sim.run(cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert os.path.isfile(tmp_path / "see_it_matter.json")
    rows = {(r["seed"], r["weighting"]): r for r in res["rows"]}
    old = {(r["seed"], r["weighting"]): r for r in committed["rows"]}
    assert rows.keys() == old.keys()
    redo = "re-make them: python examples/see_it_matter.py --quick --out examples/results/see_it_matter_quick"
    for key, r in rows.items():
        o = old[key]
        for k in ("first_weights", "first_nll"):
            for a, b in zip(r.get(k, []), o.get(k, [])):
                assert math.isclose(a, b, rel_tol=5e-3), (key, k, r[k], o[k], redo)
        for k in ("accuracy", "noisy_greedy", "noisy_sampled", "accuracy_sampled"):
            assert _close(r[k], o[k], 0, 0.06), (key, k, r[k], o[k], redo)
        assert _close(r["clean_nll"], o["clean_nll"], 0.03, 0), (key, "clean_nll", r["clean_nll"], o["clean_nll"], redo)
    # sanity of the quick run itself: fine-tuning learns, sft weights are 1, talr/dft below 1
    for seed in cfg.seeds:
        assert rows[(seed, "sft")]["clean_nll"] < rows[(seed, "pre-trained only")]["clean_nll"]
        assert all(w == pytest.approx(1.0) for w in rows[(seed, "sft")]["first_weights"])
        assert max(rows[(seed, "dft")]["first_weights"]) < 1.0
    if "png" in res["files"]:
        assert os.path.getsize(res["files"]["png"]) > 10000
