"""Tiny models of every causal-LM type of the installed transformers (no downloads), for
``tests/test_model_coverage.py``: ``tiny_model(model_type, mapping)`` builds the class the auto
mapping names from a shrunken config, or raises ``Unbuildable`` with the reason."""

import re
import signal

import torch

import transformers
from transformers.models.auto import configuration_auto, modeling_auto

V = 128
SHRINK = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, rotary_dim=8, num_layers=2, n_layer=2, n_embd=32, n_head=2, n_positions=64,
    max_position_embeddings=64, d_model=32, num_heads=2, ffn_dim=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_dropout=0.0,
    attention_dropout=0.0, n_group=1, topk_group=1, image_size=32, patch_size=8, num_channels=3,
    projection_dim=32, output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=False,
    # the logit transforms, away from the identity so that ignoring one fails the comparison
    logits_scaling=2.5, logit_scale=0.3, final_logit_softcapping=3.0, logits_soft_cap=3.0, lm_head_multiplier=0.7,
)


class Unbuildable(Exception):
    pass


def mappings():
    """``{model_type: (class name, kind)}``: every causal LM, then the image-text-to-text
    ``*ForConditionalGeneration`` / ``*ForCausalLM`` classes not already there."""
    out = {}
    for mt, name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        out[mt] = (name if isinstance(name, str) else name[0], "causal-lm")
    for mt, name in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        name = name if isinstance(name, str) else name[0]
        if mt not in out and (name.endswith("ForConditionalGeneration") or name.endswith("ForCausalLM")):
            out[mt] = (name, "image-text-to-text")
    return out


def _shrunk(config_cls, depth=0):
    """Overrides for ``config_cls``: SHRINK's keys it has, and shrunk sub-configs as dicts."""
    try:
        default = config_cls()
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        raise Unbuildable(f"{config_cls.__name__}() fails: {type(exc).__name__}: {str(exc)[:120]}") from None
    kw = {k: v for k, v in SHRINK.items() if _has(default, k)}
    for key in (getattr(config_cls, "sub_configs", None) or {}):
        sub = getattr(default, key, None)
        if depth < 2 and sub is not None and hasattr(sub, "to_dict"):
            kw[key] = {**_shrunk(type(sub), depth + 1), "model_type": sub.model_type}
    return kw


def _has(config, key):
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - e.g. a per-layer attribute of a heterogeneous config
        return False


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def tiny_model(model_type, class_name, seconds=20):
    """The model, in eval mode (no dropout), float32, seeded; ``Unbuildable`` with the reason."""
    config_cls = configuration_auto.CONFIG_MAPPING[model_type]
    kw = _shrunk(config_cls)
    try:
        cls = getattr(transformers, class_name)
    except Exception as exc:  # noqa: BLE001
        raise Unbuildable(f"{class_name} cannot be imported: {type(exc).__name__}: {str(exc)[:160]}") from None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        config = None
        for drop in ((), ("head_dim", "v_head_dim"), ("head_dim", "v_head_dim", "num_key_value_heads", "num_hidden_layers",
                                                     "num_layers", "n_layer")):
            drop = set(drop)
            for _ in range(4):
                try:
                    config = config_cls(**{k: v for k, v in kw.items() if k not in drop})
                    break
                except Exception as exc:  # noqa: BLE001
                    error = f"tiny config fails: {type(exc).__name__}: {str(exc)[:160]}"
                    m = re.search(r"property '(\w+)' of", str(exc))  # a derived value: leave it to the config
                    if m is None:
                        break
                    drop.add(m.group(1))
            if config is not None:
                break
        if config is None:
            raise Unbuildable(error)
        torch.manual_seed(0)
        try:
            model = cls(config)
        except _Timeout:
            raise Unbuildable(f"building {class_name} from the tiny config takes over {seconds} s") from None
        except Exception as exc:  # noqa: BLE001
            raise Unbuildable(f"{class_name}(tiny config) fails: {type(exc).__name__}: {str(exc)[:160]}") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    n = sum(p.numel() for p in model.parameters())
    if n > 20_000_000:
        raise Unbuildable(f"the tiny config still gives {n / 1e6:.0f}M parameters")
    return model.float().eval()
