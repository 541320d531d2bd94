"""Every causal LM of the installed transformers: patched (``weighting="sft"``) equals unpatched,
loss and every parameter gradient, in float32; or ``patch_model`` refuses it by name.

The model types are enumerated from transformers' auto mappings (causal LMs, then the
image-text-to-text ``*ForConditionalGeneration`` classes, run on text), each built from a
shrunken config (``tests/_tiny_models.py``, no downloads). A model that cannot be built that way
is skipped with the reason. ``python tests/test_model_coverage.py`` prints the three lists
(exact / refused with the reason / unbuildable) for the docs; ``test_docs_lists_partition_the_model_types``
checks that the docs' lists name every type once, with the README's counts;
``test_liger_kernel_families_are_exact_or_refused`` that every model type Liger-Kernel 0.8.2 patches
(``LIGER_0_8_2``) with a class here is exact or refused, as the docs' table of Liger's families says.
"""

import functools
import os
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_models import Unbuildable, mappings, tiny_model  # noqa: E402

from error_model import assert_no_less_accurate  # noqa: E402
from helpers import float64_copy  # noqa: E402
from ranktuner_kernels.integrations import transformers as rkt  # noqa: E402

MODELS = mappings()
#: families whose forward transforms the logits or adds a router loss: these must be exact
MUST_BE_EXACT = ("granite", "granitemoe", "cohere", "cohere2", "gemma2", "falcon_h1", "hyperclovax", "minicpm3",
                 "recurrent_gemma", "mixtral", "qwen2_moe", "gpt_neox", "gpt2", "opt", "llava", "gemma3n", "gemma3n_text",
                 "deepseek_v4", "gemma4", "gemma4_text", "mistral_large4")
#: families whose tiny config needs per-type overrides (``_tiny_models.TYPE_OVERRIDES``, the mrope sections,
#: a stand-in for gemma3n's timm vision tower): exact or refused by name, never untested
MUST_BE_TESTED = ("qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v_moe", "gemma3n", "gemma3n_text", "llama4",
                  "deepseek_v4", "gemma4_text", "gemma4")
#: the model types Liger-Kernel patches: the keys of MODEL_TYPE_TO_APPLY_LIGER_FN in Liger-Kernel 0.8.2,
#: src/liger_kernel/transformers/monkey_patch.py (commit ead96b6). Each of them that has a causal-LM or
#: image-text-to-text class here (is in MODELS) must be exact or refused by name, never untested; the
#: others (text configs of a multimodal type, a vision tower) have no LM head class to patch.
LIGER_0_8_2 = (
    "deepseek_v4", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "glm4", "glm4v", "glm4v_moe",
    "gpt_oss", "internvl", "llama", "llama4_text", "llama4", "llava", "granite", "mllama", "mllama_text_model",
    "ministral", "mistral", "mixtral", "nemotron", "olmo2", "pixtral", "olmo3", "qwen2", "qwen3", "qwen3_moe",
    "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text", "qwen3_next", "qwen3_5", "qwen3_5_text",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text", "smollm3",
    "phi3", "paligemma", "falcon_h1", "smolvlm", "hunyuan_v1_dense", "hunyuan_v1_moe", "exaone4",
)


def _special_ids(config, seen=None):
    """Every ``*_token_id`` / ``*_token_index`` of the config and its sub-configs."""
    out = set()
    for key, value in config.to_dict().items() if hasattr(config, "to_dict") else ():
        if isinstance(value, int) and (key.endswith("_token_id") or key.endswith("_token_index")):
            out.add(value)
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out |= _special_ids(sub)
    return out


def _batch(model, seed=0, b=2, t=8, ignore_index=-100):
    config = model.config
    vocab = model.get_output_embeddings().weight.shape[0]
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(3, vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (b, t), generator=g)]
    labels = ids.clone()
    labels[0, :3] = ignore_index
    labels[1, -2:] = ignore_index
    return ids, labels


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def check(model_type):
    """``("exact", None)``, ``("refused", reason)`` or ``("unbuildable", reason)``; raises
    AssertionError when a patched model differs from the unpatched one."""
    class_name, _ = MODELS[model_type]
    try:
        model = tiny_model(model_type, class_name)
    except Unbuildable as exc:
        return "unbuildable", str(exc)
    try:
        rkt.check_model(model)
    except ValueError as exc:
        assert repr(model_type) in str(exc), str(exc)  # refused by name
        with pytest.raises(ValueError, match=repr(model_type).replace("-", r"\-")):
            rkt.patch_model(model, weighting="sft")
        return "refused", str(exc)
    ids, labels = _batch(model)
    try:
        want, want_grads = _loss_and_grads(model, ids, labels)
    except Exception as exc:  # noqa: BLE001 - the unpatched model itself does not run on text only
        return "unbuildable", f"the unpatched model fails on a text batch: {type(exc).__name__}: {str(exc)[:120]}"
    rkt.patch_model(model, weighting="sft")
    got, got_grads = _loss_and_grads(model, ids, labels)
    assert got.loss.dtype == torch.float32
    assert got_grads.keys() == want_grads.keys() and got_grads, model_type
    _compare(model_type, rkt.unpatch_model(model), ids, labels, _values(want, want_grads), _values(got, got_grads))
    assert type(got) is type(want)
    return "exact", None


