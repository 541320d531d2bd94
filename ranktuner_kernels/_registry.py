"""What a weighting is, and the one list of them: the interface every weighting config
implements (:class:`Weighting`, its inputs :class:`Batch` and outputs :class:`Terms`) and the
registry :data:`WEIGHTINGS` (:func:`register`, :func:`unregister`, :func:`resolve`).

The configs themselves are in :mod:`ranktuner_kernels.weightings`, which re-exports all of this:
the public names are ``rk.weightings.WEIGHTINGS``, ``rk.weightings.register``, ... Nothing here
names a weighting; adding one never touches this file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch

from .reference import RowStats


class Batch(NamedTuple):
    """What a weighting may need beyond the row statistics.

    ``keep``: ``[N]`` bool, the non-ignored tokens; ``shape``: the target's shape
    (``(N,)`` or ``(B, T)``); ``topk_entropy``: ``[N]`` entropy of the top-K softmax,
    present only for weightings with ``needs_topk``; ``gather``: the group hook of a
    batch-level statistic, a function that concatenates a 1-D tensor over the data-parallel
    group (``dp_group=``), or None when this process holds the whole batch.
    """

    keep: torch.Tensor
    shape: tuple
    topk_entropy: Optional[torch.Tensor] = None
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class Terms(NamedTuple):
    """Per-token ``value``, ``w`` and ``beta`` (None where there is no entropy term), ``[N]``."""

    value: torch.Tensor
    w: torch.Tensor
    beta: Optional[torch.Tensor]


class Weighting:
    """Base class. Subclasses are frozen dataclasses of their options."""

    name = "weighting"
    #: needs the entropy of the top-K softmax (EAFT)
    needs_topk = False
    #: w depends on other tokens of the batch (TALR's median): the gradient needs a second sweep
    batch_level = False
    #: beta != 0 (the gradient has an entropy term)
    has_entropy_term = False
    #: non-default settings (keyword dicts) that, with the defaults, set every option to a
    #: non-default value at least once: the tests run each of them
    variants: tuple = ()
    #: a row-local weighting's ``@triton.jit`` formula (the signature of
    #: ``csrc_triton/weightings.py``); None: the function of that module named ``name``
    triton_formula = None

    @property
    def row_local(self) -> bool:
        """Only the row's own statistics: the Triton formula runs inside the statistics kernel."""
        return not (self.needs_topk or self.batch_level)

    def validate(self) -> None:
        pass

    def terms(self, stats: RowStats, batch: Batch) -> Terms:
        raise NotImplementedError

    def kernel_formula(self, formulas):
        """The Triton formula the statistics kernel runs: ``triton_formula``, else the function
        named ``name`` in ``formulas`` (the module ``csrc_triton/weightings.py``)."""
        own = type(self).triton_formula
        return own if own is not None else getattr(formulas, self.name)

    def kernel_args(self) -> tuple:
        """``((P0, P1), (S0, S1, S2, S3))``: the Triton formula's two float options and its four
        ``tl.constexpr`` switches, in the order of its parameter list."""
        return (0.0, 0.0), (None, None, None, None)

    def __post_init__(self):
        self.validate()


#: The registry: every weighting's name -> its config class, in registration order.
WEIGHTINGS: dict = {}


def register(cls):
    """Class decorator: add a weighting config class to :data:`WEIGHTINGS` under its ``name``.

    ``cls`` must be a frozen dataclass subclassing :class:`Weighting`, with its own ``name``
    (a lower-case identifier no other class holds) and default options that validate, as
    must each of its ``variants``. Returns ``cls``."""
    if not isinstance(cls, type) or not issubclass(cls, Weighting) or cls is Weighting:
        raise TypeError(f"register: expected a subclass of Weighting, got {cls!r}")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"register: {cls.__name__} must be a @dataclass(frozen=True)")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"register: {cls.__name__}.name must be a lower-case identifier of its own, got {name!r}")
    taken = WEIGHTINGS.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"register: the name {name!r} is taken by {taken.__qualname__}")
    clash = [c for c in WEIGHTINGS.values() if c.__name__ == cls.__name__ and c is not cls]
    if clash:
        raise ValueError(f"register: a weighting class named {cls.__name__} is registered already")
    cls()
    for kwargs in cls.variants:
        cls(**kwargs)
    WEIGHTINGS[name] = cls
    return cls


def unregister(name: str) -> type:
    """Remove ``name`` from :data:`WEIGHTINGS` and return its class (for code that registered
    a weighting for a while, such as a test)."""
    try:
        return WEIGHTINGS.pop(name)
    except KeyError:
        raise ValueError(f"unregister: no weighting named {name!r}") from None


def describe(weighting) -> str:
    """A weighting as text: a name as given (``"dft"``); a config as its class with the
    options that differ from their defaults (``"RankTuner(w0='one')"``, ``"SFT()"``)."""
    if isinstance(weighting, str):
        return weighting
    if dataclasses.is_dataclass(weighting):
        changed = [f"{f.name}={getattr(weighting, f.name)!r}" for f in dataclasses.fields(weighting)
                   if f.init and (f.default is dataclasses.MISSING or getattr(weighting, f.name) != f.default)]
        return f"{type(weighting).__name__}({', '.join(changed)})"
    return str(getattr(weighting, "name", None) or type(weighting).__name__)


def resolve(weighting) -> Weighting:
    """A name (``"ranktuner"``) or a config object (``RankTuner(xi="geo")``) -> config object."""
    if isinstance(weighting, Weighting):
        return weighting
    if isinstance(weighting, str):
        try:
            return WEIGHTINGS[weighting]()
        except KeyError:
            raise ValueError(f"weighting: unknown name {weighting!r}; expected one of {sorted(WEIGHTINGS)}") from None
    raise TypeError(f"weighting: expected a name or a weighting config such as rk.RankTuner(), got {type(weighting).__name__}")
