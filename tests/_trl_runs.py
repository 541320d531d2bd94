"""Running a TRL trainer three ways for ``tests/test_integration_trl.py`` and
``tests/test_trl_trainers.py``: TRL's own class (float32, TRL's fused head), our drop-in
(float32, our head), and the truth: TRL's class on the model in float64 whose fused head is the
definition (:func:`definition_head`: the model's own logits, ``log_softmax`` and TRL's field
definitions; no kernel of ours or TRL's), installed where TRL installs its head.

The error model (:func:`assert_logs_close`): every logged metric of our float32 run is within
``K * max(err_TRL, floor)`` of the float64 truth, ``err_TRL`` the float32 TRL run's own error
and ``floor`` four float32 ulps of ``max(|truth|, 1)`` (a metric made of O(1) per-token numbers,
log-probabilities or losses, such as a small KL, errs by their round-off, not by its own; and
TRL's error can be small by chance): our drop-in is as exact as TRL's float32 trainer on each
number it logs, up to the factor K (both runs accumulate float32 round-off along the same steps;
K = 4 leaves room for the two rounding differently).
"""

import contextlib
import math
import types

import torch
import transformers
import trl

from ranktuner_kernels.integrations.trl.trainers import heads_substituted

V = 96
CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
K = 4
EPS32 = 2.0 ** -24
#: logged keys that measure time, not the computation
TIMING = ("step_time", "runtime", "per_second")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def word_tokenizer():
    """Words ``w0`` .. ``w95`` are the token ids (``w0`` pads, ``w2`` ends)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(V)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2")


def words(ids) -> str:
    return " ".join(f"w{int(t)}" for t in ids)


def definition_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """A fused head by the definitions, on the model's own logits (for the float64 truth)."""
    original = model.forward
    text_config = model.config.get_text_config()

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(*args, **kw, **extra)
        kw["use_cache"] = False
        out = original(*args, **kw)
        z = out.logits if shift_labels is not None else out.logits[:, :-1]
        y = shift_labels if shift_labels is not None else labels[:, 1:]
        z = z / temperature
        keep = y != -100
        logp = z.log_softmax(-1)
        zero = torch.zeros((), dtype=z.dtype)
        fields = {"log_probs": logp.gather(-1, y.clamp(min=0)[..., None])[..., 0],
                  "entropy": -(logp.exp() * logp).sum(-1), "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
                  "mean_logits": z.mean(-1)}
        fields = {k: torch.where(keep, v, zero) for k, v in fields.items()}
        fields["is_top1"] = (z.argmax(-1) == y) & keep
        loss = -fields["log_probs"].sum() / (keep.sum().clamp(min=1) if num_items_in_batch is None
                                             else num_items_in_batch)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux
        fields = {k: (v if k in outputs or k == "log_probs" else None) for k, v in fields.items()}
        return trl.trainer.utils.FusedCausalLMOutput(loss=loss, **fields, label_mask=keep, aux_loss=aux)

    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def trl_kernel_forbidden():
    """TRL's chunked log-prob kernel raises if it runs inside the block."""
    fn = trl.trainer.utils._ChunkedLogProbFunction

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's _ChunkedLogProbFunction ran inside a drop-in trainer")

    assert "apply" not in fn.__dict__  # inherited from torch.autograd.Function
    fn.apply = refuse
    try:
        yield
    finally:
        del fn.apply


def truth_trainer(trl_cls, *args, **kwargs):
    """``trl_cls(*args, **kwargs)`` with :func:`definition_head` where TRL installs its head."""
    with heads_substituted(trl_cls, definition_head):
        return trl_cls(*args, **kwargs)


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def _numbers(log):
    return {k: v for k, v in log.items() if isinstance(v, (int, float)) and not any(t in k for t in TIMING)}


def assert_logs_close(trl_logs, ours, truth, what):
    """Every numeric metric of each log: the same keys in the three runs, and ours within
    ``K * max(err_TRL, floor)`` of the truth (see the module docstring)."""
    assert len(trl_logs) == len(ours) == len(truth) > 0, (len(trl_logs), len(ours), len(truth))
    for i, (t, o, w) in enumerate(zip(trl_logs, ours, truth)):
        t, o, w = _numbers(t), _numbers(o), _numbers(w)
        assert t.keys() == o.keys() == w.keys(), (what, sorted(t.keys() ^ o.keys()), sorted(t.keys() ^ w.keys()))
        for key in w:
            if not math.isfinite(w[key]):
                assert not math.isfinite(o[key]), (what, i, key, o[key], w[key])
                continue
            err_trl, err_ours = abs(t[key] - w[key]), abs(o[key] - w[key])
            floor = 4 * EPS32 * max(abs(w[key]), 1.0)
            assert err_ours <= K * max(err_trl, floor), (
                f"{what} log {i} {key}: ours {o[key]!r}, TRL {t[key]!r}, float64 truth {w[key]!r}")
