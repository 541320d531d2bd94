"""TRL's GRPOTrainer, from ranktuner_kernels.integrations.trl, with EAST and THR: a real GRPO run
on a CPU in minutes.

Task (``grpo_toy.py``'s): the prompt is ``"a + b ="`` with two digits, the completion the two
decimal digits of the sum and an end token (``"7 + 8 ="`` -> ``"1 5"``). Reward: the fraction
of the two digits that are right (0 unless the completion is exactly two digits); correct = both
right. The policy is a tiny Llama (transformers, 2 layers, width 64, a 15-word vocabulary),
warmed up by 40 supervised steps (the format and a first guess: about half of the 100 prompts
right greedily, fewer sampled), then trained by TRL's ``GRPOTrainer`` (our drop-in: our fused LM
head; 150 steps of 32 prompts x 8 completions, Adam 2e-3) in four variants:

* ``plain``: GRPO as TRL does it (loss ``dapo``, ``beta = 0``);
* ``east``: ``east=EASTOptions(a=1.0, extract_answer=str.strip)`` (the answer is the text);
* ``thr``: ``thr=THROptions(p=0.1, correct=0.5)`` (correct: a reward above 0.5, both digits);
* ``both``: the two together;

each from the same warmed-up model of a seed, for ``--seeds`` seeds (3). Reported: the mean
reward of the last tenth of the steps (sampled completions, TRL's logged ``reward``), the
sampled accuracy over the same steps, the greedy accuracy on all 100 prompts after training,
as mean ± sd over the seeds, and the wall time.

    python examples/grpo_trl.py                 # 4 variants x 3 seeds (writes a scratch folder)
    python examples/grpo_trl.py --update        # ... into examples/results/grpo_trl/ (json + png)
    python examples/grpo_trl.py --quick         # 2 variants, 1 seed, 3 steps (the test's run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
#: where --update writes; otherwise a scratch folder
RESULTS = os.path.join(HERE, "results", "grpo_trl")
SCRATCH = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "grpo_trl")
WORDS = ["<pad>", "<bos>", "<eos>", "+", "=", *map(str, range(10))]
VARIANTS = ("plain", "east", "thr", "both")


@dataclasses.dataclass
class Config:
    steps: int = 150  # GRPO steps (one optimizer step per generation batch)
    prompts: int = 32  # prompts per step
    group: int = 8  # completions per prompt (num_generations)
    micro_batch: int = 64  # completions per forward/backward (gradient accumulation over the rest)
    lr: float = 2e-3
    entropy_coef: float = 0.0  # TRL's entropy bonus
    iterations: int = 1  # TRL's num_iterations: optimizer passes over each generation batch
    warmup_steps: int = 40  # supervised steps before GRPO (warmed_up_model)
    seeds: int = 3
    variants: tuple = VARIANTS
    east_a: float = 1.0
    thr_p: float = 0.1
    threads: int = 1


QUICK = dict(steps=3, prompts=8, group=4, micro_batch=16, warmup_steps=5, seeds=1, variants=("plain", "both"))


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def answer(a: int, b: int) -> str:
    return f"{(a + b) // 10} {(a + b) % 10}"


def dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": f"{a} + {b} =", "answer": answer(a, b)}
                                       for a in range(10) for b in range(10)])


def reward_digits(completions, answer, log_metric=None, **kwargs):
    """Fraction of the two digits right (0 unless the completion is two words); logs the share
    of completions with both right as ``sampled_accuracy``."""
    rewards = []
    for text, want in zip(completions, answer):
        got, want = text.split(), want.split()
        rewards.append(sum(g == w for g, w in zip(got, want)) / 2 if len(got) == 2 else 0.0)
    if log_metric is not None:
        log_metric("sampled_accuracy", sum(r == 1.0 for r in rewards) / len(rewards))
    return rewards


def warmed_up_model(seed: int, steps: int):
    """A tiny Llama after ``steps`` supervised steps on ``"a + b = t u <eos>"`` (batches of 64
    random prompts, Adam 3e-3): the format and a first guess at the sums."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        a, b = torch.randint(0, 10, (2, 64), generator=g)
        word = lambda x: x + 5  # noqa: E731 - the word id of digit x
        const = lambda w: torch.full((64,), w)  # noqa: E731
        ids = torch.stack([word(a), const(3), word(b), const(4), word((a + b) // 10), word((a + b) % 10), const(2)], 1)
        labels = ids.clone()
        labels[:, :4] = -100  # the loss on the completion and its end token
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def greedy_accuracy(model, tok) -> float:
    data = dataset()
    enc = tok(list(data["prompt"]), return_tensors="pt")
    was = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=2)
    model.train(was)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.split() == w.split() for t, w in zip(texts, list(data["answer"]))) / len(texts)


def options(variant: str, cfg: Config) -> dict:
    from ranktuner_kernels.integrations.trl import EASTOptions, THROptions

    out = {}
    if variant in ("east", "both"):
        out["east"] = EASTOptions(a=cfg.east_a, extract_answer=str.strip)
    if variant in ("thr", "both"):
        out["thr"] = THROptions(p=cfg.thr_p, correct=0.5)
    return out


def run_one(variant: str, seed: int, cfg: Config, model_state: dict, work: str) -> dict:
    import transformers
    import trl

    from ranktuner_kernels.integrations.trl import GRPOTrainer

    tok = tokenizer()
    model = warmed_up_model(seed, 0)
    model.load_state_dict(model_state)
    args = trl.GRPOConfig(
        output_dir=os.path.join(work, f"{variant}_{seed}"), max_steps=cfg.steps, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.prompts * cfg.group // cfg.micro_batch,
        num_generations=cfg.group, num_iterations=cfg.iterations, entropy_coef=cfg.entropy_coef,
        max_completion_length=3, temperature=1.0, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=seed)
    transformers.logging.set_verbosity_error()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_digits, args=args, train_dataset=dataset(),
                          processing_class=tok, **options(variant, cfg))
    trainer.remove_callback(transformers.PrinterCallback)  # the per-step dicts; the histories are kept
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    history = {k: [h.get(k, math.nan) for h in logs] for k in sorted({k for h in logs for k in h})
               if all(isinstance(h.get(k, 0.0), (int, float)) for h in logs)}
    tail = max(1, len(logs) // 10)
    return {"variant": variant, "seed": seed, "seconds": seconds, "history": history,
            "final_reward": statistics.fmean(history["reward"][-tail:]),
            "final_sampled_accuracy": statistics.fmean(history["sampled_accuracy"][-tail:]),
            "greedy_accuracy": greedy_accuracy(trainer.model, tok)}


def summarize(runs: list, cfg: Config) -> list:
    rows = []
    for variant in cfg.variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "runs": len(mine)}
        for key in ("final_reward", "final_sampled_accuracy", "greedy_accuracy", "seconds"):
            values = [r[key] for r in mine]
            row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def table(rows: list) -> str:
    lines = ["| variant | final reward | sampled accuracy | greedy accuracy | seconds per run |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in ("final_reward", "final_sampled_accuracy",
                                                          "greedy_accuracy")]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['seconds'][0]:.0f} |")
    return "\n".join(lines)


