"""Tiny models of every causal-LM type of the installed transformers (no downloads), for
``tests/test_model_coverage.py``: ``tiny_model(model_type, mapping)`` builds the class the auto
mapping names from a shrunken config (SHRINK's keys, then TYPE_OVERRIDES), or raises ``Unbuildable``
with the reason."""

import contextlib
import importlib
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

_GEMMA3N_TEXT = dict(
    # the last num_kv_shared_layers layers reuse the KV of an earlier layer of their type: each
    # type (sliding / full) must have a producer among the first layers
    num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
    intermediate_size=64, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],  # one layer with the top-k sparsity
    vocab_size_per_layer_input=V, hidden_size_per_layer_input=8, laurel_rank=8, sliding_window=4,
)
_GEMMA4_TEXT = dict(
    # head_dim is per layer (not read by the generic shrinking); global_head_dim is the full-attention
    # layers' head dim; the per-layer-input (PLE) table is vocab_size_per_layer_input x layers x width
    # (262144 x 2 x 256 gave the 135M parameters)
    head_dim=8, global_head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    vocab_size_per_layer_input=V, hidden_size_per_layer_input=8,
)
#: per-type overrides, deep-merged into the shrunk config (a dict value goes into that sub-config),
#: where SHRINK's generic keys leave a config inconsistent or large (the vision towers' own widths)
TYPE_OVERRIDES = {
    "qwen2_vl": {"vision_config": dict(embed_dim=32, depth=1)},
    "qwen2_5_vl": {"vision_config": dict(depth=1, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])},
    "glm4v": {"vision_config": dict(depth=1, out_hidden_size=32)},
    "glm4v_moe": {"vision_config": dict(depth=1, out_hidden_size=32)},
    "glm46v": {"vision_config": dict(depth=1, out_hidden_size=32)},
    "glmga": {"vision_config": dict(depth=1, out_hidden_size=32)},
    "llama4": {
        "vision_config": dict(num_hidden_layers=1, intermediate_size=64, vision_output_dim=32, projector_input_dim=32,
                              projector_output_dim=32),
        "text_config": dict(intermediate_size_mlp=64, attention_chunk_size=4, interleave_moe_layer_step=2),
    },
    "gemma3n_text": _GEMMA3N_TEXT,
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4": {"text_config": _GEMMA4_TEXT},
    "deepseek_v4": dict(
        # the default schedule makes the first 3 MLPs hash-routed: with 2 layers no top-k router is left,
        # router_logits is empty and the unpatched aux loss fails (IndexError); one of each, and one layer
        # of each compressed attention, compressing at rates the 8-token batch reaches
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"], mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}, sliding_window=4,
        o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=8, index_topk=2,
    ),
    # multi-head latent attention expands the latent KV to every query head (2 KV heads failed)
    "mistral_large4": {"text_config": dict(num_key_value_heads=4)},
    "glm_moe_dsa": dict(num_key_value_heads=4),
    "gemma3n": {
        "text_config": _GEMMA3N_TEXT,
        "vision_config": dict(vocab_offset=V),
        "audio_config": dict(vocab_offset=V + 128, input_feat_size=16, conf_num_hidden_layers=1,
                             conf_num_attention_heads=4, sscp_conv_channel_size=[8, 8]),
    },
}


def _merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fit_mrope(config):
    """The multimodal rotary embedding splits the rotary half-dim into (t, h, w) sections: scale
    the default sections to the tiny head dim (a text batch gives the three the same positions)."""
    for sub in [config] + [getattr(config, k, None) for k in (getattr(config, "sub_configs", None) or {})]:
        if sub is None or "mrope_section" not in (getattr(type(sub), "ignore_keys_at_rope_validation", None) or ()):
            continue
        rope = getattr(sub, "rope_parameters", None)
        if not isinstance(rope, dict) or "rope_type" not in rope:
            continue
        head_dim = getattr(sub, "head_dim", None) or sub.hidden_size // sub.num_attention_heads
        half = int(head_dim * rope.get("partial_rotary_factor", getattr(sub, "partial_rotary_factor", None) or 1.0)) // 2
        section = rope.get("mrope_section")
        if section is None or sum(section) != half:
            rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]


class _StandIn(torch.nn.Module):
    """A parameterless tower in place of one whose backend (timm) is not installed; a text batch
    never calls it."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, *args, **kwargs):
        raise RuntimeError("a stand-in tower: the model is tested on text only")


@contextlib.contextmanager
def _stand_ins(class_name):
    """While building ``class_name``: ``AutoModel.from_config`` of its modeling module gives a
    ``_StandIn`` for a sub-config whose model needs an optional backend that is not installed."""
    module = importlib.import_module(getattr(transformers, class_name).__module__)
    auto = getattr(module, "AutoModel", None)
    made = []  # the model types stood in
    if auto is None:
        yield made
        return

    class _Auto:
        @staticmethod
        def from_config(config, **kwargs):
            try:
                return auto.from_config(config, **kwargs)
            except ImportError as exc:
                backend = re.search(r"requires the (\S+) library", str(exc))
                made.append(f"{getattr(config, 'model_type', type(config).__name__)} tower stood in, "
                            f"{backend.group(1) if backend else 'its backend'} not being installed")
                return _StandIn(config)

        def __getattr__(self, name):
            return getattr(auto, name)

    module.AutoModel = _Auto()
    try:
        yield made
    finally:
        module.AutoModel = auto


class Unbuildable(Exception):
    pass


def mappings():
    """``{model_type: (class name, kind)}``: every causal LM, then the image-text-to-text
    ``*ForConditionalGeneration`` / ``*ForCausalLM`` classes not already there, or in place of a
    causal LM that is the text model of a type tested on its own (``llama4`` is tested as
    ``Llama4ForConditionalGeneration``, its ``Llama4ForCausalLM`` as ``llama4_text``)."""
    out = {}
    for mt, name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        out[mt] = (name if isinstance(name, str) else name[0], "causal-lm")
    for mt, name in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        name = name if isinstance(name, str) else name[0]
        if (mt not in out or _text_model_of_a_tested_type(mt, out[mt][0], out)) and (
                name.endswith("ForConditionalGeneration") or name.endswith("ForCausalLM")):
            out[mt] = (name, "image-text-to-text")
    return out


def _text_model_of_a_tested_type(model_type, class_name, tested):
    """Whether the causal-LM class of a multimodal type takes only its text sub-config (then
    ``AutoModelForCausalLM`` builds it from ``config.text_config``) and that text config's type is
    tested on its own."""
    try:
        cls = getattr(transformers, class_name)
    except Exception:  # noqa: BLE001
        return False
    text = (getattr(configuration_auto.CONFIG_MAPPING[model_type], "sub_configs", None) or {}).get("text_config")
    return text is not None and getattr(cls, "config_class", None) is text and text.model_type in tested


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
    kw = _merge(_shrunk(config_cls), TYPE_OVERRIDES.get(model_type, {}))
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
        _fit_mrope(config)
        torch.manual_seed(0)
        made = []
        try:
            with _stand_ins(class_name) as made:
                model = cls(config)
        except _Timeout:
            raise Unbuildable(f"building {class_name} from the tiny config takes over {seconds} s") from None
        except Exception as exc:  # noqa: BLE001
            note = f" (its {', '.join(made)})" if made else ""
            raise Unbuildable(f"{class_name}(tiny config){note} fails: {type(exc).__name__}: {str(exc)[:160]}") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    n = sum(p.numel() for p in model.parameters())
    if n > 20_000_000:
        raise Unbuildable(f"the tiny config still gives {n / 1e6:.0f}M parameters")
    return model.float().eval()
