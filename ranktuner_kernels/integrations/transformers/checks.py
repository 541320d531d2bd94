"""Argument checks and the causal shift of the transformers integration: the weighting and the
options a caller passes, ``ignore_index``, the next-token targets (``labels`` shifted as
transformers' ``ForCausalLMLoss`` shifts them, or ``shift_labels`` as given) aligned with the
positions ``logits_to_keep`` keeps, and the PEFT unwrapping every entry point starts with."""

from __future__ import annotations

import inspect
import numbers

import torch

import ranktuner_kernels as rk

# arguments of the core losses that the integration sets itself (or that make no sense here)
_RESERVED_LINEAR = {"input", "linear_weight", "target", "linear_bias", "weighting", "reduction", "ignore_index",
                    "num_items_in_batch", "return_stats", "token_weight", "sequence_weight"}
_RESERVED_LOGITS = {"input", "target", "weighting", "reduction", "ignore_index", "num_items_in_batch",
                    "return_stats", "token_weight", "sequence_weight", "size_average", "reduce"}



def _weighting_name(weighting) -> str:
    """``"ranktuner"`` for ``"ranktuner"`` or ``rk.RankTuner(...)`` (the registry's name)."""
    return rk.weightings.resolve(weighting).name


def _check_weighting(weighting) -> None:
    """Raise the core's ValueError/TypeError for an unknown weighting now, not at the first
    training step (the registry resolves the name; a config validated its options when made)."""
    if weighting is None:
        raise TypeError("weighting: expected a name such as 'ranktuner' or a config such as rk.RankTuner(), got None")
    rk.weightings.resolve(weighting)


def _check_options(options: dict, fn, reserved: set, fn_name: str) -> None:
    """Every option must be a named parameter of ``fn`` that the integration does not set."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {k for k, p in inspect.signature(fn).parameters.items() if p.kind in named}
    for key in options:
        if key in reserved:
            raise TypeError(f"{key}: set by the integration itself, it cannot be passed as an option")
        if key not in params:
            raise TypeError(f"{key}: not an option of {fn_name} (options: {', '.join(sorted(params - reserved))})")


def _check_ignore_index(ignore_index) -> int:
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index`` back to the input's length, as
    transformers' ``ForCausalLMLoss`` does: position ``t`` predicts token ``t + 1``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
    if labels.dim() < 1:
        raise ValueError("labels: expected [B, T] (or [T]) token ids, got a scalar")
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0


def _slice_to_keep(x: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` on ``[B, T, ...]``: an int keeps the last
    ``logits_to_keep`` positions (0: all), a 1-D tensor those positions, a 2-D integer tensor
    per-sample positions, a 2-D bool tensor the True positions (flattened to ``[K, ...]``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 2:
            if logits_to_keep.dtype == torch.bool:
                return x[logits_to_keep]
            idx = logits_to_keep.reshape(*logits_to_keep.shape, *([1] * (x.dim() - 2)))
            return torch.take_along_dim(x, idx, dim=1)
        if logits_to_keep.dim() != 1:
            raise ValueError(f"logits_to_keep: expected an int or a 1-D/2-D tensor, got {logits_to_keep.dim()}-D")
        return x[:, logits_to_keep]
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep: expected an int >= 0 or a tensor, got {logits_to_keep!r}")
    return x[:, -logits_to_keep:] if logits_to_keep else x


def _align_targets(shift_labels: torch.Tensor, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    """The next-token targets of the kept positions.

    ``shift_labels`` shaped like the kept positions is used as is; shaped like the whole
    sequence (``[B, T]``) while ``logits_to_keep`` keeps fewer positions, it is sliced the same
    way as the hidden states (transformers itself raises there); any other layout with as many
    elements is flattened onto the kept positions, like ``ForCausalLMLoss``'s ``view(-1)``."""
    kept_shape = tuple(kept_shape)
    if tuple(shift_labels.shape) == kept_shape:
        return shift_labels
    if not _keeps_all(logits_to_keep) and tuple(shift_labels.shape) == tuple(full_shape):
        return _slice_to_keep(shift_labels.unsqueeze(-1), logits_to_keep).squeeze(-1)
    if shift_labels.numel() == int(torch.Size(kept_shape).numel()):
        return shift_labels.reshape(kept_shape)
    raise ValueError(f"labels: shape {tuple(shift_labels.shape)} does not match the {kept_shape} positions whose "
                     f"logits are kept (sequence {tuple(full_shape)}, logits_to_keep={logits_to_keep!r})")



def _targets(labels, shift_labels, ignore_index, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    elif not isinstance(shift_labels, torch.Tensor):
        raise TypeError(f"shift_labels: expected a tensor, got {type(shift_labels).__name__}")
    return _align_targets(shift_labels, full_shape, kept_shape, logits_to_keep)


def _unwrap(model):
    """A PEFT model's inner transformers model (PEFT's forward calls the inner model's
    ``forward``, so patching that instance is enough); any other model as is."""
    get_base_model = getattr(type(model), "get_base_model", None)
    if callable(get_base_model) and not hasattr(type(model), "get_output_embeddings"):
        return model.get_base_model()
    return model