def _values(out, grads) -> dict:
    """The compared values of one run: the loss, the router loss where there is one, every gradient."""
    values = {"loss": out.loss.detach()}
    if getattr(out, "aux_loss", None) is not None:
        values["aux_loss"] = out.aux_loss.detach()
    values.update({f"grad {name}": g for name, g in grads.items()})
    return values


def _compare(model_type, unpatched, ids, labels, want: dict, got: dict):
    """Every value equal to the unpatched model's: within a tight fixed tolerance, or else no less
    accurate than the unpatched model's own against its float64 copy (``tests/error_model.py``),
    which decides every failure (a deep layer of a tiny model can carry a gradient whose largest
    entry is round-off sized, or another CPU round differently); the float64 run is made only
    for a model that needs it."""
    assert got.keys() == want.keys(), model_type
    off = [key for key in want if not torch.allclose(got[key], want[key], rtol=1e-4 if key.startswith("grad") else 1e-5,
                                                     atol=1e-5 * float(want[key].abs().max()) + 1e-9)]
    if not off:
        return
    out, grads = _loss_and_grads(float64_copy(unpatched), ids, labels)
    truth = _values(out, grads)
    for key in off:
        assert_no_less_accurate(got[key], want[key], truth[key], what=f"{model_type} {key}")


@functools.lru_cache(maxsize=None)
def verdict_of(model_type):
    """``check(model_type)``, once per session (the Liger-Kernel test reads the same results)."""
    torch.manual_seed(0)
    return check(model_type)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_patched_equals_unpatched_or_refused_by_name(model_type):
    verdict, reason = verdict_of(model_type)
    if model_type in MUST_BE_EXACT:
        assert verdict == "exact", f"{model_type}: {verdict}: {reason}"
    if model_type in MUST_BE_TESTED or model_type in LIGER_0_8_2:
        assert verdict != "unbuildable", f"{model_type}: {reason}"
    if verdict == "unbuildable":
        pytest.skip(f"{model_type}: {reason}")


def test_gemma4_logits_to_keep_with_kv_shared_layers(monkeypatch):
    """Gemma 4 slices the hidden states itself only if its decoder has not (the decoder slices
    early, for an int logits_to_keep, when KV-shared layers follow): with full-length labels the
    patched loss equals the unpatched model's on the labels of the kept positions."""
    import _tiny_models

    over = {**_tiny_models.TYPE_OVERRIDES["gemma4_text"], "num_hidden_layers": 4, "num_kv_shared_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"] * 2}
    monkeypatch.setitem(_tiny_models.TYPE_OVERRIDES, "gemma4_text", over)
    torch.manual_seed(0)
    model = tiny_model("gemma4_text", MODELS["gemma4_text"][0])
    assert model.config.num_kv_shared_layers == 2
    ids, labels = _batch(model)
    rows = []
    model.model.register_forward_hook(lambda module, args, out: rows.append(out.last_hidden_state.shape[1]))
    # shift_labels: the kept last position has a target of its own (the shift would leave it none)
    shift = torch.cat([labels[:, 1:], torch.randint(3, 9, (labels.shape[0], 1))], dim=1)
    for keep in (1, 2, 0):
        kept = slice(-keep, None) if keep else slice(None)
        want = model(input_ids=ids, labels=labels[:, kept], shift_labels=shift[:, kept].contiguous(), logits_to_keep=keep,
                     use_cache=False).loss
        rkt.patch_model(model)
        got = model(input_ids=ids, labels=labels, shift_labels=shift, logits_to_keep=keep, use_cache=False).loss
        rkt.unpatch_model(model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # unpatched, keep=1 is sliced in the decoder (sdpa keeps 2 rows whole); patched, the decoder
    # never sees logits_to_keep and the loss slices once
    assert rows == [1, 8, 8, 8, 8, 8], rows


@pytest.mark.slow
def test_liger_kernel_families_are_exact_or_refused():
    """Every model type Liger-Kernel 0.8.2 patches that has a causal-LM or image-text-to-text class
    in the installed transformers is exact or refused by name (never untested), as the docs' table
    of Liger's families says."""
    ours = [mt for mt in LIGER_0_8_2 if mt in MODELS]
    assert ours, "none of Liger-Kernel's model types is a causal LM here"
    measured = {mt: verdict_of(mt) for mt in ours}
    untested = {mt: reason for mt, (verdict, reason) in measured.items() if verdict not in ("exact", "refused")}
    assert not untested, untested
    lists, text = _docs_lists()
    if transformers.__version__ == _audited(text):
        table = _docs_liger_table(text)
        assert {mt: table[mt] for mt in ours} == {mt: v for mt, (v, _) in measured.items()}


def test_ignore_index_through_the_causal_shift():
    """A non-default ignore_index (-1) is what the shift pads with: padding with -100 would
    make the last position a target of id -100 (out of range) and the loss differ."""
    model = tiny_model("llama", MODELS["llama"][0])
    ids, labels = _batch(model, ignore_index=-1)
    logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-1)
    compute = rkt.make_compute_loss_func("sft", ignore_index=-1, impl="reference")
    torch.testing.assert_close(compute({"logits": logits}, labels), want)
    rkt.patch_model(model, weighting="sft", ignore_index=-1, eval_logits=True)
    for mode in (model.train, model.eval):  # fused, then eval_logits
        mode()
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, rtol=1e-5, atol=1e-6)


