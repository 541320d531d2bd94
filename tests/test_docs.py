"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh namespace (a later block may use what an
earlier one defined), in a scratch working directory, on the CPU. A block opts out only with a
first line ``# not run: <reason>``; the opt-outs are counted and printed (``pytest -s``), and
every one must give its reason. A block that needs an optional extra that is not installed
(transformers, TRL, ...) skips the rest of its file.
"""

import pathlib
import re
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if "```python" in p.read_text("utf-8")]
#: a fenced python block, also inside a list item (indented fence)
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```[ \t]*$", re.S | re.M)
OPT_OUT = re.compile(r"#\s*not run:\s*(.*)")
#: optional extras a block may need (a missing one skips the rest of the file)
EXTRAS = ("transformers", "trl", "datasets", "accelerate", "peft", "matplotlib", "tokenizers")


def blocks(path):
    """``[(line, code)]``: each python block of ``path``, dedented, with its first line number."""
    text = path.read_text("utf-8")
    return [(text[:m.start()].count("\n") + 2, textwrap.dedent(m.group(2))) for m in BLOCK.finditer(text)]


def opt_out(code):
    """The reason of a ``# not run: <reason>`` first line, else None."""
    m = OPT_OUT.fullmatch(code.lstrip().splitlines()[0].strip()) if code.strip() else None
    return m and m.group(1).strip()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads cost more than they give
    torch.manual_seed(0)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, scratch, capsys):
    found = blocks(path)
    assert found, f"{path.name}: no python block found (the fence pattern no longer matches?)"
    namespace = {"__name__": f"docs_{path.stem}"}
    skipped = []
    for line, code in found:
        reason = opt_out(code)
        if reason is not None:
            assert reason, f"{path.name}:{line}: '# not run:' needs a reason"
            skipped.append(f"{path.name}:{line}: {reason}")
            continue
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in EXTRAS:
                pytest.skip(f"{path.name}:{line} needs {e.name}")
            raise
    with capsys.disabled():
        print(f"\n{path.name}: {len(found) - len(skipped)} blocks run, {len(skipped)} not run"
              + "".join(f"\n  not run: {s}" for s in skipped))


def test_the_block_pattern_finds_every_fence():
    """Every line that opens a python fence is one block the test runs (none is missed by the
    pattern, e.g. an indented fence in a list item)."""
    for path in FILES:
        text = path.read_text("utf-8")
        opened = len(re.findall(r"^ *```python\s*$", text, re.M))
        assert opened == len(blocks(path)), path.name


def test_readme_stats_comment_matches_the_stats():
    """The README's comment on ``return_stats=True``: the keys it names (``z_loss`` only with
    ``z_loss=``), their shape, and each key's value at ignored positions (NaN unless it names
    another) are what ``rk.cross_entropy`` returns, on both paths."""
    import ranktuner_kernels as rk

    text = (ROOT / "README.md").read_text("utf-8")
    m = re.search(r"^# stats: (.*) \(and (\w+) with \2=\)\n#\s+shaped like labels; at ignored positions NaN, "
                  r"except (.*)$", text, re.M)
    assert m, "the README's stats comment changed form: update this test with it"
    keys = [k.strip() for k in m.group(1).split(",")]
    optional = m.group(2)
    literal = {"0": 0, "False": False}
    ignored = {k: literal[v] for k, v in (item.strip().split(" ") for item in m.group(3).split(","))}
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    keep = labels != -100
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    for z_loss in (0.0, 1e-3):
        for _, stats in (rk.cross_entropy(logits, labels, weighting="dft", z_loss=z_loss, return_stats=True),
                         rk.linear_cross_entropy(h, w, labels, weighting="dft", z_loss=z_loss, return_stats=True)):
            assert list(stats) == keys + ([optional] if z_loss else [])  # the README's order
            for key, value in stats.items():
                assert value.shape == labels.shape, key
                at_ignored = value[~keep]
                if key in ignored:
                    assert (at_ignored == ignored[key]).all(), (key, at_ignored)
                else:
                    assert at_ignored.isnan().all(), (key, at_ignored)
                assert not value[keep].double().isnan().any(), key
