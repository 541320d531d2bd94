"""The token inspector: numbers (p_t, H_t, rank, I_t, weight) against rk.token_stats and the
paper's definitions, the HTML page (self-contained, every token present and escaped), the
PNG (the paper's layout), the terminal table, ignored positions, long texts and the command
line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ranktuner_kernels as rk
from ranktuner_kernels.analysis import Inspection, inspect, relative_rank_indicator, relative_rank_terms
from ranktuner_kernels.weightings import expected_rank_bound

VOCAB = ["<bos>", "The", " answer", " is", "<script>", "alert(1)", "</script>", " 5", "\n", "&amp;", '"q"', " ess", "ential", "ly"]


class TinyLM(torch.nn.Module):
    """Embedding -> GRU -> head: a small causal LM."""

    def __init__(self, v=len(VOCAB), d=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(v, d)
        self.rnn = torch.nn.GRU(d, d, batch_first=True)
        self.head = torch.nn.Linear(d, v)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


class HFStyle(torch.nn.Module):
    """Returns an object with ``.logits``, like Hugging Face models."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return type("Out", (), {"logits": self.inner(ids)})()


def text_ids(n_repeat=1):
    ids = [0] + [1, 2, 3, 7, 8, 4, 5, 6, 9, 10, 11, 12, 13, 8] * n_repeat
    return ids, [VOCAB[i] for i in ids]


# ----------------------------------------------------------------------------- the indicator

def test_expected_rank_bound_and_indicator_known_values():
    h = torch.tensor([0.0, 1.0, 2.0, 3.0])
    p_max = torch.tensor([1.0, 0.6, 0.5, 0.2])
    s = expected_rank_bound(h, p_max)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.4, 2.0, 3.0]))
    # I = 2^{f(R) - f(E)}, f(x) = 1/log2(x+1): neutral 1 where R = E
    r = torch.tensor([1.0, 1.0, 2.0, 3.0])
    i = relative_rank_indicator(r, s)
    f = lambda x: 1 / math.log2(x + 1)  # noqa: E731
    expect = [1.0, 2 ** (f(1) - f(1.4)), 1.0, 1.0]
    torch.testing.assert_close(i, torch.tensor(expect))
    # numpy path agrees, and the range is (1/2, 2]
    np.testing.assert_allclose(relative_rank_indicator(np.array([1, 1000]), np.array([1e6, 1.0])),
                               [2 ** (1 - f(1e6)), 2 ** (f(1000) - 1)])
    assert 0.5 < 2 ** (f(1e9) - f(1)) < 0.52