def _docs_lists():
    """``{"exact" | "refused" | "unbuildable": [model types]}`` from docs/integrations.md."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "integrations.md"), encoding="utf-8") as f:
        text = f.read()
    out = {}
    for key, head in (("exact", "Exact"), ("refused", "Refused by name"), ("unbuildable", "Not tested")):
        m = re.search(rf"^\*\*{head} \((\d+)\)\*\*(.*?)(?=\n\n(?!\* )|\Z)", text, re.M | re.S)
        assert m is not None, head
        body = m.group(2)
        names = re.findall(r"`([^`]+)`", body.split(":", 1)[1]) if key == "exact" else re.findall(r"^\* `([^`]+)`", body, re.M)
        assert len(names) == int(m.group(1)), (head, len(names), m.group(1))
        out[key] = names
    return out, text


def _audited(text):
    return re.search(r"\*\*Audited with transformers ([\w.]+)\*\*", text).group(1)


def _docs_liger_table(text):
    """``{model type: "exact" | "refused" | "no LM head class"}`` from the docs' table of Liger-Kernel's families."""
    m = re.search(r"^\*\*Liger-Kernel's families\*\*.*?\n\n(\|.*?)(?=\n\n|\Z)", text, re.M | re.S)
    assert m is not None, "no table under **Liger-Kernel's families**"
    out = {}
    for row in m.group(1).splitlines()[2:]:  # after the header and the |---| line
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        status = re.match(r"\*?\*?(exact|refused|no LM head class)", cells[1])
        assert status is not None, row
        for name in re.findall(r"`([^`]+)`", cells[0]):
            assert name not in out, name
            out[name] = status.group(1)
    return out


def test_docs_liger_table_matches_the_lists():
    """The docs' table of Liger-Kernel's families names each of LIGER_0_8_2 once, with the status
    the docs' measured lists give it ("no LM head class" for a type that is not enumerated here)."""
    lists, text = _docs_lists()
    if transformers.__version__ != _audited(text):
        pytest.skip(f"the docs' lists are of transformers {_audited(text)}, this is {transformers.__version__}")
    table = _docs_liger_table(text)
    assert sorted(table) == sorted(LIGER_0_8_2)
    status = {mt: verdict for verdict, names in lists.items() for mt in names}
    want = {mt: status[mt] if mt in MODELS else "no LM head class" for mt in LIGER_0_8_2}
    assert table == want  # an untested Liger type has no row status to match
    # the README's summary of the table
    counts = {v: sum(1 for x in table.values() if x == v) for v in ("exact", "refused")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert (f"Liger-Kernel 0.8.2 patches that has an LM head class here is tested exact ({counts['exact']}) "
            f"or refused by name ({counts['refused']}" in readme), counts


def test_docs_lists_partition_the_model_types():
    """The docs' three lists (exact / refused / not tested) name every enumerated model type
    once, with the counts the README states; the families that must be tested are not in the
    untested list. (Which list each type is in is measured by ``python tests/test_model_coverage.py``;
    skipped under another transformers version than the audited one.)"""
    lists, text = _docs_lists()
    audited = _audited(text)
    if transformers.__version__ != audited:
        pytest.skip(f"the docs' lists are of transformers {audited}, this is {transformers.__version__}")
    names = [n for v in lists.values() for n in v]
    assert sorted(names) == sorted(MODELS)
    assert not set(MUST_BE_TESTED) & set(lists["unbuildable"])
    assert set(MUST_BE_EXACT) <= set(lists["exact"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert (f"of the {len(MODELS)} causal-LM and image-text-to-text model types" in readme
            and f"**{len(lists['exact'])} are tested exact**" in readme
            and f"**{len(lists['refused'])} are refused by name**" in readme
            and f"and {len(lists['unbuildable'])} could not be built" in readme)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    lists = {"exact": [], "refused": [], "unbuildable": [], "DIFFERENT": []}
    for mt in sorted(MODELS):
        try:
            verdict, reason = check(mt)
        except AssertionError as exc:
            verdict, reason = "DIFFERENT", str(exc).splitlines()[0][:200]
        lists[verdict].append((mt, reason))
        print(verdict, mt, (reason or "")[:300], flush=True)
    for k, v in lists.items():
        print(f"\n{k} ({len(v)}): " + ", ".join(mt for mt, _ in v))
