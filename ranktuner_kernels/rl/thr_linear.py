"""Token Hidden Reward from hidden states and the LM head, without the ``[B, T, V]`` logits.

For a trainer whose head never forms the logits (fused-linear losses): the same numbers as
:func:`~ranktuner_kernels.rl.thr.token_hidden_reward` on the logits
``z' = c·tanh((h Wᵀ + b)/c)/T`` with the hidden states ``h`` as THR's hidden factor (THR's
hidden states are the read-out layer's inputs, i.e. exactly the ``hidden`` given here):

    THR_u = sign(u) · Σ_{o ∈ correct responses of u's group} w_o · <e_o - π_o, e_u - π_u> · (h_o · h_u)

Two passes over vocabulary chunks (``reference/thr.py``): the per-row ``lse`` and entropy, then
the sums through the factorisation ``Σ_o w_o <q_o, q_u>(h_o·h_u) = Σ_v q_u,v (h_u · M_v)``,
``M = Σ_o w_o q_o h_oᵀ`` per group (``q = e_y - π``). Memory ``O(N·chunk + chunk·D + N·D)``
(never ``N × V`` nor ``|O| × |U|``), time in matmuls, on the tensors' device. No gradient.
"""

from __future__ import annotations

import math

import torch

from ..reference import Transform
from ..reference import thr as ref
from .thr import observed_weights, signed_thr, thr_advantages, validate_responses

__all__ = ["linear_token_hidden_reward", "linear_thr_guided_advantages"]


def _validate_head(hidden, linear_weight, linear_bias, temperature, softcap, chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden: expected a [B, T, D] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        raise ValueError(f"linear_weight: expected a [V, D] tensor, got "
                         f"{getattr(linear_weight, 'shape', type(linear_weight))}")
    for name, x in (("hidden", hidden), ("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if x is not None and not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: expected on {hidden.device}, got {x.device}")
    v, d = linear_weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden: last dimension {hidden.shape[-1]} does not match linear_weight's D = {d}")
    if linear_bias is not None and linear_bias.shape != (v,):
        raise ValueError(f"linear_bias: expected shape ({v},), got {tuple(linear_bias.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0):
        raise ValueError(f"softcap: expected a number > 0 or None, got {softcap!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return Transform(None if softcap is None else float(softcap), float(temperature))


def _prepare(hidden, linear_weight, tokens, correct, group_index, mask, linear_bias, temperature, softcap,
             chunk_size, ignore_index):
    """Checked arguments and the kept rows: ``(transform, keep, group_index, correct, h [K, D],
    y [K], row_group [K])`` with ``K`` the kept positions in row-major order."""
    transform = _validate_head(hidden, linear_weight, linear_bias, temperature, softcap, chunk_size)
    b, t, _ = hidden.shape
    keep, group_index, correct = validate_responses(tokens, correct, group_index, mask, ignore_index, b, t,
                                                    linear_weight.shape[0], hidden.device)
    h = hidden[keep]  # [K, D]: a copy of the kept rows (any input strides)
    y = tokens.to(hidden.device)[keep]
    row_group = group_index[:, None].expand(b, t)[keep]
    return transform, keep, group_index, correct, h, y, row_group


@torch.no_grad()
def linear_token_hidden_reward(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor,
    tokens: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: str = "none",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    hidden_factor: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`~ranktuner_kernels.rl.thr.token_hidden_reward` from the read-out layer's inputs:
    the THR of every response token for the logits ``z' = c·tanh((hidden @ linear_weightᵀ +
    linear_bias)/c)/T``, never formed (module docstring).

    Args:
        hidden: ``[B, T, D]`` hidden states entering the LM head (position ``t`` predicts
            ``tokens[:, t]``: shift them as the logits would be); any strides.
        linear_weight: ``[V, D]`` the head's weight (``lm_head.weight``); ``linear_bias``: ``[V]``.
        tokens, correct, group_index, mask, normalize, ignore_index: as in ``token_hidden_reward``.
        temperature, softcap: the policy's logit transform ``z' = c·tanh(z/c)/T`` (``π =
            softmax(z')``, as in ``rk.linear_logprobs``).
        hidden_factor: multiply by ``h_o·h_u`` (THR's definition, default); ``False`` gives
            ``token_hidden_reward`` without ``hidden``.
        chunk_size: vocabulary columns per chunk (default: ``2^25 / kept tokens`` clamped to
            ``[128, 8192]``): peak extra memory about ``3 · K · chunk_size`` floats.

    Returns ``[B, T]`` float32 (float64 for float64 ``hidden``), 0 at dropped positions and in
    groups without a correct response.
    """
    transform, keep, group_index, correct, h, y, row_group = _prepare(
        hidden, linear_weight, tokens, correct, group_index, mask, linear_bias, temperature, softcap, chunk_size,
        ignore_index)
    dt = ref.thr_compute_dtype(hidden.dtype)
    w = observed_weights(keep, correct, normalize, dt)[keep]
    sums = ref.linear_thr_sums(h, linear_weight, linear_bias, y, row_group, w, transform=transform,
                               hidden_factor=hidden_factor, chunk=chunk_size)
    return signed_thr(sums, keep, correct)


@torch.no_grad()
def linear_thr_guided_advantages(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    p: float = 0.0,
    tau: float | str = "nthr",
    beta: float = 1.0,
    entropy_top: float = 0.2,
    keep_low: bool = False,
    normalize: str = "none",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    hidden_factor: bool = True,
    chunk_size: int | None = None,
):
    """:func:`~ranktuner_kernels.rl.thr.thr_guided_advantages` from the hidden states and the
    head: one chunked pass for the kept rows' ``lse`` and entropy, the THR sums
    (:func:`linear_token_hidden_reward`), then :func:`~ranktuner_kernels.rl.thr.thr_advantages`.
    What a GRPO trainer calls with its completion hidden states, ``lm_head.weight``, completion
    ids, advantages, completion mask, per-response correctness and prompt ids. Returns
    ``(adjusted [B, T], info)``; ``info`` adds ``thr`` and ``entropy`` (``[B, T]``, 0 at
    dropped positions) to ``thr_advantages``' dict."""
    transform, keep, group_index, correct, h, y, row_group = _prepare(
        hidden, linear_weight, tokens, correct, group_index, mask, linear_bias, temperature, softcap, chunk_size,
        ignore_index)
    dt = ref.thr_compute_dtype(hidden.dtype)
    lse, ent = ref.linear_lse_entropy(h, linear_weight, linear_bias, transform=transform, chunk=chunk_size)
    w = observed_weights(keep, correct, normalize, dt)[keep]
    sums = ref.linear_thr_sums(h, linear_weight, linear_bias, y, row_group, w, lse=lse, transform=transform,
                               hidden_factor=hidden_factor, chunk=chunk_size)
    thr = signed_thr(sums, keep, correct)
    entropy = torch.zeros(keep.shape, dtype=ent.dtype, device=ent.device)
    entropy[keep] = ent
    adjusted, info = thr_advantages(advantages, thr, correct, group_index, mask=keep, p=p, tau=tau, beta=beta,
                                    entropy=entropy if entropy_top > 0 else None, entropy_top=entropy_top,
                                    keep_low=keep_low)
    info["thr"] = thr
    info["entropy"] = entropy
    return adjusted, info
