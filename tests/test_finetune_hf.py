"""examples/finetune_hf.py on a tiny random Llama built from a config (saved with
``save_pretrained``) and a character tokenizer built offline: a few Trainer steps with the
patched (fused) loss, the NLL logging, the evaluation and the plot; LoRA through ``--lora``."""

import json
import os

import pytest

from helpers import load_example

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = load_example("finetune_hf")
    root = tmp_path_factory.mktemp("finetune_hf")
    model = hf.make_tiny_model(str(root / "model"))
    train, test = hf.make_demo_data(str(root / "data"))
    rows = [json.loads(line) for line in open(train)][:48]
    assert sum("noise" in r for r in rows) > 0
    small_train, small_test = root / "train.jsonl", root / "test.jsonl"
    small_train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small_test.write_text("".join(line for line in list(open(test))[:4]))
    return hf, model, str(small_train), str(small_test), root


def test_demo_data_and_tokenizer(setup):
    hf, model, train, test, _ = setup
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    row = hf.read_jsonl(train)[1]
    enc = hf.encode(tok, row["prompt"], row["response"], 512)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == row["prompt"] + row["response"]
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt and enc["labels"][-1] == tok.eos_token_id
    noisy = next(r for r in hf.read_jsonl(train) if "noise" in r)
    assert noisy["noise"] in noisy["response"] and noisy["response"].index(noisy["noise"]) == noisy["response"].index(".") + 2
    assert hf.noise_pattern([noisy], None).search(noisy["response"])


def test_read_jsonl_names_the_bad_line(tmp_path):
    hf = load_example("finetune_hf")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        hf.read_jsonl(str(bad))
    with pytest.raises(FileNotFoundError, match="--make-demo-data"):
        hf.read_jsonl(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_hf_runs_patched_trainer(setup, lora):
    if lora:
        pytest.importorskip("peft")
    hf, model, train, test, root = setup
    out = root / f"out_{lora}"
    names = ["sft", "ranktuner"] + ([] if lora else ["RankTuner(w0='one')"])  # a config call as an objective
    res = hf.main(["--model", model, "--data", train, "--eval-data", test, "--weighting", ",".join(names),
                   "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--logging-steps", "1", "--eval-every", "2",
                   "--max-new-tokens", "6", "--eval-batch-size", "4", "--answer-regex", r"A: (\d+)", "--out", str(out),
                   "--quiet", *(["--lora", "--lora-r", "4"] if lora else ["--report-prior"])])
    assert [r["weighting"] for r in res["rows"]] == names
    assert (res["prior"] is None) == lora and (lora or 0 < res["prior"]["mean_p"] < 1)
    for r in res["rows"]:
        logs = [h for h in r["log_history"] if "loss" in h and "nll" in h]
        assert len(logs) == 2  # the NLL next to every logged loss
        assert any("eval_nll" in h for h in r["log_history"])
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["noisy_sampled"] <= 1 and r["clean_nll"] > 0
        if r["weighting"] == "sft":  # the objective is the NLL
            assert logs[-1]["loss"] == pytest.approx(logs[-1]["nll"], rel=1e-3)
        elif r["weighting"] == "ranktuner":  # w0 = p_t on a random model: far below the NLL
            assert logs[-1]["loss"] < 0.5 * logs[-1]["nll"]
        else:  # w0 = 1: the scale (p_t s(H))^-K exceeds 1 where p_t s(H) < 1, as on a random model
            assert logs[-1]["loss"] > logs[-1]["nll"]
    with open(res["files"]["json"]) as f:
        saved = json.load(f)
    assert saved["provenance"]["command"].startswith("python examples/finetune_hf.py --model")
    assert set(saved["summary"]) == set(names)
    if "png" in res["files"]:
        assert os.path.getsize(res["files"]["png"]) > 5000


def test_prior_only_reports_the_float64_mean_target_probability(setup, capsys):
    """``--prior-only``: ``rk.analysis.prior_strength`` on the tokens the training loss scores
    (response and ``<eos>``), equal to a float64 computation from the full logits; no training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, model, train, test, root = setup
    res = hf.main(["--model", model, "--data", train, "--eval-data", test, "--prior-only", "--eval-batch-size", "16",
                   "--out", str(root / "prior"), "--quiet"])
    assert set(res) == {"prior"}
    text = capsys.readouterr().out
    assert "mean target probability" in text and "region:" in text
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model).double().eval()
    ps = []
    for row in hf.read_jsonl(train):
        enc = hf.encode(tok, row["prompt"], row["response"], 512)
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1], -1)
        lab = torch.tensor(enc["labels"][1:])
        ps.append(lp[lab != -100].gather(-1, lab[lab != -100][:, None])[:, 0].exp())
    p = torch.cat(ps)
    assert res["prior"]["n_tokens"] == p.numel() and res["prior"]["n_sequences"] == 48
    # float32 against float64 on a random model (p_t ~ 1/V): a float32 mean carries ~1e-7 relative error
    assert res["prior"]["mean_p"] == pytest.approx(float(p.mean()), rel=1e-5)
    if "png" in res["prior"]:
        assert os.path.getsize(res["prior"]["png"]) > 10000
