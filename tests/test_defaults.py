"""Every documented default pinned to the value SPEC.md and the README state, written here as
literals (never read back from the dataclasses), and the layout rules of the code."""

import dataclasses
import inspect
import pathlib
import types

import pytest
import torch

import ranktuner_kernels as rk
from helpers import make_batch
from spec_formulas import spec_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: SPEC.md's defaults, one literal each.
SPEC_DEFAULTS = {
    "sft": {},
    "dft": {},
    "ranktuner": dict(w0="p", xi="max", k="simplified", ablation=None, clamp_min=1e-6),
    "talr": dict(w_min=0.01, tau=None),
    "eaft": dict(k=20, alpha=1.0, norm=3.0),
    "overtone": dict(lam=0.1),
    "alpha_power": dict(alpha=1.0),
    "threshold": dict(low=0.2, high=1.0),
    "entropy_reg": dict(alpha=0.02),
    "focal": dict(gamma=2.0),
}


def test_the_names():
    assert sorted(rk.weightings.WEIGHTINGS) == sorted(SPEC_DEFAULTS)


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_weighting_defaults(name):
    cfg = rk.weightings.resolve(name)
    assert type(cfg).name == name
    assert dataclasses.asdict(cfg) == SPEC_DEFAULTS[name]


@pytest.mark.parametrize("name", ["ranktuner", "eaft", "focal", "alpha_power", "threshold", "overtone", "entropy_reg"])
def test_the_default_config_computes_specs_defaults(name):
    """The loss of the name equals SPEC's formula evaluated with the literal defaults."""
    z, y = make_batch(2, 5, 29, torch.float64, "cpu", seed=9)
    spec_obj = types.SimpleNamespace(name=name, **SPEC_DEFAULTS[name])
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
    assert _defaults(rk.logprobs) == dict(temperature=1.0, softcap=None, ignore_index=-100, impl="auto")
    from ranktuner_kernels import linear_loss, reference

    assert linear_loss.CHUNK_BYTES == {"cuda": 240 << 20, "cpu": 32 << 20}
    assert reference.CHUNK_ELEMENTS == 1 << 21


# ---- layout: imports run one way; one formula per weighting per implementation -----------


@pytest.mark.parametrize("folder", ["reference", "csrc_triton"])
def test_kernels_and_reference_import_nothing_from_the_package(folder):
    for path in (ROOT / folder).glob("*.py"):
        text = path.read_text()
        assert "ranktuner_kernels" not in text.replace("``ranktuner_kernels.", ""), path


def test_every_row_local_weighting_has_its_triton_formula():
    pytest.importorskip("triton")
    from ranktuner_kernels.kernels import weightings as formulas

    for name, cls in rk.weightings.WEIGHTINGS.items():
        cfg = cls()
        if not cfg.row_local:
            assert not hasattr(formulas, name), name  # no dead formula
            continue
        fn = getattr(formulas, name)
        params = list(inspect.signature(fn.fn).parameters)
        assert len(params) == 13, (name, params)  # 7 statistics, P0, P1, S0..S3
        (p0, p1), switches = cfg.kernel_args()
        assert len(switches) == 4
