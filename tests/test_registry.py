"""The registry of weightings is the one list: a toy row-local weighting defined here (its config
class, its Triton formula, its oracle and its README row, nothing else), registered for the
duration of these tests, goes through the same checks as the built-in ones: kernel against
reference, reference against its oracle, the options on both paths, the documented names and
defaults; and every list derived from the registry (the test configs, the exports, the bench's
lists) holds it. Also: what ``register`` refuses, and the README's "Adding an objective"
paragraph against the code."""

import dataclasses
import math
import pathlib
import re

import pytest
import torch

import ranktuner_kernels as rk
import spec_formulas
from helpers import configs
from test_defaults import check_documented, check_triton_formula, parse_objective_row
from test_kernels import check_against_reference
from test_options import OPTION_SETS, check_against_oracle
from test_reference import check_reference_matches_spec

triton = pytest.importorskip("triton")
tl = triton.language

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- the toy objective: its four parts --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyDamped(rk.Weighting):
    """``w = 1 / (1 + a H)`` (``mode="inverse"``) or ``exp(-a H)`` (``"exp"``); ``value = w (-log p_t)``."""

    a: float = 0.5
    mode: str = "inverse"
    name = "toy_damped"
    variants = (dict(a=2.0, mode="exp"),)

    def validate(self):
        if not isinstance(self.a, (int, float)) or not math.isfinite(self.a) or self.a < 0:
            raise ValueError(f"ToyDamped: a must be a finite number >= 0, got {self.a!r}")
        if self.mode not in ("inverse", "exp"):
            raise ValueError(f"ToyDamped: mode must be 'inverse' or 'exp', got {self.mode!r}")

    def kernel_args(self):
        return (float(self.a), 0.0), (self.mode, None, None, None)

    def terms(self, stats, batch):
        h = stats.entropy
        w = 1 / (1 + self.a * h) if self.mode == "inverse" else torch.exp(-self.a * h)
        return rk.weightings.Terms(w * (-stats.logp_t), w, None)


@triton.jit
def toy_damped(logp, q, ent, p_max, zy, m, rank, A, P1, MODE: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
               S3: tl.constexpr):
    if MODE == "exp":
        w = tl.exp(-A * ent)
    else:
        w = 1.0 / (1.0 + A * ent)
    return -w * logp, w, 0.0


ToyDamped.triton_formula = toy_damped


def toy_oracle(q, obj):
    h = q.d(q.entropy)
    w = 1 / (1 + obj.a * h) if obj.mode == "inverse" else torch.exp(-obj.a * h)
    return w * q.nll, None


TOY_README_ROW = '| `toy_damped` | `rk.ToyDamped(a=0.5, mode="inverse")` | `w·(−log p_t)` | `1/(1 + a·H)` or `exp(−a·H)` | 0 |'


@pytest.fixture
def toy():
    """The toy registered (weighting and oracle) for one test, and removed afterwards."""
    rk.weightings.register(ToyDamped)
    spec_formulas.ORACLES["toy_damped"] = toy_oracle
    try:
        yield ToyDamped
    finally:
        rk.weightings.unregister("toy_damped")
        spec_formulas.ORACLES.pop("toy_damped")


def toy_configs():
    return configs({"toy_damped": ToyDamped})


# ---- the same checks as the built-in weightings -----------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_toy_kernel_against_reference(toy, dtype, reduction):
    for cfg in toy_configs():
        check_against_reference(cfg, (2, 3, 257), dtype, reduction)


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_toy_reference_against_its_oracle(toy, reduction, weights):
    for cfg in toy_configs():
        check_reference_matches_spec(cfg, reduction, weights)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_toy_options_on_both_paths(toy, impl):
    for opts in OPTION_SETS.values():
        check_against_oracle("toy_damped", opts, impl, "logits", dtype=torch.float32)
    check_against_oracle("toy_damped", OPTION_SETS["all"], impl, "linear", dtype=torch.float32)


