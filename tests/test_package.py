"""The installed package exposes one import namespace."""

import importlib.util
import os

import ranktuner_kernels as rk


def test_reference_and_kernels_live_inside_the_package():
    from ranktuner_kernels import kernels, reference  # noqa: F401  (kernels needs Triton)

    assert reference.__name__ == "ranktuner_kernels.reference"
    assert kernels.__name__ == "ranktuner_kernels.kernels"


def test_no_top_level_reference_or_csrc_triton_modules(tmp_path):
    """The install maps reference/ and csrc_triton/ into ranktuner_kernels only: outside the
    checkout (``python -m pytest`` puts the checkout itself on ``sys.path``) neither is a
    top-level module."""
    import subprocess
    import sys

    code = "import importlib.util; print([n for n in ('reference', 'csrc_triton') if importlib.util.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    assert importlib.util.find_spec("ranktuner_kernels.reference") is not None


def test_public_api():
    for name in ("cross_entropy", "linear_cross_entropy", "token_stats", "TokenReweightedLoss",
                 "LinearTokenReweightedLoss", "RankTuner", "SFT", "DFT", "TALR", "EAFT", "OverTone",
                 "AlphaPower", "Threshold", "EntropyReg", "Focal"):
        assert hasattr(rk, name), name


def test_demo_runs_and_checks_every_weighting():
    import subprocess
    import sys

    for impl in ("auto", "triton"):
        out = subprocess.run([sys.executable, "-m", "ranktuner_kernels", "--batch", "2", "--seq", "8", "--vocab", "100",
                              "--impl", impl], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        for name in sorted(rk.weightings.WEIGHTINGS):
            assert any(line.startswith(name) and line.rstrip().endswith("ok") for line in out.stdout.splitlines()), name


def test_import_is_light():
    """Importing the package imports neither torch._dynamo (until a loss runs) nor Triton nor
    any optional integration."""
    import subprocess
    import sys

    code = ("import sys, ranktuner_kernels\n"
            "heavy = [m for m in ('torch._dynamo', 'triton', 'transformers', 'trl', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_module_reprs_show_their_objective():
    import torch

    loss_fn = rk.TokenReweightedLoss("ranktuner", label_smoothing=0.1)
    assert "RankTuner(w0='p'" in repr(loss_fn) and "label_smoothing=0.1" in repr(loss_fn)
    head = torch.nn.Linear(4, 10, bias=False)
    lin = rk.LinearTokenReweightedLoss.from_linear(head, rk.EAFT(k=5), chunk_size=8)
    assert "EAFT(k=5" in repr(lin) and "vocab=10, hidden=4" in repr(lin) and "chunk_size=8" in repr(lin)


def test_an_uninstalled_checkout_says_to_install_it():
    """From the checkout's root without the install (``-S``: no site-packages, so neither the
    editable finder nor torch), ``import ranktuner_kernels`` and ``python -m ranktuner_kernels``
    fail with one sentence naming ``pip install -e .``, not a circular-import error."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for args in (["-c", "import ranktuner_kernels"], ["-m", "ranktuner_kernels"]):
        out = subprocess.run([sys.executable, "-S", *args], cwd=root, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: ") and last.endswith("run `pip install -e .` in the checkout's root first."), out.stderr
        assert last.count(". ") == 0 and "circular" not in out.stderr  # one sentence


def test_the_readme_set_up_reads_top_to_bottom():
    """The CPU-only torch note comes before the two marked commands (``.ci/run`` reads them),
    and the README says the suite takes minutes."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    cpu = text.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < text.index("<!-- demo-command -->") < text.index("<!-- test-command -->") < text.index(
        "<!-- long-test-command -->")
    assert "The suite takes minutes" in text


def test_every_subpackage_is_in_the_wheel_list():
    """``pyproject.toml``'s packages list names every subpackage of ``ranktuner_kernels`` (a
    missing one is silently left out of the wheel)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(re.findall(r'"(ranktuner_kernels[\w.]*)"', (root / "pyproject.toml").read_text().split("[tool.setuptools]")[1].split("[tool.setuptools.package-dir]")[0]))
    found = {"ranktuner_kernels." + ".".join(p.parent.relative_to(root / "ranktuner_kernels").parts)
             for p in (root / "ranktuner_kernels").rglob("__init__.py") if p.parent != root / "ranktuner_kernels"}
    assert found and found <= listed, found - listed
