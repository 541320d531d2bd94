"""Token Hidden Reward (THR) and the THR-guided advantage rule (Deng et al., ``papers/thr_token_hidden_reward.txt``).

Setting: one question, a group of sampled responses, some correct. Taking a GRPO step on
token ``u`` (advantage ``A_u``) through a shared read-out layer changes the log-likelihood of
token ``o`` by ``η · A_u · <e_o - π_o, e_u - π_u> · h_u·h_o`` to first order (THR eq. 15). The
token hidden reward of an updating token ``u`` sums that effect over the tokens ``o`` of the
group's correct responses, signed by whether ``u``'s own response is correct (eq. 16):

    THR_u = sign(u) · sum_{o in correct responses of u's group} w_o · <e_o - π_o, e_u - π_u> · (h_o · h_u)

with ``sign(u) = +1`` for tokens of correct responses and ``-1`` otherwise (the sign of a
GRPO advantage in a mixed group), ``w_o = 1`` (``normalize="none"``) or ``1/|y_o|``
(``normalize="length"``), and the hidden factor dropped when no hidden states are given.
``THR_u > 0``: training on ``u`` raises the likelihood of the correct responses
(exploitation); ``THR_u < 0``: it lowers it, keeping probability mass for other outputs
(exploration).

The rule (THR appendix D.2 and B):

    Â_u ← 1[|THR_u| > τ] · (1 + sign(THR_u)·p) · Â_u      (dominant, high-|THR| tokens)
    Â_u ← Â_u                                              (top-``entropy_top`` entropy tokens not above)
    Â_u ← 0                                                (every other token)

``p > 0`` favours exploitation, ``p < 0`` exploration (the paper uses ±0.1 / ±0.2). ``τ``
follows the NTHR influence heuristic by default (``tau="nthr"``): per group, ``β`` times the
smallest, over the correct responses, of the mean THR of a response's tokens.

Nothing here materialises ``N × V`` probabilities: :func:`thr_pair_sums` dispatches through the
losses' ``Backend`` to the Triton kernel (``ranktuner_kernels.kernels.thr``) on CUDA, or to the
streaming torch version (``ranktuner_kernels.reference.thr``) otherwise. Everything runs without gradient.
From the hidden states and the LM head, never forming the logits: :mod:`ranktuner_kernels.rl.thr_linear`.
"""

from __future__ import annotations

import math

import torch

from .._dispatch import get_backend

__all__ = ["token_hidden_reward", "thr_advantages", "thr_guided_advantages", "thr_pair_sums"]

IMPLS = ("auto", "triton", "reference", "naive")
NORMALIZE = ("none", "length")


