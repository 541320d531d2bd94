"""rk.analysis.prior_strength and its command line: the statistics equal a float64 computation
from the full logits (tiny transformers models with and without logit transforms, the toy
TinyLM), at realistic magnitudes (logits of 20-40, near-certain and unlikely targets)."""

import copy
import json
import os

import pytest
import torch

import ranktuner_kernels as rk
from ranktuner_kernels.analysis import prior

from helpers import load_example

pytest.importorskip("transformers")
from _tiny_models import tiny_model  # noqa: E402

#: the families whose logits the config transforms: none, Gemma's soft-cap, Cohere's logit_scale,
#: Granite's logits_scaling (tests/_tiny_models.py sets them away from the identity)
FAMILIES = [("llama", "LlamaForCausalLM"), ("gemma2", "Gemma2ForCausalLM"), ("cohere", "CohereForCausalLM"),
            ("granite", "GraniteForCausalLM")]
F32_FLOOR = 2.0 ** -23  # float32's unit roundoff: the smallest error a float32 mean of p_t can be asked for


def _realistic(model, seed=0):
    """``model`` with its head scaled so the logits reach tens (Gemma's soft-cap raised from
    the tiny config's 3 to 30), and a batch whose response tokens are mostly the model's own
    greedy choice (p_t near 1) with some random tokens (p_t near 0); prompts ``-100``, one row
    shorter (padding, attention mask 0)."""
    scale = 40.0
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping, scale = 30.0, 25.0  # below the cap's saturation
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(scale / float((head @ torch.randn(head.shape[1], 16)).abs().max()))
    g = torch.Generator().manual_seed(seed)
    v = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, v, (3, 4), generator=g)
    with torch.no_grad():
        for _ in range(8):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            flip = torch.rand(3, generator=g) < 0.3
            nxt = torch.where(flip, torch.randint(3, v, (3,), generator=g), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    labels[2, 10:], mask[2, 10:] = -100, 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _full_logits_stats(logits, labels):
    """Float64 per-token ``p_t``, entropy and top-1 from the full logits (the oracle)."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    t = labels[:, 1:]
    keep = t != -100
    p = lp.gather(-1, t.clamp_min(0)[..., None])[..., 0].exp()[keep]
    ent = -(lp.exp() * lp).sum(-1)[keep]
    top1 = (lp.argmax(-1) == t)[keep]
    return p, ent, top1


@pytest.mark.parametrize("family,cls", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_mean_p_equals_float64_full_logits(family, cls):
    model = tiny_model(family, cls)
    batch = _realistic(model)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits64 = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits32 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p, ent, top1 = _full_logits_stats(logits64, batch["labels"])
    assert float(p.max()) > 0.95 and float(p.min()) < 1e-3  # near-certain and unlikely targets

    res64 = rk.analysis.prior_strength(model64, [batch])
    assert res64.n_tokens == p.numel() and res64.n_sequences == 3
    assert res64.mean_p == pytest.approx(float(p.mean()), rel=1e-12, abs=1e-15)
    assert res64.mean_entropy == pytest.approx(float(ent.mean()), rel=1e-10, abs=1e-12)
    assert res64.top1 == float(top1.double().mean())
    assert res64.low_share == float((p < 0.2).double().mean())
    assert res64.hist_counts == torch.histc(p, bins=20, min=0, max=1).long().tolist()

    # float32: no further from float64 than the naive float32 computation from the full logits,
    # up to a factor 4 (both share the float32 decoder; float32's unit roundoff as the floor)
    res32 = rk.analysis.prior_strength(model, [batch])
    naive = float(_full_logits_stats(logits32.float(), batch["labels"])[0].float().mean())
    err_naive = max(abs(naive - float(p.mean())), F32_FLOOR)
    assert abs(res32.mean_p - float(p.mean())) <= 4 * err_naive


def test_the_logits_are_never_materialised():
    model = tiny_model("llama", "LlamaForCausalLM")
    batch = _realistic(model)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(tuple(out.shape)))
    try:
        rk.analysis.prior_strength(model, [batch])
    finally:
        hook.remove()
    assert rows and all(r[1] == 1 for r in rows)  # the model's own head ran on the last position only


def test_a_transform_that_is_not_the_models_is_refused():
    model = tiny_model("gemma2", "Gemma2ForCausalLM")
    batch = _realistic(model)
    with pytest.raises(ValueError, match="logit transforms"):
        rk.analysis.prior_strength(model, [batch], softcap=None, temperature=1.0)
    assert rk.analysis.prior_strength(model, [batch], softcap=30.0).n_tokens > 0  # the model's own (_realistic)


def test_toy_tinylm_callable_and_head():
    tl = load_example("tiny_lm")
    tok = tl.CharTokenizer()
    torch.manual_seed(0)
    model = tl.TinyLM(tl.TinyLMConfig(tok.vocab_size, d_model=32, n_layer=1, n_head=2, d_ff=64, max_len=32)).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)  # logits of tens
    ids = torch.tensor([[tok.bos_id] + tok.encode("12+3=?\n12+3=15. A: 15")])
    labels = ids.clone()
    labels[:, :8] = -100
    before = labels.clone()
    res = rk.analysis.prior_strength(model.hidden, [{"input_ids": ids, "labels": labels}], head=model.lm_head)
    with torch.no_grad():
        p = _full_logits_stats(model(ids), labels)[0]
    assert res.mean_p == pytest.approx(float(p.mean()), rel=1e-12)
    assert torch.equal(labels, before)  # the caller's tensors are left as they were
    same = rk.analysis.prior_strength(model.hidden, [{"input_ids": ids, "labels": labels}], head=model.lm_head.weight)
    assert same.mean_p == res.mean_p
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    assert torch.isnan(torch.tensor(rk.analysis.prior_strength(model.hidden, [{"input_ids": ids, "labels": labels}],
                                                                head=model.lm_head).mean_p))


def test_bad_input_names_the_argument():
    head = torch.nn.Linear(4, 5, bias=False)
    hidden = lambda ids: torch.zeros(*ids.shape, 4)  # noqa: E731
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"batches\[0\]"):
        rk.analysis.prior_strength(hidden, [{"input_ids": ids}], head=head)
    with pytest.raises(ValueError, match=r"batches\[0\]"):
        rk.analysis.prior_strength(hidden, [{"input_ids": ids, "labels": ids[:, :2]}], head=head)
    with pytest.raises(ValueError, match="no scored token"):
        rk.analysis.prior_strength(hidden, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], head=head)
    with pytest.raises(TypeError, match="model"):
        rk.analysis.prior_strength(object(), [])
    with pytest.raises(TypeError, match="head"):
        rk.analysis.prior_strength(hidden, [], head="lm_head")
    with pytest.raises(ValueError, match="bins"):
        rk.analysis.prior_strength(hidden, [], head=head, bins=0)
    with pytest.raises(ValueError, match="mean_p"):
        prior.region_of(1.5)


def test_regions_at_the_papers_reference_points():
    assert prior.REGION_BOUNDS == pytest.approx((0.285, 0.675))
    for value, _, _, region in prior.REFERENCE_POINTS:
        assert prior.region_of(value) == region
    assert [prior.region_of(v) for v in (0.0, 0.2849, 0.285, 0.6749, 0.675, 1.0)] == [
        "model-weak", "model-weak", "intermediate", "intermediate", "model-strong", "model-strong"]
    res = prior.PriorStrength(mean_p=0.57, mean_entropy=1.0, top1=0.5, low_share=0.3, n_tokens=10, n_sequences=2,
                              hist_edges=[0, 0.5, 1], hist_counts=[4, 6])
    assert res.nearest_reference()[:2] == (0.56, "Qwen2.5-1.5B")
    assert "intermediate" in res.summary() and res.to_dict()["region"] == "intermediate"


def test_cli_on_a_saved_tiny_model_and_jsonl(tmp_path, capsys):
    hf = load_example("finetune_hf")
    folder = hf.make_tiny_model(str(tmp_path / "model"))
    data = tmp_path / "train.jsonl"
    pairs = [("1+2=?\n", "1+2=3. A: 3"), ("7-4=?\n", "7-4=3. A: 3"), ("5+5=?\n", "5+5=10. A: 10")]
    data.write_text("".join(json.dumps({"q": p, "a": r}) + "\n" for p, r in pairs))
    png, out_json = tmp_path / "out" / "prior.png", tmp_path / "prior.json"
    os.makedirs(png.parent)
    rc = prior.main(["--model", folder, "--data", str(data), "--prompt-key", "q", "--response-key", "a",
                     "--batch-size", "2", "--max-examples", "3", "--png", str(png), "--json", str(out_json), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean target probability" in text and "region: model-weak" in text  # a random model
    saved = json.loads(out_json.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).double(), AutoTokenizer.from_pretrained(folder)
    ps = []
    for batch in prior.tokenized_batches(tok, pairs, 2, 2048):
        with torch.no_grad():
            ps.append(_full_logits_stats(model(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits, batch["labels"])[0])
    p = torch.cat(ps)
    n_response = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for _, r in pairs)  # and <eos>
    assert saved["n_tokens"] == p.numel() == n_response and saved["n_sequences"] == 3
    assert saved["mean_p"] == pytest.approx(float(p.mean()), rel=1e-5)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.stat().st_size > 10000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    assert prior.main(["--model", folder, "--data", str(bad), "--quiet"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
