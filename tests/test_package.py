"""The installed package exposes one import namespace."""

import importlib.util

import ranktuner_kernels as rk


def test_reference_and_kernels_live_inside_the_package():
    from ranktuner_kernels import kernels, reference  # noqa: F401  (kernels needs Triton)

    assert reference.__name__ == "ranktuner_kernels.reference"
    assert kernels.__name__ == "ranktuner_kernels.kernels"


def test_no_top_level_reference_or_csrc_triton_modules():
    for name in ("reference", "csrc_triton"):
        assert importlib.util.find_spec(name) is None, f"a top-level module {name!r} is importable"


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
