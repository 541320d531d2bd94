"""Fine-tune a local transformers causal LM with a token-reweighted objective and compare.

    python examples/finetune_hf.py --model PATH --data train.jsonl --eval-data test.jsonl \\
        --weighting ranktuner [--seeds 0,1,2] [--lora] [--answer-regex 'A: (\\d+)'] [--out DIR]

For each objective in ``--weighting`` (comma-separated, e.g. ``sft,ranktuner,dft,talr``) and
each seed in ``--seeds``, the model at ``PATH`` (a folder ``from_pretrained`` reads; nothing
is downloaded unless PATH is a hub id and you are online) is loaded afresh, patched with
``patch_model(model, weighting=...)`` (the fused loss: ``rk.linear_cross_entropy`` on the
final hidden states and the LM head, never the logits; Triton kernels on a GPU, the
reference implementation on a CPU), optionally wrapped in LoRA adapters (``--lora``, needs
``peft``), and trained with the transformers ``Trainer`` (its progress bar; the plain NLL
logged next to the objective by ``add_nll_logging``; ``eval_nll`` is the NLL of the clean
held-out responses). Then it is evaluated on the held-out prompts:

* ``accuracy``: greedy exact match: with ``--answer-regex``, the first match's first group
  equals the reference response's; without it, the whole stripped generation equals the
  stripped reference response;
* ``noisy_greedy`` / ``noisy_sampled``: the generations (greedy / sampled at ``--temperature``)
  that match ``--noise-regex``; by default a pattern made of the first two words of every
  distinct ``"noise"`` field of the training data (omitted when there is neither);
* ``clean_nll``: the teacher-forced NLL of the held-out responses (mean per token).

Writes ``finetune_hf.json`` (every run, mean ± std per objective, the commit and the command)
and ``finetune_hf.png`` (the error-bar plot of ``examples/see_it_matter.py``) to ``--out``
(default: a scratch folder under the system's temporary directory).

**Data**: JSONL, one object per line with ``"prompt"`` and ``"response"`` (strings; the loss
is on the response and an ``<eos>``, the prompt's labels are ``-100``) and optionally
``"noise"`` (the text inserted into a corrupted response). ``--make-demo-data DIR`` writes
``DIR/train.jsonl`` and ``DIR/test.jsonl`` of the setting of ``examples/see_it_matter.py``
(3-step arithmetic, 30 % of the training responses with a sentence after the first step).
``--make-tiny-model DIR`` writes a tiny random Llama and a character tokenizer (offline) for a
smoke test.

**Which objective?** ``--report-prior`` first prints the model's prior strength on the training
data (``rk.analysis.prior_strength``: the mean target probability before fine-tuning, arXiv
2510.00526's proxy, with the region it falls in; ``prior_strength.png`` in ``--out``), then runs
the comparison; ``--prior-only`` prints it and stops. What each region's evidence says:
``docs/choosing.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import torch

from ranktuner_kernels.analysis.prior import read_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import see_it_matter as sim  # noqa: E402

SCRATCH = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "finetune_hf")


# ----------------------------------------------------------------------------- data

def read_jsonl(path: str) -> list:
    """``[{"prompt", "response", "noise"?}, ...]``; a ValueError names the line at fault."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path!r} (JSONL with 'prompt' and 'response'; "
                                "`--make-demo-data DIR` writes one)")
    return read_rows(path)


def make_demo_data(folder: str, seed: int = 0) -> tuple:
    """``folder/train.jsonl`` and ``folder/test.jsonl`` of see_it_matter's setting."""
    cfg = sim.MatterConfig(seed=seed)
    data = sim.make_data(cfg)
    os.makedirs(folder, exist_ok=True)
    train_path, test_path = os.path.join(folder, "train.jsonl"), os.path.join(folder, "test.jsonl")
    with open(train_path, "w") as f:
        for (p, clean, _), (_, r, noisy) in zip(data["train"], data["finetune"]):
            row = {"prompt": p, "response": r}
            if noisy:  # r = clean[:cut] + " " + sentence + clean[cut:]
                cut = clean.index(".") + 1
                row["noise"] = r[cut + 1: cut + len(r) - len(clean)]
            f.write(json.dumps(row) + "\n")
    with open(test_path, "w") as f:
        for p, r, _ in data["test"]:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return train_path, test_path


