"""Misuse that gets a message saying what to do: ``weighting`` given positionally, the token
inspector's command line with no arguments, a PNG asked for without matplotlib."""

import subprocess
import sys

import pytest
import torch

import ranktuner_kernels as rk

g = torch.Generator().manual_seed(0)
H, W, Y = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g), torch.randint(0, 7, (2, 3), generator=g)
LOGITS = torch.randn(2, 3, 7, generator=g)

POSITIONAL = {
    "linear-4th": (lambda: rk.linear_cross_entropy(H, W, Y, "ranktuner"), "'ranktuner'", "positional argument 4"),
    "linear-config": (lambda: rk.linear_cross_entropy(H, W, Y, rk.DFT()), "DFT()", "positional argument 4"),
    "logits-9th": (lambda: rk.cross_entropy(LOGITS, Y, None, None, -100, None, "mean", 0.0, "ranktuner"),
                   "'ranktuner'", "positional argument 9"),
    "logits-as-weight": (lambda: rk.cross_entropy(LOGITS, Y, "dft"), "'dft'", "as 'weight'"),
    "logits-as-reduction": (lambda: rk.cross_entropy(LOGITS, Y, None, None, -100, None, "talr"), "'talr'",
                            "as 'reduction'"),
}


@pytest.mark.parametrize("case", list(POSITIONAL))
def test_weighting_given_positionally_says_it_is_keyword_only(case):
    call, shown, where = POSITIONAL[case]
    name = "linear_cross_entropy" if case.startswith("linear") else "cross_entropy"
    with pytest.raises(TypeError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{name}: weighting is keyword-only: pass weighting={shown}") and where in msg, msg


def test_torchs_positional_arguments_still_work():
    """torch's own positional arguments (``weight`` ... ``label_smoothing``) are unchanged, and a
    wrong positional value that is not a weighting keeps Python's or the argument check's error."""
    want = torch.nn.functional.cross_entropy(LOGITS.flatten(0, 1), Y.flatten(), None, None, -100, None, "sum", 0.1)
    torch.testing.assert_close(rk.cross_entropy(LOGITS.flatten(0, 1), Y.flatten(), None, None, -100, None, "sum", 0.1),
                               want)
    with pytest.raises(TypeError, match="takes 3 positional arguments"):
        rk.linear_cross_entropy(H, W, Y, None)
    with pytest.raises(ValueError, match="reduction"):
        rk.cross_entropy(LOGITS, Y, None, None, -100, None, "average")


def test_cli_without_arguments_prints_its_help():
    """No arguments: the whole help on stdout (what the command does and both ways to call it),
    exit status 2 (nothing was done, as for argparse's usage errors); nothing on stderr."""
    proc = subprocess.run([sys.executable, "-m", "ranktuner_kernels.analysis.cli"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("usage: python -m ranktuner_kernels.analysis.cli")
    for text in ("Saved logits", "--model", "--checkpoint", "--png", "With no arguments"):
        assert text in proc.stdout, text
    assert proc.stderr == ""


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


def test_inspect_png_without_matplotlib_names_the_extra(no_matplotlib, tmp_path):
    """An ImportError naming the extra, before anything is written (the HTML asked for too)."""
    logits, target = torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g)
    html, png = tmp_path / "t.html", tmp_path / "t.png"
    with pytest.raises(ImportError, match=r'pip install "ranktuner-kernels\[examples\]"'):
        rk.inspect(logits, target=target, html=str(html), png=str(png), print_table=False)
    assert not html.exists() and not png.exists()
    res = rk.inspect(logits, target=target, html=str(html), print_table=False)  # the HTML alone needs nothing
    assert html.stat().st_size > 0
    with pytest.raises(ImportError, match=r"ranktuner-kernels\[examples\]"):
        res.save_png(str(png))


def test_cli_png_without_matplotlib_is_a_one_line_error(no_matplotlib, tmp_path, capsys):
    from ranktuner_kernels.analysis import cli

    saved = tmp_path / "saved.pt"
    torch.save({"logits": torch.randn(4, 9, generator=g), "target": torch.randint(0, 9, (4,), generator=g)}, saved)
    assert cli.main([str(saved), "--png", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: png: writing the PNG needs matplotlib") and "Traceback" not in err
    assert 'pip install "ranktuner-kernels[examples]"' in err
