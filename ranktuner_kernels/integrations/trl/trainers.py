"""One-import drop-ins for TRL's ``RLOOTrainer``, ``DPOTrainer`` and ``KTOTrainer``: TRL's class
with this library's fused LM head wherever TRL installs its own (``GRPOTrainer``, the same with
the ``east=`` / ``thr=`` options, is in :mod:`.grpo`; ``SFTTrainer`` in :mod:`.sft`).

    from ranktuner_kernels.integrations.trl import RLOOTrainer     # instead of: from trl import RLOOTrainer

TRL 1.16's trainers install their head in ``__init__`` by calling the name ``add_fused_lm_head``
that their module imported from ``trl.trainer.utils`` (on the policy, or its PEFT base model, and
on the reference model), then call ``model(..., labels=labels, fused_lm_head=True)``. A drop-in
runs TRL's ``__init__`` with that module's name bound to :func:`.head.add_fused_lm_head` (with
the same arguments), restored afterwards (:func:`heads_substituted`); every argument, step and
metric is TRL's. If a TRL version installs its head elsewhere, the drop-in raises instead of
silently running TRL's head.
"""

from __future__ import annotations

import contextlib
import sys

from .. import class_built_on_first_use
from .head import add_fused_lm_head

__all__ = ["RLOOTrainer", "DPOTrainer", "KTOTrainer", "heads_substituted"]

#: the drop-in trainers of this module (GRPOTrainer, with east= and thr=, is in .grpo; SFTTrainer,
#: with its weighting=, in .sft)
TRAINERS = ("RLOOTrainer", "DPOTrainer", "KTOTrainer")


def import_trl(what: str):
    try:
        import trl
    except ImportError as e:
        raise ImportError(f"ranktuner_kernels.integrations.trl.{what} needs TRL: "
                          'pip install "ranktuner-kernels[trl]" (the `trl` extra)') from e
    return trl


@contextlib.contextmanager
def heads_substituted(trainer_cls, installer=add_fused_lm_head):
    """While the block runs, the module that defines ``trainer_cls`` (a TRL trainer class) sees
    ``installer`` under the name ``add_fused_lm_head`` instead of TRL's function. Raises
    RuntimeError if that module does not hold TRL's function under that name, or if the block
    never called it (TRL installs its head somewhere else: the drop-in would not cover it)."""
    from trl.trainer import utils

    module = sys.modules[trainer_cls.__module__]
    trl_head = getattr(module, "add_fused_lm_head", None)
    if trl_head is not utils.add_fused_lm_head:
        raise RuntimeError(f"{module.__name__} does not call trl.trainer.utils.add_fused_lm_head by that name (TRL "
                           f"{sys.modules['trl'].__version__}); this drop-in is written for TRL 1.16's trainers")
    calls = []

    def substitute(model, *args, **kwargs):
        calls.append(model)
        return installer(model, *args, **kwargs)

    module.add_fused_lm_head = substitute
    try:
        yield calls
    finally:
        module.add_fused_lm_head = trl_head
    if not calls:
        raise RuntimeError(f"{trainer_cls.__name__}.__init__ did not install a fused LM head through "
                           f"{module.__name__}.add_fused_lm_head; this drop-in is written for TRL 1.16's trainers")


def _drop_in(name: str):
    """The class ``name``: TRL's trainer of that name, initialised under :func:`heads_substituted`."""
    trl = import_trl(name)
    base = getattr(trl, name)

    def __init__(self, *args, **kwargs):
        with heads_substituted(base):
            base.__init__(self, *args, **kwargs)

    doc = (f"TRL's ``trl.{name}`` (every argument and metric of TRL's) whose fused LM head, on the policy "
           f"model (or its PEFT base model) and on the reference model, is "
           f":func:`ranktuner_kernels.integrations.trl.add_fused_lm_head`: the per-token log-probabilities and "
           f"entropies come from this library's kernels; TRL's chunked kernel never runs.")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc})


def _builder(name: str):
    def build():
        return _drop_in(name)

    return class_built_on_first_use(build)


# one builder per class; a trainer with options of our own has a class statement of its own (.grpo, .sft)
BUILDERS = {name: _builder(name) for name in TRAINERS}


def __getattr__(name):  # PEP 562: TRL is imported when a class is first asked for (pickle finds them here)
    if name in BUILDERS:
        return BUILDERS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
