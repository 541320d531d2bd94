"""See it work: fine-tune a tiny causal LM with ``sft``, ``ranktuner`` and ``dft``.

    python examples/finetune.py                 # defaults: a few minutes on a 2-core CPU (to a scratch folder)
    python examples/finetune.py --update        # the same, rewriting the committed examples/results/
    python examples/finetune.py --quick         # the shortened run of tests/test_examples.py (to a scratch folder)
    python examples/finetune.py --help

Everything is generated here with a fixed seed; nothing is downloaded.

1. **Data** (``finetune_data.py``). Multi-step arithmetic with worked solutions (operands below ``--max-operand``,
   every intermediate value below ``--max-value``, ``--n-ops`` steps)::

       prompt:   "9+3+8-1=?\\n"
       response: "9+3=12. 12+8=20. 20-1=19. A: 19"      (then <eos>)

   A fraction (``--noise-frac``, 20%) of the *training* responses are corrupted with an
   irrelevant sentence ("The quiet river sings near the old tower.") inserted at the
   whitespace nearest the middle, as in the paper's noise diagnostic (App. B.3). Held-out
   problems are never in the training set.
2. **Pre-training** (once, shared): a tiny GPT (``examples/tiny_lm.py``) learns from a packed
   stream of single-step facts (``"19-3=16."``), English-like sentences and worked problems
   (mostly one step; ``--pretrain-full`` of them with ``--n-ops`` steps), with plain SFT. It
   knows the facts and the format but rarely solves the multi-step problems.
3. **Fine-tuning** (``finetune_train.py``), once per weighting, from the same pre-trained weights, same batches:
   ``rk.linear_cross_entropy(hidden, lm_head.weight, target, weighting=...)`` on the final
   hidden states and the head (the fused-linear path: the reference implementation on CPU,
   the Triton kernels on a GPU). A progress bar (tqdm if installed) shows the running NLL and
   mean weight (``return_stats=True``, ignored positions masked with ``target != -100``);
   held-out exact-match accuracy every ``--eval-every`` steps (``finetune_eval.py``: greedy
   decoding; correct when the first ``"A: <n>"`` has the right number and the generation
   stops right after it).
4. **Results** (``finetune_report.py``): a table of final accuracies, the curves PNG (NLL, objective, mean weight,
   accuracy; needs matplotlib), the noise-sensitivity table (paper Table 1's format) of the
   pre-trained and fine-tuned models, and a token-inspector page/PNG of one corrupted
   training response under the ranktuner-fine-tuned model. Files go to ``--out``
   (``--out-dir``; default: a scratch folder under the system's temporary directory,
   :data:`SCRATCH_OUT`, or :data:`QUICK_OUT` with ``--quick``; ``--update``: the committed
   ``examples/results``, full run only): ``finetune_curves.png``, ``inspect_ranktuner.{html,png}``,
   ``results.json``, checkpoints ``tiny_lm_<name>.pt`` (loadable by
   ``python -m ranktuner_kernels.analysis.cli --model examples/tiny_lm.py:load_checkpoint``).

The model is ``tiny_lm.py``; this file holds the setting (:class:`Config`), the run and the
command line, and re-exports the names of its modules (``finetune.make_data``,
``finetune.train``, ``finetune.evaluate``, ...) for ``see_it_matter.py`` and the tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the example's modules; every name is also finetune.<name> (see_it_matter.py and the tests use them)
from finetune_data import (  # noqa: E402,F401
    finetune_batch, make_data, make_fact, make_problem, make_sentence, pretrain_batch)
from finetune_eval import ANSWER, evaluate, noise_diagnostics  # noqa: E402,F401
from finetune_report import (  # noqa: E402,F401
    inspect_corrupted, plot_curves, provenance, results_table, write_results)
from finetune_train import lr_at, resolve_device, train  # noqa: E402,F401
from tiny_lm import CharTokenizer, TinyLM, TinyLMConfig, save_checkpoint  # noqa: E402


#: ``--update``: the committed results of the full run (relative to the checkout's root)
RESULTS = os.path.join("examples", "results")
#: where a run writes unless ``--out`` or ``--update`` is given (never the committed ``examples/results``)
SCRATCH_OUT = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "finetune")
#: where ``--quick`` writes unless ``--out`` is given
QUICK_OUT = os.path.join(tempfile.gettempdir(), "ranktuner_examples", "finetune_quick")


@dataclass
class Config:
    """The setting of a run; every field but ``weightings``, ``save`` and ``pretrain_mix`` is
    also an option of the command line (``--max-operand``, ...)."""

    seed: int = 0
    # data
    max_operand: int = 10          # operands in [0, max_operand)
    max_value: int = 30            # every intermediate value in [0, max_value)
    n_ops: int = 3                 # operations per problem (n_ops + 1 operands)
    n_train: int = 3000
    n_test: int = 400
    noise_frac: float = 0.2        # corrupted training responses
    # model
    d_model: int = 96
    n_layer: int = 3
    n_head: int = 4
    d_ff: int = 384
    max_len: int = 128
    # pre-training (plain SFT on a packed stream)
    pretrain_steps: int = 1200
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    pretrain_seq: int = 64
    pretrain_mix: tuple = (0.55, 0.2)  # fractions of facts and sentences; the rest worked problems
    pretrain_full: float = 0.15    # of the pre-training's worked problems, the fraction with n_ops
                                   # operations (the rest have one)
    # fine-tuning
    weightings: tuple = ("sft", "ranktuner", "dft")
    steps: int = 500
    lr: float = 2e-3
    batch_size: int = 32
    eval_every: int = 100
    eval_n: int = 200              # held-out problems in the periodic evaluations (the final one uses all)
    # noise diagnostic
    diag_n: int = 500              # the first diag_n clean training pairs
    # runtime
    device: str = "auto"
    impl: str = "auto"             # rk's implementation: auto = Triton on CUDA, reference on CPU
    out_dir: str = SCRATCH_OUT
    save: bool = True              # checkpoints, PNGs, HTML, results.json


#: ``--quick``: the shortened run of tests/test_examples.py.
QUICK = dict(max_operand=10, max_value=20, n_ops=2, n_train=1500, n_test=200, d_model=64, n_layer=2, d_ff=256,
             max_len=96, pretrain_steps=800, pretrain_lr=4e-3, pretrain_seq=48, steps=300, lr=2e-3, eval_every=100,
             eval_n=100, diag_n=200)


def run(cfg: Config, quiet: bool = False, progress: bool | None = None, argv: list | None = None) -> dict:
    """The whole example; returns ``{"rows", "histories", "diagnostics", "files", "accuracy"}``
    (``rows``: accuracy per model, the untrained and pre-trained-only baselines first).
    ``quiet``: print nothing; ``progress``: progress bars and periodic evaluation lines
    (default: ``not quiet``). Files (``cfg.save``) go to ``cfg.out_dir`` only."""
    t_start = time.time()
    prov = provenance(argv)  # before the run: the commit of the code that runs
    cfg = copy.deepcopy(cfg)
    cfg.device = resolve_device(cfg.device)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    hush = quiet if progress is None else not progress  # progress bars and periodic evaluations
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    data = make_data(cfg)
    test, ft = data["test"], data["finetune"]
    n_noisy = sum(c for _, _, c in ft)
    say(f"device {cfg.device} ({'Triton kernels' if cfg.device.type == 'cuda' and cfg.impl != 'reference' else 'reference implementation'}); "
        f"{len(ft)} training problems ({n_noisy} with an inserted sentence), {len(test)} held-out")
    say(f"e.g. prompt {test[0][0]!r} -> response {test[0][1]!r}")
    if n_noisy:
        say(f"     corrupted: {next(r for _, r, c in ft if c)!r}")

    mcfg = TinyLMConfig(tok.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, d_ff=cfg.d_ff,
                        max_len=cfg.max_len)
    model = TinyLM(mcfg).to(cfg.device)
    rows = []
    sub = test[: cfg.eval_n]
    ev0 = evaluate(model, tok, sub, cfg)  # a random model: the subset is plenty
    rows.append({"name": "untrained (random init)", **ev0})

    # pre-training
    t0 = time.time()
    prng = random.Random(cfg.seed + 1)
    held_out = {p for p, _, _ in test}
    train(model, lambda: (lambda b: (b[:, :-1], b[:, 1:]))(pretrain_batch(prng, tok, cfg, held_out)), cfg.pretrain_steps,
          cfg.pretrain_lr, "sft", cfg, "pre-train", quiet=hush)
    base_state = copy.deepcopy(model.state_dict())
    ev_base = evaluate(model, tok, test, cfg)
    rows.append({"name": "pre-trained only", **ev_base, "seconds": time.time() - t0})
    say(f"pre-trained in {time.time() - t0:.0f} s; held-out accuracy before fine-tuning {ev_base['accuracy']:.1%}")

    files = {}
    if cfg.save:
        os.makedirs(cfg.out_dir, exist_ok=True)
        files["base"] = os.path.join(cfg.out_dir, "tiny_lm_pretrained.pt")
        save_checkpoint(files["base"], model, tok)

    histories, models = {}, {}
    for name in cfg.weightings:
        model.load_state_dict(base_state)
        frng = random.Random(cfg.seed + 2)  # the same batches for every weighting
        torch.manual_seed(cfg.seed + 2)
        t0 = time.time()
        hist = train(model, lambda: finetune_batch(frng, tok, ft, cfg), cfg.steps, cfg.lr, name, cfg, f"{name:>9}",
                     eval_fn=lambda final: evaluate(model, tok, test if final else sub, cfg), quiet=hush)
        secs = time.time() - t0
        histories[name] = hist
        models[name] = copy.deepcopy(model.state_dict())
        rows.append({"name": f"fine-tuned: {name}", "accuracy": hist["accuracy"][-1],
                     "answer_right": hist["answer_right"][-1], "noisy_generations": hist["noisy_generations"][-1],
                     "final_nll": sum(hist["nll"][-20:]) / len(hist["nll"][-20:]), "seconds": secs})
        if cfg.save:
            files[name] = os.path.join(cfg.out_dir, f"tiny_lm_{name}.pt")
            save_checkpoint(files[name], model, tok, weighting=name)

    say(f"\nFinal held-out exact-match accuracy ({len(test)} problems, greedy decoding; 'answer right': the first "
        "'A: <n>' is right, stopping or not; 'noisy gen.': generations containing an inserted-style sentence)")
    say(results_table(rows))

    states = {"pre-trained": base_state, **{f"fine-tuned: {n}": s for n, s in models.items()}}
    diagnostics = noise_diagnostics(model, states, data, tok, cfg, say)

    # token inspection of one corrupted training response under the ranktuner model
    if cfg.save and "ranktuner" in models:
        model.load_state_dict(models["ranktuner"])
        shown = inspect_corrupted(model, tok, next(e for e in ft if e[2]), cfg.out_dir)
        files.update(shown)
        say("\ntoken inspection: " + ", ".join(shown.values()))

    if cfg.save:
        curves = plot_curves(histories, os.path.join(cfg.out_dir, "finetune_curves.png"), cfg)
        if curves:
            files["curves"] = curves
        files["results"] = write_results(os.path.join(cfg.out_dir, "results.json"), cfg, prov, rows, diagnostics,
                                         histories, time.time() - t_start)
        say("files: " + ", ".join(files.values()))
    say(f"total {time.time() - t_start:.0f} s")
    return {"rows": rows, "histories": histories, "diagnostics": diagnostics, "files": files,
            "accuracy": {r["name"].split(": ")[-1]: r["accuracy"] for r in rows}}


def parse_args(argv=None) -> tuple:
    """``(Config, argparse.Namespace)`` of the command line. The output folder: ``--out``
    (``--out-dir``) as given; ``--update``: the committed :data:`RESULTS` (the full run only);
    else the scratch folder :data:`SCRATCH_OUT` (:data:`QUICK_OUT` with ``--quick``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the shortened run of the test (66 s on 2 CPU cores); "
                    f"writes to a scratch folder ({QUICK_OUT}) unless --out is given")
    ap.add_argument("--out", dest="out", default=None, help=f"output folder (same as --out-dir; default: a scratch "
                    f"folder, {SCRATCH_OUT})")
    ap.add_argument("--update", action="store_true", help=f"write the committed full-run results, {RESULTS}/ "
                    "(replacing them); not with --quick, --out or --no-save")
    for f in fields(Config):
        if f.name in ("weightings", "save", "pretrain_mix"):
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"default {f.default}")
    ap.add_argument("--weightings", default=None, help="comma-separated (default sft,ranktuner,dft); any rk weighting name")
    ap.add_argument("--no-save", action="store_true", help="write no files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (the results are still printed)")
    args = ap.parse_args(argv)
    if args.update and (args.quick or args.no_save or args.out is not None or args.out_dir is not None):
        ap.error("--update writes the committed results of the full run: not with --quick, --no-save, --out or --out-dir")
    cfg = Config(**(QUICK if args.quick else {}))
    for f in fields(Config):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("weightings", "save", "pretrain_mix"):
            setattr(cfg, f.name, v)
    if args.weightings:
        cfg.weightings = tuple(w.strip() for w in args.weightings.split(",") if w.strip())
    if args.out is not None:
        cfg.out_dir = args.out
    elif args.update:
        cfg.out_dir = RESULTS
    elif args.quick and args.out_dir is None:
        cfg.out_dir = QUICK_OUT  # never over the committed full-run results
    cfg.save = not args.no_save
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    run(cfg, progress=not args.quiet, argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
