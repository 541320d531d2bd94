"""The LM head as the fused loss sees it: ``(hidden, weight, bias)`` of one linear map.

:func:`check_head` runs at ``patch_model`` time and refuses, by name, a head the fused loss
cannot reproduce; :func:`linear_operands` runs at every step and gives the operands of
``rk.linear_cross_entropy`` whose logits equal ``head(hidden)``.
"""

from __future__ import annotations

import torch


def check_head(head) -> None:
    """Raise ``TypeError`` naming the head's class if the fused loss cannot reproduce it."""
    if not isinstance(head, torch.nn.Linear) or type(head).__module__.startswith("peft"):
        raise TypeError(f"model: the output embeddings are a {type(head).__module__}.{type(head).__name__}; "
                        "the fused loss needs a plain torch.nn.Linear LM head")


def linear_operands(head, hidden: torch.Tensor):
    """``(hidden, weight, bias)`` with ``hidden @ weight.T + bias == head(hidden)``: ``hidden``
    ``[..., D']``, ``weight`` ``[V, D']``, ``bias`` ``[V]`` or None."""
    check_head(head)
    return hidden, head.weight, head.bias
