"""The per-token statistics of a fused LM head: one function, :func:`head_statistics`, between
the TRL head (:mod:`.head`) and the core.

For the rows ``h`` ``[K, D]`` of kept tokens, the head ``W`` ``[V, D]`` (bias ``b``) and the
targets ``y`` ``[K]``, with ``z' = c tanh(z / c) / T`` of the logits ``z = h Wᵀ + b`` and
``p = softmax(z')``:

* ``log_probs``: ``log p_y`` (differentiable);
* ``entropy``: ``H = -Σ_v p_v log p_v`` (differentiable);
* ``log_sum_sq_probs``: ``log Σ_v p_v²`` (no gradient);
* ``mean_logits``: ``(1/V) Σ_v z'_v`` (no gradient);
* ``is_top1``: ``argmax_v z_v == y`` with the first index winning a tie (no gradient).

All of them come from one streaming pass of :func:`rk.linear_logprobs` (never the ``[K, V]``
logits); the last three are optional statistics of that pass (``return_stats``), each an extra
accumulator that only runs when its field is asked for. :data:`CORE_NAMES` maps TRL's field
names to the core's.
"""

from __future__ import annotations

import torch

import ranktuner_kernels as rk

#: the per-token fields of TRL's ``FusedCausalLMOutput``, in its order
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
#: TRL's field -> the core's name (``return_stats`` key) of the same per-token statistic
CORE_NAMES = {"log_probs": "logp_t", "entropy": "entropy", "log_sum_sq_probs": "log_sum_p2",
              "mean_logits": "logit_mean", "is_top1": "is_top1"}
#: the fields that are optional statistics of the pass (asked for through ``return_stats``)
OPTIONAL_FIELDS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def core_stats(wanted) -> tuple:
    """The core's ``return_stats`` names of the optional fields among ``wanted`` (TRL names)."""
    return tuple(CORE_NAMES[k] for k in OPTIONAL_FIELDS if k in wanted)


def head_statistics(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
                    softcap: float | None, temperature: float, wanted) -> dict:
    """``{field: [K] tensor}`` for each name of ``wanted`` (a subset of :data:`FIELDS`), see the
    module docstring, from one :func:`rk.linear_logprobs` pass that computes only the optional
    statistics asked for. ``h``, ``weight``, ``bias`` share one dtype (the projection's); the
    results are float32 (float64 for float64 inputs), ``is_top1`` bool. Every target must be a
    class index (the caller drops ignored rows)."""
    wanted = set(wanted)
    extra = core_stats(wanted)
    out = rk.linear_logprobs(h, weight, target, linear_bias=bias, temperature=temperature, softcap=softcap,
                             return_stats=extra or False)
    fields = {"log_probs": out[0], "entropy": out[1]}
    if extra:
        fields.update((k, out[2][CORE_NAMES[k]]) for k in OPTIONAL_FIELDS if k in wanted)
    return {k: v for k, v in fields.items() if k in wanted}