def make_tiny_model(folder: str, seed: int = 0) -> str:
    """A tiny random ``LlamaForCausalLM`` and a character-level ``PreTrainedTokenizerFast``
    (``tokenizers`` WordLevel, built offline), saved with ``save_pretrained`` to ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    from tiny_lm import ALPHABET as chars
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                     unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def encode(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """``input_ids`` = the prompt's ids (with the tokenizer's special prefix) + the response's
    + ``<eos>``; ``labels`` = ``-100`` on the prompt, the ids elsewhere; cut to ``max_length``."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    return {"input_ids": ids, "labels": ([-100] * len(p) + r)[:max_length]}


class Collator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (``-100``); ``attention_mask``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list) -> dict:
        t = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), t), self.pad_id)
        lab = torch.full((len(feats), t), -100)
        mask = torch.zeros((len(feats), t), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            lab[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask}


# ----------------------------------------------------------------------------- evaluation

def noise_pattern(train_rows: list, regex: str | None):
    """``--noise-regex``, or the first two words of every distinct ``"noise"`` field; ``None``
    when there is neither."""
    if regex:
        return re.compile(regex)
    heads = sorted({" ".join(r["noise"].split()[:2]) for r in train_rows if r.get("noise", "").strip()})
    return re.compile("|".join(re.escape(h) for h in heads)) if heads else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int, temperature: float,
             seed: int, desc: str, quiet: bool) -> list:
    """Continuations of ``prompts`` (left-padded batches; greedy when ``temperature == 0``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    batches = range(0, len(prompts), batch_size)
    for i in (batches if quiet or tqdm is None else tqdm(batches, desc=desc)):
        enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(device)
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kw)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = side
    return out


def exact_match(gen: str, ref: str, answer_re) -> bool:
    if answer_re is None:
        return gen.strip() == ref.strip()
    g, r = answer_re.search(gen), answer_re.search(ref)
    return g is not None and r is not None and g.group(1 if g.groups() else 0) == r.group(1 if r.groups() else 0)


@torch.no_grad()
def clean_nll(model, dataset: list, collator, batch_size: int) -> float:
    """Teacher-forced NLL per token of the held-out responses (the patched model's ``outputs.nll``
    is a mean per call; this sums over calls)."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(dataset), batch_size):
        b = collator(dataset[i: i + batch_size])
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        lab = b["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        keep = lab != -100
        total += float(-(lp * keep).sum())
        count += float(keep.sum())
    return total / count


# ----------------------------------------------------------------------------- prior strength

def report_prior(args, train_ds: list, collator, out_dir: str) -> dict:
    """``rk.analysis.prior_strength`` of the model at ``args.model``, before any training, on the
    tokens the training loss scores (the response and ``<eos>`` of every training example):
    printed with where it falls against arXiv 2510.00526's reference points; the histogram
    written to ``out_dir/prior_strength.png`` (with matplotlib). Returns its ``to_dict()``."""
    from transformers import AutoModelForCausalLM

    import ranktuner_kernels as rk

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    bs = args.eval_batch_size
    batches = (collator(train_ds[i: i + bs]) for i in range(0, len(train_ds), bs))
    res = rk.analysis.prior_strength(model, batches, progress=not args.quiet, total=-(-len(train_ds) // bs))
    print(res.summary(), flush=True)
    out = res.to_dict()
    png = res.plot(os.path.join(out_dir, "prior_strength.png"),
                   f"{os.path.basename(os.path.normpath(args.model))} on {os.path.basename(args.data)}: "
                   f"prior strength {res.mean_p:.3f} ({res.region})")
    if png:
        out["png"] = png
        print(f"png: {png}", flush=True)
    del model
    return out


# ----------------------------------------------------------------------------- one run

def run_one(args, weighting: str, seed: int, train_ds: list, eval_rows: list, eval_ds: list, noise_re, answer_re,
            out_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from ranktuner_kernels.integrations.transformers import add_nll_logging, patch_model

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    patch_model(model, weighting=sim.weighting_of(weighting))  # a name or a config call, "RankTuner(w0='one')"
    run_dir = os.path.join(out_dir, f"{weighting}_seed{seed}")
    targs = TrainingArguments(
        output_dir=run_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), weight_decay=0.0, logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_every else "no", eval_steps=args.eval_every or None,
        per_device_eval_batch_size=args.batch_size, save_strategy="no", report_to=[], seed=seed,
        data_seed=seed, bf16=args.bf16, disable_tqdm=args.quiet, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available())
    collator = Collator(tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds or None,
                      data_collator=collator)
    add_nll_logging(trainer)
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    logs = [h for h in trainer.state.log_history if "nll" in h]
    prompts = [r["prompt"] for r in eval_rows]
    longest = max(len(d["input_ids"]) for d in eval_ds)
    greedy = generate(model, tokenizer, prompts, args.max_new_tokens or longest, args.eval_batch_size, 0.0, seed,
                      f"{weighting} seed {seed} greedy", args.quiet)
    sampled = generate(model, tokenizer, prompts, args.max_new_tokens or longest, args.eval_batch_size,
                       args.temperature, seed + 1, f"{weighting} seed {seed} sampled", args.quiet)
    n = len(eval_rows)
    row = {"seed": seed, "weighting": weighting,
           "accuracy": sum(exact_match(g, r["response"], answer_re) for g, r in zip(greedy, eval_rows)) / n,
           "noisy_greedy": None if noise_re is None else sum(bool(noise_re.search(g)) for g in greedy) / n,
           "noisy_sampled": None if noise_re is None else sum(bool(noise_re.search(g)) for g in sampled) / n,
           "clean_nll": clean_nll(model, eval_ds, collator, args.batch_size),
           "train_nll": logs[-1]["nll"] if logs else None, "train_loss": logs[-1]["loss"] if logs else None,
           "log_history": trainer.state.log_history, "train_seconds": train_seconds,
           "examples": [{"prompt": p, "greedy": g, "sampled": s} for p, g, s in list(zip(prompts, greedy, sampled))[:5]]}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local folder (config, weights, tokenizer) that from_pretrained reads")
    ap.add_argument("--data", help="training JSONL")
    ap.add_argument("--eval-data", help="held-out JSONL (default: the last --eval-n examples of --data, kept out)")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out examples evaluated (default 200)")
    ap.add_argument("--weighting", default="sft", help="comma-separated objectives (default sft): sft, ranktuner, "
                                                        "dft, talr, eaft, ...")
    ap.add_argument("--seeds", default="0", help="comma-separated (default 0)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5, help="default 1e-5 (use ~1e-4 with --lora)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per training example (cut)")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="load and train in bfloat16 (GPU)")
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=0, help="Trainer evaluation (eval_nll) every N steps (0: none)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the longest held-out example's length")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="for the sampled noisy-generation rate")
    ap.add_argument("--answer-regex", help="exact match on the first match's group 1 (e.g. 'A: (\\d+)')")
    ap.add_argument("--noise-regex", help="a generation matching it is noisy (default: from the 'noise' fields)")
    ap.add_argument("--out", default=None, help=f"output folder (default: a scratch folder, {SCRATCH})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--report-prior", action="store_true", help="first print the model's prior strength on the "
                    "training data (rk.analysis.prior_strength: arXiv 2510.00526's proxy; docs/choosing.md)")
    ap.add_argument("--prior-only", action="store_true", help="print the prior strength and stop (no training)")
    ap.add_argument("--make-demo-data", metavar="DIR", help="write DIR/train.jsonl and DIR/test.jsonl and exit")
    ap.add_argument("--make-tiny-model", metavar="DIR", help="write a tiny random Llama + tokenizer to DIR and exit")
    args = ap.parse_args(argv)

    if args.make_demo_data or args.make_tiny_model:
        if args.make_demo_data:
            print("wrote", *make_demo_data(args.make_demo_data))
        if args.make_tiny_model:
            print("wrote", make_tiny_model(args.make_tiny_model))
        return None
    if not args.model or not args.data:
        ap.error("--model and --data are required (or --make-demo-data / --make-tiny-model)")
    weightings = [w.strip() for w in args.weighting.split(",") if w.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    from transformers import AutoTokenizer

    train_rows = read_jsonl(args.data)
    if args.prior_only:  # the diagnostic alone: every example of --data, no held-out split
        eval_rows = []
    elif args.eval_data:
        eval_rows = read_jsonl(args.eval_data)[: args.eval_n]
    else:
        if len(train_rows) <= args.eval_n:
            ap.error(f"--data has {len(train_rows)} examples: give --eval-data or a smaller --eval-n")
        train_rows, eval_rows = train_rows[: -args.eval_n], train_rows[-args.eval_n:]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ds = [encode(tokenizer, r["prompt"], r["response"], args.max_length) for r in train_rows]
    eval_ds = [encode(tokenizer, r["prompt"], r["response"], args.max_length) for r in eval_rows]
    noise_re = noise_pattern(train_rows, args.noise_regex)
    answer_re = re.compile(args.answer_regex) if args.answer_regex else None
    out_dir = args.out or SCRATCH
    os.makedirs(out_dir, exist_ok=True)
    print(f"{len(train_rows)} training examples ({sum(bool(r.get('noise')) for r in train_rows)} with noise), "
          f"{len(eval_rows)} held-out; objectives {', '.join(weightings)}; seeds {', '.join(map(str, seeds))}; "
          f"noise pattern {noise_re.pattern[:60] + '...' if noise_re else None}", flush=True)
    prov = {**sim.provenance(None), "command": " ".join(["python examples/finetune_hf.py",
                                                          *(sys.argv[1:] if argv is None else argv)])}
    wall0, cpu0 = time.time(), time.process_time()
    prior = (report_prior(args, train_ds, Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                   else tokenizer.eos_token_id), out_dir)
             if args.report_prior or args.prior_only else None)
    if args.prior_only:
        return {"prior": prior}
    rows = []
    for seed in seeds:
        for w in weightings:
            rows.append(run_one(args, w, seed, train_ds, eval_rows, eval_ds, noise_re, answer_re, out_dir))
            r = rows[-1]
            print(f"{w} seed {seed}: exact match {r['accuracy']:.1%}, noisy greedy {r['noisy_greedy']}, "
                  f"sampled {r['noisy_sampled']}, clean NLL {r['clean_nll']:.4f} ({r['train_seconds']:.0f} s training)",
                  flush=True)
    summary = sim.summarize(rows, weightings)
    print("\n" + sim.summary_table(summary))
    result = {"args": vars(args), "provenance": prov, "prior": prior,
              "rows": rows, "summary": {n: {k: {"mean": m, "std": sd, "n": c} for k, (m, sd, c) in s.items()}
                                        for n, s in summary.items()},
              "wall_seconds": time.time() - wall0, "cpu_seconds": time.process_time() - cpu0,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    png = sim.plot_summary(rows, weightings, os.path.join(out_dir, "finetune_hf.png"),
                           f"{os.path.basename(os.path.normpath(args.model))}{' + LoRA' if args.lora else ''}, "
                           f"{args.steps} steps; mean ± std over {len(seeds)} seed(s)")
    result["files"] = {"json": os.path.join(out_dir, "finetune_hf.json"), **({"png": png} if png else {})}
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=1)
    print("files: " + ", ".join(result["files"].values()) + f"; wall {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
