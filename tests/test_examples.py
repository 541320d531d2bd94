"""examples/finetune.py: a tiny run of the whole example in seconds (it runs end to end, writes
its outputs, and sft fine-tuning learns), and its shortened run (``--quick``: pre-training, then
sft, ranktuner and dft fine-tuning on the fused-linear path), which must reach a held-out
exact-match accuracy far above the untrained model's (0%) and the pre-trained-only model's:
an end-to-end run (``long``, ~270 s on one thread of a loaded 2-core machine)."""

import os
import sys

import pytest

from helpers import EXAMPLES, load_example

#: the smallest setting in which the example's every stage runs and sft fine-tuning measurably
#: learns (its clean NLL falls, e.g. 1.79 -> 1.37 nats): seconds on one CPU thread
TINY = dict(n_train=300, n_test=40, d_model=32, n_layer=1, d_ff=64, pretrain_steps=150, pretrain_lr=1e-2,
            pretrain_batch=16, steps=30, lr=5e-3, batch_size=16, eval_every=30, eval_n=20, diag_n=50)
NAMES = ("sft", "ranktuner", "dft")


def _check_outputs(res, cfg, out_dir):
    """The run's histories, diagnostics and files, whatever its size."""
    for name in NAMES:
        assert len(res["histories"][name]["nll"]) == cfg.steps
    # the mean weight: 1 for sft, p_t-like (< 1) for dft
    assert all(w == pytest.approx(1.0) for w in res["histories"]["sft"]["weight"])
    assert max(res["histories"]["dft"]["weight"]) < 1.0
    # the noise diagnostic ran on every model, in the paper's table format
    assert set(res["diagnostics"]) == {"pre-trained", *(f"fine-tuned: {n}" for n in NAMES)}
    assert "TOK PREC@10%" in res["diagnostics"]["pre-trained"].table()
    files = res["files"]
    for key in ("base", *NAMES, "inspect_html", "results"):
        assert os.path.getsize(files[key]) > 0, key
    assert all(os.path.dirname(path) == str(out_dir) for path in files.values()), files  # cfg.out_dir only
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for key in ("curves", "inspect_png"):
        assert os.path.getsize(files[key]) > 10000, key


@pytest.mark.usefixtures("one_thread")
def test_finetune_tiny_run_runs_end_to_end_and_sft_learns(tmp_path):
    ft = load_example("finetune")
    cfg = ft.Config(**{**ft.QUICK, **TINY})
    cfg.out_dir = str(tmp_path)
    res = ft.run(cfg, quiet=True)
    nll = res["histories"]["sft"]["nll"]
    assert nll[-1] < 0.9 * nll[0], nll  # a fall of ~25 %, not of rounding
    _check_outputs(res, cfg, tmp_path)


@pytest.mark.long
@pytest.mark.usefixtures("one_thread")
def test_finetune_quick_run_learns(tmp_path):
    ft = load_example("finetune")
    cfg = ft.Config(**ft.QUICK)
    cfg.out_dir = str(tmp_path)
    res = ft.run(cfg, quiet=True)
    acc = res["accuracy"]
    assert acc["untrained (random init)"] <= 0.02
    assert acc["pre-trained only"] <= 0.2
    for name in NAMES:
        # measured on 2 CPU cores: sft 0.775-0.865, ranktuner 0.665-0.705, dft 0.53-0.66 (the numbers
        # depend on the hardware's float rounding; the bar leaves room)
        assert acc[name] >= 0.3, (name, acc)
        assert acc[name] >= acc["pre-trained only"] + 0.2, (name, acc)
        h = res["histories"][name]
        assert h["nll"][-1] < h["nll"][0]
    _check_outputs(res, cfg, tmp_path)


def test_finetune_checkpoint_loads_for_the_inspector(tmp_path):
    """The example's checkpoint format round-trips through the loader the inspector's
    command line uses (fast: a tiny untrained model)."""
    load_example("finetune")
    sys.path.insert(0, EXAMPLES)
    import torch
    from tiny_lm import CharTokenizer, TinyLM, TinyLMConfig, load_checkpoint, save_checkpoint

    tok = CharTokenizer()
    model = TinyLM(TinyLMConfig(tok.vocab_size, d_model=32, n_layer=1, n_head=2, d_ff=64, max_len=32))
    save_checkpoint(tmp_path / "m.pt", model, tok)
    loaded = load_checkpoint(tmp_path / "m.pt")
    ids = torch.tensor([[tok.bos_id] + tok.encode("1+2=3.")])
    torch.testing.assert_close(loaded["model"](ids), model(ids))
    assert loaded["token_strings"](ids[0]) == ["<bos>", "1", "+", "2", "=", "3", "."]
    # greedy decoding with the cache equals decoding without it
    model.eval()
    out = model.generate_greedy([[1, 4, 5], [1, 6]], 10, eos_id=tok.eos_id)
    for prompt, gen in zip([[1, 4, 5], [1, 6]], out):
        seq = list(prompt)
        for _ in gen:
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt):] == gen


def test_inspector_says_what_to_run_when_the_checkpoint_is_missing(tmp_path):
    """The documented inspector command on a fresh checkout (no checkpoint yet): a one-line
    error that names the command writing the checkpoint, no traceback, nothing written to the
    current directory."""
    import subprocess

    load_example("finetune")
    cmd = [sys.executable, "-m", "ranktuner_kernels.analysis.cli", "--model",
           os.path.join(EXAMPLES, "tiny_lm.py") + ":load_checkpoint", "--checkpoint", str(tmp_path / "tiny_lm_ranktuner.pt"),
           "--prompt", "5+1=?\n", "--text", "5+1=6. A: 6", "--html", str(tmp_path / "out" / "t.html")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "python examples/finetune.py" in proc.stderr and "tiny_lm_ranktuner.pt" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_finetune_writes_to_a_scratch_folder_unless_updating():
    """The example's output folder (the only one ``run`` writes to, checked above): by default a
    scratch folder outside the checkout, never the committed ``examples/results``; ``--update``
    writes that (the full run only: refused with ``--quick``, ``--out``, ``--out-dir``, ``--no-save``)."""
    ft = load_example("finetune")
    repo = os.path.abspath(os.path.join(EXAMPLES, os.pardir))
    assert ft.Config().out_dir == ft.SCRATCH_OUT
    for argv in ([], ["--quick"], ["--steps", "3", "--quiet"]):
        out = os.path.abspath(ft.parse_args(argv)[0].out_dir)
        assert not out.startswith(repo + os.sep), (argv, out)
    cfg, _ = ft.parse_args(["--update"])
    assert cfg.out_dir == ft.RESULTS == os.path.join("examples", "results") and cfg.save
    for argv in (["--update", "--quick"], ["--update", "--out", "x"], ["--update", "--out-dir", "x"],
                 ["--update", "--no-save"]):
        with pytest.raises(SystemExit):
            ft.parse_args(argv)
