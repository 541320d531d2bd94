"""The per-token statistics of a fused LM head: one function, :func:`head_statistics`, between
the TRL head (:mod:`.head`) and the core.

For the rows ``h`` ``[K, D]`` of kept tokens, the head ``W`` ``[V, D]`` (bias ``b``) and the
targets ``y`` ``[K]``, with ``z' = c tanh(z / c) / T`` of the logits ``z = h Wᵀ + b`` and
``p = softmax(z')``:

* ``log_probs``: ``log p_y`` (differentiable);
* ``entropy``: ``H = -Σ_v p_v log p_v`` (differentiable);
* ``log_sum_sq_probs``: ``log Σ_v p_v²`` (no gradient);
* ``mean_logits``: ``(1/V) Σ_v z'_v`` (no gradient);
* ``is_top1``: ``argmax_v z'_v == y`` with the first index winning a tie (no gradient).

The first two come from :func:`rk.linear_logprobs` (one streaming pass, never the ``[K, V]``
logits; under ``torch.no_grad()`` only that pass). The other three are computed here for now by a
chunked torch pass, until the core's statistics pass returns them (``TODO(ops-merge)`` below).
"""

from __future__ import annotations

import torch

import ranktuner_kernels as rk

#: the per-token fields of TRL's ``FusedCausalLMOutput``, in its order
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EXTRA = ("log_sum_sq_probs", "mean_logits", "is_top1")
# logits held at once by the temporary pass below: rows * V <= this (16 MiB in float32)
_CHUNK_ELEMENTS = 1 << 22


def head_statistics(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
                    softcap: float | None, temperature: float, wanted) -> dict:
    """``{field: [K] tensor}`` for each name of ``wanted`` (a subset of :data:`FIELDS`), see the
    module docstring. ``h``, ``weight``, ``bias`` share one dtype (the projection's); the results
    are float32 (float64 for float64 inputs), ``is_top1`` bool. Every target must be a class index
    (the caller drops ignored rows)."""
    wanted = set(wanted)
    out = {}
    if wanted & {"log_probs", "entropy"}:
        logp, entropy = rk.linear_logprobs(h, weight, target, linear_bias=bias, temperature=temperature,
                                           softcap=softcap)
        out.update((k, v) for k, v in (("log_probs", logp), ("entropy", entropy)) if k in wanted)
    extra = [k for k in _EXTRA if k in wanted]
    if extra:
        # TODO(ops-merge): rk.linear_logprobs(..., return_stats=("log_sum_p2", "logit_mean", "is_top1")) returns
        # these from the same streaming pass (extra accumulators in the statistics kernel); switch to it and drop
        # _extra_statistics, a second pass over the logits in torch.
        out.update(_extra_statistics(h, weight, bias, target, softcap, temperature, extra))
    return out


def _extra_statistics(h, weight, bias, target, softcap, temperature, names) -> dict:
    """TEMPORARY (see ``TODO(ops-merge)``): ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` by
    chunks of rows, without gradient, accumulated in float32 (float64 for float64 inputs).

    ``log Σ p²`` is ``log1p(s2) - 2 log1p(s1)`` with ``s_k = Σ_{v≠m} exp(k (z'_v - z'_m))`` over the
    entries but one maximum ``m``: exact to the dtype's relative precision also for a near-certain
    token, where ``logsumexp(2z') - 2 logsumexp(z')`` cancels to 0."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    n, vocab = h.shape[0], weight.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    parts = {k: [] for k in names}
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        w = weight.detach().to(acc)
        b = None if bias is None else bias.detach().to(acc)
        for start in range(0, n, rows):
            z = torch.nn.functional.linear(h[start:start + rows].detach().to(acc), w, b)
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature
            arg = z.argmax(dim=-1, keepdim=True)  # the first maximum, as TRL's kernel
            top = z.gather(-1, arg)
            if "is_top1" in parts:
                parts["is_top1"].append(arg.squeeze(-1) == target[start:start + rows])
            if "mean_logits" in parts:
                parts["mean_logits"].append(z.mean(dim=-1))
            if "log_sum_sq_probs" in parts:
                e = torch.exp(z - top).scatter(-1, arg, 0.0)
                parts["log_sum_sq_probs"].append(torch.log1p((e * e).sum(-1)) - 2 * torch.log1p(e.sum(-1)))
    empty = {"is_top1": torch.bool}
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=empty.get(k, acc), device=h.device)
            for k, v in parts.items()}