def plot(runs: list, cfg: Config, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in cfg.variants:
        for ax, key in zip(axes, ("reward", "sampled_accuracy")):
            curves = torch.tensor([r["history"][key] for r in runs if r["variant"] == variant])
            mean, sd = curves.mean(0), curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1])
            steps = torch.arange(1, curves.shape[1] + 1)
            ax.plot(steps, mean, label=variant)
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
    for ax, title in zip(axes, ("mean reward (fraction of digits right)", "sampled accuracy (both right)")):
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"TRL GRPOTrainer (ranktuner_kernels), a + b digits: mean ± sd over {cfg.seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def provenance(command: str | None) -> dict:
    """The versions, the command and the git commit of this run (None outside a checkout)."""
    import subprocess

    import transformers
    import trl

    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"command": command, "commit": commit,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def run(cfg: Config, out_dir: str, quiet: bool = False, command: str | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "torch_threads": cfg.threads, "load_average_at_start": os.getloadavg()}
    runs, start_accuracy = [], []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(cfg.seeds):
            warm = warmed_up_model(seed, cfg.warmup_steps)
            start_accuracy.append(greedy_accuracy(warm, tokenizer()))
            state = warm.state_dict()
            for variant in cfg.variants:
                runs.append(run_one(variant, seed, cfg, state, work))
                if not quiet:
                    r = runs[-1]
                    print(f"seed {seed} {variant:5s}: final reward {r['final_reward']:.3f}, sampled accuracy "
                          f"{r['final_sampled_accuracy']:.3f}, greedy accuracy {r['greedy_accuracy']:.2f} "
                          f"({r['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    rows = summarize(runs, cfg)
    result = {"config": dataclasses.asdict(cfg), "wall_seconds": wall, "summary": rows, "runs": runs,
              "warmed_up_greedy_accuracy": start_accuracy, "machine": machine, **provenance(command)}
    files = {"json": os.path.join(out_dir, "grpo_trl.json")}
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=1)
    png = plot(runs, cfg, os.path.join(out_dir, "grpo_trl.png"))
    if png:
        files["png"] = png
    result["files"] = files
    result["table"] = table(rows)
    if not quiet:
        print(f"before GRPO (warmed up): greedy accuracy {statistics.fmean(start_accuracy):.3f} per seed "
              f"{start_accuracy}")
        print(result["table"])
        print(f"wall time {wall:.0f} s; written: {', '.join(files.values())}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 variants, 1 seed, 3 steps (what the test runs)")
    ap.add_argument("--update", action="store_true", help=f"write {RESULTS} instead of a scratch folder")
    ap.add_argument("--out", default=None, help="output folder (default: a scratch folder, or --update's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = Config(**QUICK) if args.quick else Config()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.update and args.quick:
        ap.error("--update writes the full experiment's results; drop --quick")
    out = args.out or (RESULTS if args.update else SCRATCH + ("_quick" if args.quick else ""))
    command = " ".join(["python", "examples/grpo_trl.py", *(sys.argv[1:] if argv is None else argv)])
    return run(cfg, out, command=command)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
