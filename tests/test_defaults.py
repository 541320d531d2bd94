"""Every documented default pinned to the value the README's table of objectives states
(parsed from its text, never read back from the dataclasses), the names of the registry against
the exports and the docs, and the layout rules of the code."""

import ast
import dataclasses
import inspect
import pathlib
import re
import types

import pytest
import torch

import ranktuner_kernels as rk
from helpers import make_batch
from spec_formulas import spec_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_objective_row(line):
    """``| `name` ... | `rk.Class(key=literal, ...)` | ...`` -> ``(name, "Class", {key: literal})``."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    name = re.match(r"`(\w+)`", cells[0]).group(1)
    call = ast.parse(re.fullmatch(r"`rk\.(.+)`", cells[1]).group(1), mode="eval").body
    assert isinstance(call, ast.Call) and not call.args, line
    return name, call.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def readme_objectives():
    """The README's table of objectives: ``{name: ("Class", {option: default})}``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Objectives\n", 1)[1]
    rows = [ln for ln in section.split("\n\n", 2)[1].splitlines() if ln.startswith("| `")]
    return {name: (cls, kw) for name, cls, kw in map(parse_objective_row, rows)}


def check_documented(cls, class_name, defaults):
    """A registered weighting against its documented row: resolvable by name, exported under its
    class name, every option listed with the default it has."""
    assert rk.weightings.WEIGHTINGS[cls.name] is cls
    assert cls.__name__ == class_name and getattr(rk, class_name) is cls and class_name in dir(rk)
    cfg = rk.weightings.resolve(cls.name)
    assert type(cfg) is cls and dataclasses.asdict(cfg) == defaults
    # each option set to a non-default value by some variant, so the tests run every option
    unvaried = set(defaults) - {k for kw in cls.variants for k, v in kw.items() if v != defaults[k]}
    assert not unvaried, f"{cls.name}: no variant sets {sorted(unvaried)}"


def check_triton_formula(cls):
    """A row-local weighting has its Triton formula with the shared signature (and a weighting
    that is not row-local has none in the kernels' module)."""
    pytest.importorskip("triton")
    from ranktuner_kernels.kernels import weightings as formulas

    cfg = cls()
    if not cfg.row_local:
        assert not hasattr(formulas, cls.name), cls.name  # no dead formula
        return
    fn = cfg.kernel_formula(formulas)
    params = list(inspect.signature(fn.fn).parameters)
    assert len(params) == 13, (cls.name, params)  # 7 statistics, P0, P1, S0..S3
    (p0, p1), switches = cfg.kernel_args()
    assert len(switches) == 4


README_DEFAULTS = readme_objectives()


def test_the_names():
    """One list of weightings: the registry, the README's table, the exports and SPEC agree."""
    assert list(README_DEFAULTS) == list(rk.weightings.WEIGHTINGS)
    classes = [cls.__name__ for cls in rk.weightings.WEIGHTINGS.values()]
    assert set(classes) <= set(rk.__all__)
    spec = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
    assert "README" in spec and not re.search(r"^\| `focal`", spec, re.M)  # SPEC points to the one table


@pytest.mark.parametrize("name", list(README_DEFAULTS))
def test_weighting_defaults(name):
    class_name, defaults = README_DEFAULTS[name]
    check_documented(rk.weightings.WEIGHTINGS[name], class_name, defaults)


@pytest.mark.parametrize("name", list(README_DEFAULTS))
def test_the_default_config_computes_the_documented_defaults(name):
    """The loss of the name equals SPEC's formula evaluated with the README's literal defaults."""
    z, y = make_batch(2, 5, 29, torch.float64, "cpu", seed=9)
    spec_obj = types.SimpleNamespace(name=name, **README_DEFAULTS[name][1])
    got = rk.cross_entropy(z, y, weighting=name, impl="reference")
    torch.testing.assert_close(got, spec_loss(z, y, spec_obj), rtol=1e-12, atol=0)


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_function_defaults():
    ce = _defaults(rk.cross_entropy)
    assert ce == dict(weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                      label_smoothing=0.0, weighting="sft", softcap=None, temperature=1.0, z_loss=0.0,
                      num_items_in_batch=None, token_weight=None, sequence_weight=None, return_stats=False,
                      inplace_backward=False, impl="auto", process_group=None, vocab_offset=None,
                      vocab_size=None, dp_group=None)
    lce = _defaults(rk.linear_cross_entropy)
    assert lce == dict(linear_bias=None, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                       options=None, weighting="sft", softcap=None, temperature=1.0, z_loss=0.0,
                       num_items_in_batch=None, token_weight=None, sequence_weight=None, return_stats=False,
                       chunk_size=None, acc_policy="auto", impl="auto", process_group=None, vocab_offset=None,
                       vocab_size=None, dp_group=None, reduce_input_grad=True)
    # torch's own positional order for the arguments it shares with F.cross_entropy
    assert list(inspect.signature(rk.cross_entropy).parameters)[:8] == list(
        inspect.signature(torch.nn.functional.cross_entropy).parameters)
    assert _defaults(rk.token_stats) == dict(ignore_index=-100, softcap=None, temperature=1.0, impl="auto",
                                             process_group=None, vocab_offset=None, vocab_size=None)
    assert _defaults(rk.logprobs) == dict(temperature=1.0, softcap=None, ignore_index=-100, impl="auto",
                                          return_stats=False)
    assert _defaults(rk.linear_logprobs) == dict(linear_bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                                                 chunk_size=None, acc_policy="auto", impl="auto", return_stats=False)
    from ranktuner_kernels import linear_loss, reference

    assert linear_loss.CHUNK_BYTES == {"cuda": 240 << 20, "cpu": 32 << 20}
    assert reference.CHUNK_ELEMENTS == 1 << 21


# ---- layout: imports run one way; one formula per weighting per implementation -----------


@pytest.mark.parametrize("folder", ["reference", "csrc_triton"])
def test_kernels_and_reference_import_nothing_from_the_package(folder):
    for path in (ROOT / folder).glob("*.py"):
        text = path.read_text()
        assert "ranktuner_kernels" not in text.replace("``ranktuner_kernels.", ""), path


@pytest.mark.parametrize("name", list(rk.weightings.WEIGHTINGS))
def test_every_row_local_weighting_has_its_triton_formula(name):
    check_triton_formula(rk.weightings.WEIGHTINGS[name])