def _backend(impl: str, logits: torch.Tensor):
    """The losses' ``Backend`` (``auto``/``triton``/``reference``), or None for ``"naive"``."""
    if impl == "naive":
        return None
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return get_backend(impl, logits)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` view (or copy, when ``[B, T, V]`` rows cannot be merged) for the torch paths."""
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def thr_pair_sums(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden=None, *,
                  lse=None, impl: str = "auto", precision: str = "ieee"):
    """Grouped sums ``out[j] = sum_{i: group_o[i] = group_u[j]} w[i]·S[o_i, u_j] (·h_{o_i}·h_{u_j})``
    with ``S[o, u] = <e_{y_o} - π_o, e_{y_u} - π_u>`` (the building block of THR).

    ``logits``: ``[N, V]`` or ``[B, T, V]`` (rows numbered ``b·T + t``); ``tokens``: ``[N]``;
    ``u_rows``/``o_rows``: row indices; ``u_group``/``o_group``: integer group ids;
    ``o_weight``: per observed row; ``hidden``: ``[N, D]`` or None; ``lse``: optional per-row
    log-sum-exp. ``impl``: ``"triton"`` (kernel), ``"reference"`` (streaming torch), ``"naive"``
    (materialised oracle, small sizes only) or ``"auto"`` (Triton on CUDA). Returns float32
    (float64 on the torch paths for float64 logits).
    """
    backend = _backend(impl, logits)
    if backend is None:
        from ranktuner_kernels.reference import thr as ref

        return ref.thr_pair_sums_naive(_as_rows(logits), tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden)
    return backend.thr_pair_sums(logits, tokens, u_rows, u_group, o_rows, o_group, o_weight, hidden, lse, precision)


def _validate(logits, tokens, correct, group_index, mask, hidden, ignore_index):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected a [B, T, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating dtype, got {logits.dtype}")
    b, t, v = logits.shape
    if hidden is not None and (hidden.dim() != 3 or hidden.shape[:2] != (b, t)):
        raise ValueError(f"hidden: expected [B, T, D] = ({b}, {t}, D), got {tuple(hidden.shape)}")
    return validate_responses(tokens, correct, group_index, mask, ignore_index, b, t, v, logits.device)


def validate_responses(tokens, correct, group_index, mask, ignore_index, b, t, v, device):
    """Checks of the response arguments shared by the THR entry points; returns ``(keep [B, T]
    bool, group_index [B] long, correct [B] bool)`` on ``device``."""
    if tokens.shape != (b, t):
        raise ValueError(f"tokens: expected shape ({b}, {t}), got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point:
        raise TypeError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    if correct.shape != (b,):
        raise ValueError(f"correct: expected shape ({b},), got {tuple(correct.shape)}")
    if group_index is None:
        group_index = torch.zeros(b, dtype=torch.long, device=device)
    elif group_index.shape != (b,):
        raise ValueError(f"group_index: expected shape ({b},), got {tuple(group_index.shape)}")
    keep = tokens != ignore_index
    if mask is not None:
        if mask.shape != (b, t):
            raise ValueError(f"mask: expected shape ({b}, {t}), got {tuple(mask.shape)}")
        keep = keep & (mask.to(keep.device) != 0)
    kept_tokens = tokens[keep]
    if kept_tokens.numel() and (int(kept_tokens.min()) < 0 or int(kept_tokens.max()) >= v):
        raise ValueError(f"tokens: kept tokens must lie in [0, {v})")
    return keep.to(device), group_index.to(device).long(), correct.to(device).bool()


def observed_weights(keep, correct, normalize, dtype):
    """``[B, T]`` weight ``w_o`` of every position as an observed token: 0 outside the kept
    tokens of correct responses, 1 (``"none"``) or ``1/|y_o|`` (``"length"``) inside."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")
    w = torch.ones(keep.shape, dtype=dtype, device=keep.device)
    if normalize == "length":
        w = w / keep.sum(1, keepdim=True).clamp_min(1).to(dtype)
    return torch.where(keep & correct[:, None], w, torch.zeros_like(w))


def signed_thr(sums, keep, correct):
    """``[B, T]`` THR from the kept positions' sums (in ``keep``'s row-major order): the sign of
    the response, 0 at dropped positions."""
    sign = torch.where(correct, 1.0, -1.0).to(sums.dtype)
    thr = torch.zeros(keep.shape, dtype=sums.dtype, device=keep.device)
    thr[keep] = sums * sign[:, None].expand(keep.shape)[keep]
    return thr


@torch.no_grad()
def token_hidden_reward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    normalize: str = "none",
    ignore_index: int = -100,
    lse: torch.Tensor | None = None,
    impl: str = "auto",
    precision: str = "ieee",
) -> torch.Tensor:
    """Token Hidden Reward of every response token (module docstring for the formula).

    Args:
        logits: ``[B, T, V]`` logits of the policy that sampled the responses (row ``t``
            predicts ``tokens[:, t]``; shift them first, ``logits[:, :-1]`` is fine).
        tokens: ``[B, T]`` sampled tokens; ``ignore_index`` marks positions that are no
            response tokens.
        correct: ``[B]`` bool, whether each response is correct (verifiable reward).
        group_index: ``[B]`` integer question id of each response (default: one group).
        mask: optional ``[B, T]``, 1 for response tokens (combined with ``ignore_index``).
        hidden: optional ``[B, T, D]`` final hidden states (the LM head's input) of the same
            positions; without them the hidden factor ``h_o·h_u`` is left out.
        normalize: ``"none"`` (``w_o = 1``) or ``"length"`` (``w_o = 1/|y_o|``: every correct
            response counts equally).
        lse: optional ``[B*T]`` float32 log-sum-exp per row (e.g. from the loss's statistics).
        impl, precision: :func:`thr_pair_sums`.

    Returns ``[B, T]`` THR (float32; float64 for float64 logits on the torch paths), 0 at dropped
    positions and in groups without a correct response.
    """
    keep, group_index, correct = _validate(logits, tokens, correct, group_index, mask, hidden, ignore_index)
    b, t, _ = logits.shape
    dev = logits.device
    wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = observed_weights(keep, correct, normalize, wdt)
    rows = torch.arange(b * t, device=dev).view(b, t)
    resp_group = group_index[:, None].expand(b, t)
    o_keep = w != 0
    hid = None if hidden is None else hidden.reshape(b * t, hidden.shape[-1])
    sums = thr_pair_sums(logits, tokens.reshape(-1).clamp_min(0), rows[keep], resp_group[keep], rows[o_keep],
                         resp_group[o_keep], w[o_keep], hid, lse=lse, impl=impl, precision=precision)
    return signed_thr(sums, keep, correct)


@torch.no_grad()
def thr_advantages(
    advantages: torch.Tensor,
    thr: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    p: float = 0.0,
    tau: float | str = "nthr",
    beta: float = 1.0,
    entropy: torch.Tensor | None = None,
    entropy_top: float = 0.2,
    keep_low: bool = False,
):
    """The THR-guided advantage rule (module docstring); returns ``(adjusted [B, T], info)``.

    Args:
        advantages: ``[B, T]`` or ``[B]`` advantages (e.g. GRPO's, per response).
        thr: ``[B, T]`` from :func:`token_hidden_reward`.
        correct, group_index, mask: as in :func:`token_hidden_reward` (``mask`` default: all).
        p: the exploitation (``p > 0``) / exploration (``p < 0``) knob; ``|p| <= 1``.
        tau: ``"nthr"`` (per group: ``beta · min over the group's correct responses of the
            mean THR of the response's kept tokens``) or a number (one threshold for every
            group). A token is "high-THR" when ``|THR| > tau``; ``tau < 0`` keeps every token.
        entropy: optional ``[B, T]`` per-token entropies; the ``entropy_top`` fraction of kept
            tokens with the highest entropy (over the whole batch, ties included) that are
            not high-THR keep their advantage unchanged (THR appendix B: 20%).
        keep_low: keep the advantage of the other tokens instead of zeroing them (reweighting
            only, no dominant-token selection).

    Groups without a correct response have no THR; their advantages are returned unchanged.
    ``info``: ``tau`` (``[B]``, per response, NaN where unchanged), ``high_thr``,
    ``high_entropy``, ``active`` (bool ``[B, T]``), ``kept_frac`` (fraction of the kept tokens
    of active groups whose advantage is not zeroed; NaN when no group is active).
    """
    b, t = thr.shape
    dev = thr.device
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"p: expected a number in [-1, 1], got {p}")
    if not 0.0 <= entropy_top <= 1.0:
        raise ValueError(f"entropy_top: expected a fraction in [0, 1], got {entropy_top}")
    if advantages.dim() == 1:
        if advantages.shape != (b,):
            raise ValueError(f"advantages: expected [B] = ({b},) or [B, T], got {tuple(advantages.shape)}")
        advantages = advantages[:, None].expand(b, t)
    elif advantages.shape != (b, t):
        raise ValueError(f"advantages: expected ({b}, {t}) or ({b},), got {tuple(advantages.shape)}")
    if correct.shape != (b,):
        raise ValueError(f"correct: expected shape ({b},), got {tuple(correct.shape)}")
    correct = correct.to(dev).bool()
    group_index = torch.zeros(b, dtype=torch.long, device=dev) if group_index is None else group_index.to(dev).long()
    keep = torch.ones(b, t, dtype=torch.bool, device=dev) if mask is None else (mask.to(dev) != 0)
    if entropy is not None and entropy.shape != (b, t):
        raise ValueError(f"entropy: expected shape ({b}, {t}), got {tuple(entropy.shape)}")

    groups, gid = torch.unique(group_index, return_inverse=True)
    n_groups = groups.numel()
    has_correct = torch.zeros(n_groups, dtype=torch.long, device=dev).scatter_reduce(0, gid, correct.long(), "amax") > 0
    thr32 = thr.to(torch.float64 if thr.dtype == torch.float64 else torch.float32)
    if isinstance(tau, str):
        if tau != "nthr":
            raise ValueError(f"tau: expected 'nthr' or a number, got {tau!r}")
        n_tok = keep.sum(1)
        resp_mean = torch.where(keep, thr32, 0.0).sum(1) / n_tok.clamp_min(1)
        cand = torch.where(correct & (n_tok > 0), resp_mean, torch.full_like(resp_mean, math.inf))
        g_min = torch.full((n_groups,), math.inf, dtype=thr32.dtype, device=dev).scatter_reduce(0, gid, cand, "amin")
        tau_g = beta * g_min
        has_correct = has_correct & torch.isfinite(g_min)
    else:
        tau_g = torch.full((n_groups,), float(tau), dtype=thr32.dtype, device=dev)
    active_resp = has_correct[gid]
    tau_resp = torch.where(active_resp, tau_g[gid], torch.full_like(tau_g[gid], math.nan))
    active = keep & active_resp[:, None]

    high = active & (thr32.abs() > tau_g[gid][:, None])
    high_ent = torch.zeros_like(high)
    if entropy is not None and entropy_top > 0:
        pool = entropy[active]
        k = math.ceil(entropy_top * pool.numel())
        if k > 0:
            cut = torch.topk(pool.float(), k).values.min()
            high_ent = active & (entropy.float() >= cut) & ~high
    mult = torch.where(high, 1.0 + torch.sign(thr32) * p, torch.where(high_ent, 1.0, 0.0 if not keep_low else 1.0))
    mult = torch.where(active, mult, 1.0)
    adjusted = advantages * mult.to(advantages.dtype)
    n_active = active.sum()
    info = {
        "tau": tau_resp,
        "high_thr": high,
        "high_entropy": high_ent,
        "active": active,
        "kept_frac": torch.where(n_active > 0, ((mult != 0) & active).sum() / n_active.clamp_min(1), math.nan),
    }
    return adjusted, info


@torch.no_grad()
def thr_guided_advantages(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    p: float = 0.0,
    tau: float | str = "nthr",
    beta: float = 1.0,
    entropy_top: float = 0.2,
    keep_low: bool = False,
    normalize: str = "none",
    ignore_index: int = -100,
    impl: str = "auto",
    precision: str = "ieee",
):
    """One call: per-row ``lse`` and entropy (one streaming pass), :func:`token_hidden_reward`,
    then :func:`thr_advantages`. Returns ``(adjusted [B, T], info)``; ``info`` adds ``thr`` and
    ``entropy`` (``[B, T]``) to :func:`thr_advantages`' dict."""
    keep, group_index, correct = _validate(logits, tokens, correct, group_index, mask, hidden, ignore_index)
    b, t, _ = logits.shape
    backend = _backend(impl, logits)
    use = "naive" if backend is None else backend.name  # the statistics pass: the reference for "naive"
    rows = torch.arange(b * t, device=logits.device)[keep.reshape(-1)]
    lse, ent = (backend or get_backend("reference", logits)).row_lse_entropy(logits, rows)
    thr = token_hidden_reward(logits, tokens, correct, group_index, mask=keep, hidden=hidden, normalize=normalize,
                              ignore_index=ignore_index, lse=lse, impl=use, precision=precision)
    entropy = ent.view(b, t)
    adjusted, info = thr_advantages(advantages, thr, correct, group_index, mask=keep, p=p, tau=tau, beta=beta,
                                    entropy=entropy if entropy_top > 0 else None, entropy_top=entropy_top,
                                    keep_low=keep_low)
    info["thr"] = thr
    info["entropy"] = torch.where(keep, entropy, torch.zeros_like(entropy))
    return adjusted, info
