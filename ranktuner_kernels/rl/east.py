"""EAST: entropy-based adaptive weighting for self-training (Wang et al., ``papers/east_self_training.txt``).

For each question ``i`` the model samples ``n`` responses; clustering them by final answer
gives proportions ``p_1 .. p_k`` and the question's entropy ``h_i = -sum_j p_j log p_j``
(:func:`answer_entropy`). The paper's mapping (its eq. 6, "Attempt 3")

    f(h_i) = h_i^a * N / sum_j h_j^a

turns the ``N`` entropies of a batch into non-negative weights with mean 1
(:func:`east_weights`); the EAST loss of question ``i`` is ``f(h_i) * L_i``, e.g.
``rk.cross_entropy(..., sequence_weight=w[question_of_each_response])``.

``a > 1`` sharpens the differences, ``0 < a < 1`` compresses them, ``a = 0`` gives uniform
weights and ``a < 0`` inverts them (confident questions weigh more). The weights do not
depend on the base of the logarithm: scaling every ``h`` by ``c`` scales numerator and
denominator by ``c^a``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

__all__ = ["east_weights", "answer_entropy"]


def east_weights(cluster_entropies: torch.Tensor, a: float, *, eps: float = 0.0, dim: int = -1) -> torch.Tensor:
    """EAST weights ``f(h) = h^a * N / sum_i h_i^a`` over ``dim`` (``N`` = its size).

    Args:
        cluster_entropies: entropies ``h >= 0``, any shape; the weights are normalised over
            ``dim`` (each slice has mean 1). float32 / float64 are computed in their own dtype;
            float16 / bfloat16 are computed in float32 and returned in the input dtype.
        a: the exponent (any real number; the paper searches ``[-3, 3]``).
        eps: entropies are first clamped to ``max(h, eps)``. The default 0 keeps the paper's
            formula exactly, with the zero-entropy cases defined below; ``eps > 0`` makes the
            weights finite and smooth in ``h`` for ``a < 0`` instead.
        dim: the dimension over which the weights average to 1.

    Zero entropies (a question whose samples all agree) make ``h^a`` degenerate; the weights
    are then defined as the limit of ``f`` when those entropies go to 0 together:

    * ``a > 0``: ``0^a = 0``, so such a question gets weight 0 -- unless every entropy of the
      slice is 0 (``0/0``): then every weight is 1.
    * ``a = 0``: every weight is 1 (``h^0 = 1``, ``0^0`` included).
    * ``a < 0``: ``0^a = inf``; the zero-entropy questions share the total ``N`` equally
      (each gets ``N / #zeros``) and every other question gets 0. (Pass ``eps`` to avoid this
      all-or-nothing limit.)

    The computation is done in log space (``a·log h − logsumexp``), so large ``|a|`` does not
    overflow. Returns a tensor of the input's shape and dtype. Raises ``ValueError`` for
    negative or non-finite entropies, ``TypeError`` for non-floating input.
    """
    h = cluster_entropies
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"cluster_entropies: expected a torch.Tensor, got {type(h).__name__}")
    if not h.dtype.is_floating_point:
        raise TypeError(f"cluster_entropies: expected a floating dtype, got {h.dtype}")
    a = float(a)
    if not math.isfinite(a):
        raise ValueError(f"a: expected a finite number, got {a}")
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    if h.dim() == 0:
        raise ValueError("cluster_entropies: expected at least one dimension")
    if h.numel() == 0:
        return torch.empty_like(h)
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError("cluster_entropies: entropies must be finite and >= 0")

    out_dtype = h.dtype
    x = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    if eps > 0:
        x = x.clamp_min(eps)
    n = x.shape[dim]
    if a == 0.0:
        return torch.ones_like(x).to(out_dtype)

    zero = x == 0
    log_h = torch.log(x)  # -inf where h == 0
    s = a * log_h  # a > 0: -inf at zeros; a < 0: +inf at zeros
    if a > 0:
        all_zero = zero.all(dim=dim, keepdim=True)
        s = torch.where(all_zero, torch.zeros_like(s), s)  # the 0/0 limit: uniform
        w = torch.exp(s - torch.logsumexp(s, dim=dim, keepdim=True)) * n
    else:
        any_zero = zero.any(dim=dim, keepdim=True)
        finite_w = torch.exp(s - torch.logsumexp(torch.where(zero, torch.zeros_like(s), s), dim=dim, keepdim=True)) * n
        n_zero = zero.sum(dim=dim, keepdim=True).clamp_min(1).to(x.dtype)
        limit_w = torch.where(zero, n / n_zero, torch.zeros_like(x))
        w = torch.where(any_zero, limit_w, finite_w)
    return w.to(out_dtype)


def answer_entropy(
    answers: Sequence[Sequence[Hashable]],
    *,
    base: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Entropy of each question's answer clusters: ``[Q]`` from ``Q`` lists of sampled final answers.

    Answers are clustered by equality (``==`` / ``hash``, so normalise strings first if
    ``"1/2"`` and ``"0.5"`` should agree); cluster ``j`` of a question with ``n`` answers has
    proportion ``p_j = n_j / n`` and the entropy is ``-sum_j p_j log p_j`` in nats (``base``
    changes the logarithm's base; it does not change :func:`east_weights`). A question with no
    answers, or with a single cluster, has entropy 0. ``None`` is an answer like any other (all
    unparsable answers form one cluster); give each failure a distinct object to count them
    as separate clusters.
    """
    if isinstance(answers, (str, bytes)):
        raise TypeError("answers: expected a sequence of per-question answer lists, got a string")
    if base is not None and (base <= 0 or base == 1):
        raise ValueError(f"base: expected a positive number other than 1, got {base}")
    scale = 1.0 if base is None else 1.0 / math.log(base)
    values = []
    for q, group in enumerate(answers):
        if isinstance(group, (str, bytes)):
            raise TypeError(f"answers[{q}]: expected a list of answers, got a string")
        counts = Counter(group).values()
        n = sum(counts)
        h = 0.0
        for c in counts:
            p = c / n
            h -= p * math.log(p)
        values.append(max(h, 0.0) * scale)
    return torch.tensor(values, dtype=dtype, device=device)
