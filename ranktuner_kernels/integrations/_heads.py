"""The LM head as the fused loss sees it: ``(hidden, weight, bias)`` of one linear map.

:func:`check_head` runs at ``patch_model`` time and refuses, by name, a head the fused loss
cannot reproduce; :func:`linear_operands` runs at every step and gives the operands of
``rk.linear_cross_entropy`` whose logits equal ``head(hidden)``.

Heads served (PEFT's wrappers are recognised by class, without importing PEFT):

* a plain ``torch.nn.Linear``: ``(hidden, W, b)``;
* ``peft.utils.other.ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the module its
  forward would run, i.e. the active adapter's trainable copy, or the original head when the
  adapters are disabled;
* ``peft.tuners.lora.layer.Linear`` (LoRA on the head): PEFT computes
  ``h·Wᵀ + b + Σ_a s_a·(drop_a(h)·A_aᵀ + b_Ba)·B_aᵀ`` over the active adapters (``s_a`` =
  ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``; ``b_Ba`` only with
  ``lora_bias``). That is one linear map of the concatenated input
  ``[h | s_1·(drop_1(h)·A_1ᵀ) | ...]`` ``[..., D + Σ r_a]`` by the concatenated weight
  ``[W | B_1 | ...]`` ``[V, D + Σ r_a]`` with bias ``b + Σ s_a·b_Ba``, so autograd through the
  concatenation gives the exact gradients of ``W`` (if trainable), every ``A_a``, ``B_a`` and
  the hidden states. The dropout is PEFT's own module called on the same tensor in the same
  order, so it draws the same mask from the same RNG state (identity in eval mode). A merged
  adapter is already in ``W`` (PEFT then runs the base layer only, and so does this); with the
  adapters disabled (``with model.disable_adapter():``) the base layer alone.

Refused, naming PEFT's class: LoRA variants (DoRA, aLoRA, ...), ``fan_in_fan_out``, a merged
adapter while the adapters are disabled (PEFT's forward would unmerge the weights), mixed-adapter
batches (``adapter_names=``), any other PEFT wrapper (trainable tokens, IA3, quantized LoRA
layers, ...), and any other head module.

Cost: with LoRA on the head each step builds the ``[V, D + Σ r]`` concatenated weight (a copy
of ``W``) and, in backward, its gradient, where the unpatched model holds the ``[N, V]`` logits.
"""

from __future__ import annotations

import functools

import torch

_MODULES_TO_SAVE = "peft.utils.other.ModulesToSaveWrapper"
_LORA_LINEAR = "peft.tuners.lora.layer.Linear"