def test_relative_rank_terms_from_token_stats():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    target = torch.randint(0, 50, (64,))
    target[:5] = -100
    st = rk.token_stats(logits, target)
    terms = relative_rank_terms(st)
    keep = target != -100
    # direct computation from the logits
    p = logits.softmax(-1)
    h_bits = -(p * p.log()).sum(-1) / math.log(2)
    s = torch.where(h_bits >= 2, 2 ** h_bits / 4 + 1, 2 - p.max(-1).values)
    rank = (logits >= logits.gather(1, target.clamp_min(0)[:, None])).sum(-1).float()
    i = 2 ** (1 / torch.log2(rank + 1) - 1 / torch.log2(s + 1))
    torch.testing.assert_close(terms["s"][keep], s[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["indicator"][keep], i[keep], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- numbers

def test_inspect_numbers_match_token_stats_and_the_weighting(capsys):
    model = TinyLM()
    ids, toks = text_ids()
    res = inspect(model, ids, toks, weighting="dft", print_table=False)
    assert isinstance(res, Inspection) and len(res) == len(ids)
    assert not res.kept[0] and res.kept[1:].all()          # the first token has no prediction
    logits = model(torch.tensor([ids]))[0, :-1]
    st = rk.token_stats(logits, torch.tensor(ids[1:]))
    np.testing.assert_allclose(res.p_t[1:], st["p_t"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.entropy_bits[1:], st["entropy_bits"].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(res.rank[1:], st["rank"].numpy())
    np.testing.assert_allclose(res.weight[1:], res.p_t[1:], rtol=1e-5)  # dft: w = p_t
    assert np.isnan(res.p_t[0]) and np.isnan(res.weight[0])
    sft = inspect(model, ids, toks, weighting="sft", print_table=False)
    np.testing.assert_allclose(sft.weight[1:], 1.0)
    rt = inspect(model, ids, toks, weighting=rk.RankTuner(w0="one"), print_table=False)
    assert rt.weighting == "RankTuner(w0='one')"
    assert (rt.weight[1:] > 0).all()
    assert capsys.readouterr().out == ""


def test_inspect_sources_agree():
    """A model, an object with .logits, its logits [T, V], [1, T, V], shifted [T-1, V], and the
    aligned form (logits + target) give the same numbers."""
    model = TinyLM(seed=1)
    ids, toks = text_ids()
    ref = inspect(model, ids, toks, print_table=False)
    logits = model(torch.tensor([ids])).detach()
    for src in (HFStyle(model), logits, logits[0], logits[0, :-1]):
        r = inspect(src, ids, toks, print_table=False)
        np.testing.assert_allclose(r.indicator, ref.indicator, rtol=1e-6)
        np.testing.assert_allclose(r.weight, ref.weight, rtol=1e-6)
    aligned = inspect(logits[0, :-1], target=torch.tensor(ids[1:]), tokens=toks[1:], print_table=False)
    np.testing.assert_allclose(aligned.p_t, ref.p_t[1:], rtol=1e-6)
    assert aligned.tokens == toks[1:]
    with pytest.raises(ValueError):
        inspect(logits[0, :-2], ids, toks, print_table=False)
    with pytest.raises(ValueError):
        inspect(model, ids, toks[:-1], print_table=False)
    with pytest.raises(ValueError):
        inspect(model, print_table=False)


def test_inspect_ignored_positions_and_decode():
    model = TinyLM()
    ids, _ = text_ids()
    labels = list(ids)
    labels[:5] = [-100] * 5                                   # the prompt
    res = inspect(model, ids, decode=lambda x: VOCAB[x[0]], labels=labels, weighting="ranktuner", print_table=False)
    assert res.tokens == [VOCAB[i] for i in ids]
    assert not res.kept[:5].any() and res.kept[5:].all()
    assert np.isnan(res.indicator[:5]).all() and np.isfinite(res.indicator[5:]).all()
    table = res.table()
    assert "weighting ranktuner" in table and f"{len(ids) - 5} of {len(ids)} tokens scored" in table
    # aligned form with ignored targets: decode is not called on -100
    logits = model(torch.tensor([ids]))[0, :-1].detach()
    tgt = torch.tensor(ids[1:])
    tgt[::3] = -100
    res = inspect(logits, target=tgt, decode=lambda x: VOCAB[x[0]], print_table=False)
    assert res.tokens[0] == "" and not res.kept[0] and res.kept[1]


# ----------------------------------------------------------------------------- HTML, PNG, table

def test_inspect_html_png_and_table(tmp_path, capsys):
    model = TinyLM()
    ids, toks = text_ids()
    html_path, png_path = tmp_path / "t.html", tmp_path / "t.png"
    mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        mpl = False
    res = inspect(model, ids, toks, weighting=rk.RankTuner(), html=html_path, png=png_path if mpl else None)
    out = capsys.readouterr().out
    assert "p_t" in out and "I_t" in out and "alert(1)" in out     # the terminal table
    page = html_path.read_text(encoding="utf-8")
    assert len(page) > 1000 and res.html_path == str(html_path)
    import html as html_lib
    for tok in set(toks):                                          # every token, escaped
        assert html_lib.escape(res._display(tok)) in page
    # <script> is shown as text: never a tag
    assert "&lt;script&gt;" in page and "&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "</script" not in page.lower()
    # self-contained: no network loads, no external CSS/JS
    for bad in ("http://", "https://", "<link", "src=", "@import", "url("):
        assert bad not in page.lower()
    if mpl:
        data = png_path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_inspect_png_paper_layout_long_text_wraps(tmp_path):
    pytest.importorskip("matplotlib")
    model = TinyLM()
    ids, toks = text_ids(n_repeat=40)                             # ~560 tokens, ~2500 characters
    res = inspect(model, ids, toks, print_table=False)
    pieces, n_lines = res._layout(line_chars=80)
    assert n_lines > 25 and max(col + len(t) for _, _, col, t in pieces) <= 80
    assert {i for i, *_ in pieces} == set(range(len(ids)))       # every token is drawn
    path = res.save_png(tmp_path / "long.png", rows=("p_t", "entropy", "indicator", "weight"), line_chars=80)
    assert os.path.getsize(path) > 20000
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
    assert h > w                                                    # four panels of many lines


def test_inspect_handles_a_token_longer_than_a_line():
    res = inspect(torch.zeros(3, 4), target=torch.tensor([0, 1, 2]), tokens=["a", "x" * 250, "b"], print_table=False)
    pieces, n_lines = res._layout(line_chars=100)
    assert n_lines == 4 and all(len(t) <= 100 for *_, t in pieces)


# ----------------------------------------------------------------------------- command line

def run_cli(*args, capsys=None):
    """The command line's ``main`` with ARGS in this process -> (exit code, stdout); the
    ``python -m ranktuner_kernels.analysis.cli`` entry itself runs in a subprocess below."""
    from ranktuner_kernels.analysis import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capsys.readouterr().out if capsys is not None else ""


def test_cli_saved_logits_and_model_loader(tmp_path, capsys):
    model = TinyLM()
    ids, toks = text_ids()
    logits = model(torch.tensor([ids]))[0].detach()
    torch.save({"logits": logits, "token_ids": torch.tensor(ids), "tokens": toks}, tmp_path / "causal.pt")
    torch.save({"logits": logits[:-1], "target": torch.tensor(ids[1:])}, tmp_path / "aligned.pt")
    html = tmp_path / "c.html"
    code, out = run_cli(tmp_path / "causal.pt", "--html", html, "--weighting", "RankTuner(w0='one', xi='geo')",
                        "--rows", 5, capsys=capsys)
    assert code == 0
    assert "RankTuner(w0='one', xi='geo')" in out and "more positions" in out
    assert "&lt;script&gt;" in html.read_text(encoding="utf-8")
    code, out = run_cli(tmp_path / "aligned.pt", "--weighting", "dft", capsys=capsys)
    assert code == 0 and "weighting dft" in out

    # a model through a loader file (path:function), called with the checkpoint
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    loader = tmp_path / "my_loader.py"
    loader.write_text(
        "import torch, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from test_inspect import TinyLM, VOCAB\n"
        "def load(path):\n"
        "    m = TinyLM(); m.load_state_dict(torch.load(path)); m.eval()\n"
        "    enc = lambda s: [VOCAB.index(w) for w in s.split('|') if w]\n"
        "    return {'model': m, 'encode': enc, 'decode': lambda x: VOCAB[x[0]], 'bos_id': 0}\n")
    png = tmp_path / "m.png"
    args = ["--model", f"{loader}:load", "--checkpoint", tmp_path / "ckpt.pt", "--prompt", "The| answer",
            "--text", " is|<script>| 5", "--html", tmp_path / "m.html"]
    try:
        import matplotlib  # noqa: F401
        args += ["--png", png]
    except ImportError:
        png = None
    code, out = run_cli(*args, capsys=capsys)
    assert code == 0
    assert "3 of 6 tokens scored" in out
    if png is not None:
        assert png.stat().st_size > 1000
    code, _ = run_cli(tmp_path / "aligned.pt", "--weighting", "NoSuch(a=1)", capsys=capsys)
    assert code != 0
    code, _ = run_cli(capsys=capsys)  # neither a file nor --model: argparse's usage error
    assert code == 2


def test_cli_runs_as_a_module(tmp_path):
    """The real entry point, in a subprocess."""
    torch.save({"logits": torch.randn(4, 6), "target": torch.tensor([0, -100, 2, 5])}, tmp_path / "a.pt")
    r = subprocess.run([sys.executable, "-m", "ranktuner_kernels.analysis.cli", str(tmp_path / "a.pt"), "--html",
                        str(tmp_path / "a.html")], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stderr
    assert "3 of 4 tokens scored" in r.stdout and (tmp_path / "a.html").stat().st_size > 0


def test_rk_inspect_is_an_ordinary_function():
    """``rk.inspect`` is the renderer's function with its real signature (default ``"sft"``,
    the library's one default weighting), whatever else is imported; the CLI's default too."""
    import importlib
    import inspect as pyinspect
    import types

    from ranktuner_kernels.analysis import cli, render

    importlib.import_module("ranktuner_kernels.analysis.cli")
    assert isinstance(rk.inspect, types.FunctionType) and rk.inspect is render.inspect
    params = pyinspect.signature(rk.inspect).parameters
    assert list(params)[:3] == ["source", "token_ids", "tokens"]
    assert params["weighting"].default == "sft"
    assert cli.main.__module__ == "ranktuner_kernels.analysis.cli"
    ids, toks = text_ids()
    res = rk.inspect(TinyLM(), ids, toks, print_table=False)
    assert res.weighting == "sft" and np.all(res.weight[res.kept] == 1.0)


def test_cli_default_weighting_is_sft(tmp_path, capsys):
    torch.save({"logits": torch.randn(4, 6), "target": torch.tensor([0, -100, 2, 5])}, tmp_path / "a.pt")
    code, out = run_cli(tmp_path / "a.pt", capsys=capsys)
    assert code == 0 and "weighting sft" in out