def test_toy_names_and_derived_lists(toy, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the bench package, from the checkout
    name, class_name, defaults = parse_objective_row(TOY_README_ROW)
    assert name == "toy_damped"
    check_documented(toy, class_name, defaults)
    check_triton_formula(toy)
    assert rk.ToyDamped is toy
    assert ToyDamped() in configs() and ToyDamped(a=2.0, mode="exp") in configs()
    from bench.compare import all_weightings, row_local_weightings

    assert "toy_damped" in all_weightings() and "toy_damped" in row_local_weightings()
    # by name, through both implementations
    z = torch.randn(2, 3, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 3))
    by_name = rk.cross_entropy(z, y, weighting="toy_damped", impl="reference")
    torch.testing.assert_close(by_name, rk.cross_entropy(z, y, weighting=ToyDamped(), impl="reference"))


def test_toy_is_gone_after_unregister():
    assert "toy_damped" not in rk.weightings.WEIGHTINGS and "toy_damped" not in spec_formulas.ORACLES
    with pytest.raises(AttributeError):
        rk.ToyDamped  # noqa: B018
    with pytest.raises(ValueError, match="weighting: unknown name 'toy_damped'"):
        rk.weightings.resolve("toy_damped")


# ---- what register refuses --------------------------------------------------------------


def test_register_refuses_what_cannot_be_right():
    @dataclasses.dataclass
    class NotFrozen(rk.Weighting):
        name = "not_frozen"

    @dataclasses.dataclass(frozen=True)
    class Taken(rk.Weighting):
        name = "ranktuner"

    @dataclasses.dataclass(frozen=True)
    class BadName(rk.Weighting):
        name = "Bad-Name"

    @dataclasses.dataclass(frozen=True)
    class BadVariant(rk.Weighting):
        x: float = 1.0
        name = "bad_variant"
        variants = (dict(x=-1.0),)

        def validate(self):
            if self.x <= 0:
                raise ValueError(f"BadVariant: x must be > 0, got {self.x}")

    @dataclasses.dataclass(frozen=True)
    class Inherited(rk.RankTuner):
        pass  # the name is RankTuner's, not its own

    refused = ((NotFrozen, TypeError, "frozen"), (int, TypeError, "subclass of Weighting"),
               (Taken, ValueError, "'ranktuner' is taken"), (BadName, ValueError, "lower-case identifier"),
               (Inherited, ValueError, "lower-case identifier"), (BadVariant, ValueError, "x must be > 0"))
    for cls, error, match in refused:
        with pytest.raises(error, match=match):
            rk.weightings.register(cls)
    with pytest.raises(ValueError, match="no weighting named"):
        rk.weightings.unregister("no_such")
    assert rk.weightings.register(rk.RankTuner) is rk.RankTuner  # registering again is a no-op
    assert list(rk.weightings.WEIGHTINGS)[:3] == ["sft", "dft", "ranktuner"]


# ---- the README's paragraph -------------------------------------------------------------


def test_adding_an_objective_paragraph_is_true():
    """The files the README's "Adding an objective" names are the ones each built-in weighting
    has its parts in, and nothing else lists the weightings."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    para = re.search(r"\*\*Adding an objective\*\*(.+?)\n\n", text, re.S).group(1)
    named = set(re.findall(r"`([\w/]+\.(?:py|md))`", para.split("The registry")[0]))  # the parts
    assert named == {"ranktuner_kernels/weightings.py", "csrc_triton/weightings.py", "tests/spec_formulas.py"}, named
    from ranktuner_kernels.kernels import weightings as formulas
    from test_defaults import README_DEFAULTS

    for name, cls in rk.weightings.WEIGHTINGS.items():
        assert cls.__module__ == "ranktuner_kernels.weightings"
        assert name in spec_formulas.ORACLES and name in README_DEFAULTS
        assert hasattr(formulas, name) == cls().row_local, name
    # the weighting names are written in no other file of the package, the tests or the bench
    # that would need an edit (the tests that pick a few weightings by name aside)
    for path in ("tests/helpers.py", "bench/compare.py", "ranktuner_kernels/__init__.py", "docs/SPEC.md"):
        body = (ROOT / path).read_text(encoding="utf-8")
        assert not re.search(r"\bOverTone\b|[\"'`]overtone[\"'`]", body), path