def _qualname(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_peft(module) -> bool:
    return type(module).__module__.split(".")[0] == "peft"


def _refuse(module, why: str, error=ValueError):
    raise error(f"model: the LM head is a {_qualname(module)}; {why}")


def _active(head) -> list:
    """The adapter names a PEFT layer's forward would loop over."""
    active = head.active_adapters
    return [active] if isinstance(active, str) else list(active)


def _injected_arguments(head) -> bool:
    """Whether PEFT has hooked arguments into the head's next call (``adapter_names=`` mixed
    batches, aLoRA offsets): pre-forward hooks the fused loss would bypass."""
    for hook in head._forward_pre_hooks.values():
        keywords = getattr(hook, "keywords", None) or {}
        if isinstance(hook, functools.partial) and ({"adapter_names", "alora_offsets"} & set(keywords)):
            return True
    return False


def _selected(head):
    """The module a ``ModulesToSaveWrapper``'s forward would run now."""
    active = _active(head)
    if head.disable_adapters or not active or any(a not in head._adapters for a in active):
        return head.original_module
    return head.modules_to_save[active[0]]


def _lora_adapters(head) -> list:
    """The active LoRA adapters of a ``peft.tuners.lora.layer.Linear`` that its forward adds
    (empty when disabled or merged: PEFT then runs the base layer alone). Refuses what the
    concatenation cannot reproduce."""
    if getattr(head, "fan_in_fan_out", False):
        _refuse(head, "fan_in_fan_out=True (a transposed base weight) is not supported by the fused loss")
    if head.disable_adapters:
        if head.merged:
            _refuse(head, "its adapter is merged while the adapters are disabled; PEFT's forward would unmerge "
                          "the weights (call unmerge_adapter() first)")
        return []
    if head.merged:
        return []
    adapters = [a for a in _active(head) if a in head.lora_A.keys()]
    for a in adapters:
        variant = getattr(head, "lora_variant", {}).get(a)
        if variant is None and getattr(head, "use_dora", {}).get(a, False):
            variant = "DoRA"  # older PEFT: a use_dora flag instead of a variant object
        if variant is not None:
            kind = variant if isinstance(variant, str) else type(variant).__name__
            _refuse(head, f"adapter {a!r} is a LoRA variant ({kind}: DoRA, aLoRA, ...), which "
                          "the fused loss does not reproduce; use plain LoRA on the head, or leave lm_head out of "
                          "target_modules")
    return adapters


def _base(head):
    """The module whose weight a LoRA or ModulesToSave head wraps, resolved to what runs now."""
    name = _qualname(head)
    if name == _MODULES_TO_SAVE:
        return _selected(head)
    if name == _LORA_LINEAR:
        return head.base_layer
    return None


def check_head(head) -> None:
    """Raise ``TypeError`` (an unsupported module class) or ``ValueError`` (an unsupported
    setting of a supported PEFT wrapper) naming the head's class, if the fused loss cannot
    reproduce ``head(hidden)`` as it is configured now."""
    name = _qualname(head)
    if name in (_MODULES_TO_SAVE, _LORA_LINEAR):
        if _injected_arguments(head):
            _refuse(head, "a mixed-adapter batch (adapter_names=) hooks arguments into its forward, which the "
                          "fused loss does not call; run such batches unpatched (without labels)")
        if name == _LORA_LINEAR:
            _lora_adapters(head)
        inner = _base(head)
        try:
            check_head(inner)
        except (TypeError, ValueError) as e:
            raise type(e)(f"model: the LM head is a {name} wrapping a {_qualname(inner)}, which the fused loss "
                          f"does not reproduce ({e})") from None
        return
    if _is_peft(head) or not isinstance(head, torch.nn.Linear):
        _refuse(head, "the fused loss needs a torch.nn.Linear LM head, optionally wrapped by PEFT's "
                      f"{_LORA_LINEAR} (LoRA) or {_MODULES_TO_SAVE} (modules_to_save)", TypeError)


def linear_operands(head, hidden: torch.Tensor):
    """``(hidden', weight, bias)`` with ``hidden' @ weight.T + bias == head(hidden)``:
    ``hidden`` ``[..., D]`` -> ``hidden'`` ``[..., D']``, ``weight`` ``[V, D']``, ``bias`` ``[V]``
    or None (``D' = D`` but for LoRA, see the module's docstring). Differentiable: gradients
    reach ``hidden`` and every parameter the head's own forward would use."""
    check_head(head)
    name = _qualname(head)
    if name == _MODULES_TO_SAVE:
        return linear_operands(_selected(head), hidden)
    if name != _LORA_LINEAR:
        return hidden, head.weight, head.bias
    adapters = _lora_adapters(head)
    hidden_base, weight, bias = linear_operands(head.base_layer, hidden)
    if not adapters:
        return hidden_base, weight, bias
    inputs, weights = [hidden_base], [weight]
    for a in adapters:
        lora_a, lora_b, scaling = head.lora_A[a], head.lora_B[a], head.scaling[a]
        x = head._cast_input_dtype(hidden, lora_a.weight.dtype)
        # s·A(drop(x)) on the small [.., r] side; the dropout module is PEFT's, called in PEFT's order
        inputs.append((lora_a(head.lora_dropout[a](x)) * scaling).to(hidden_base.dtype))
        weights.append(lora_b.weight.to(weight.dtype))
        if lora_b.bias is not None:
            extra = (lora_b.bias * scaling).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return torch.cat(inputs, dim=-1), torch.cat(weights, dim=1), bias
