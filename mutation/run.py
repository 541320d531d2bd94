"""Mutation testing of the loss, op, distributed and RL modules with cosmic-ray (docs/testing.md,
"Mutation testing").

    pip install cosmic-ray==8.7.0
    python mutation/run.py init             # every group: list its mutants, skip the filtered operators, sample
    python mutation/run.py exec core rl     # run the sampled mutants of some groups (niced, one at a time)
    python mutation/run.py report           # counts per module, and the survivors' diffs

Each group is a set of modules with the fastest test selection that should kill their mutants
(``TESTS``); ``FRACTION`` of each module's mutants are run, drawn uniformly with a fixed seed.
cosmic-ray mutates the files in place and restores them after each run; its sessions go to
``mutation/out/`` (git-ignored).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "mutation" / "out"
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider"
NOT_TRITON = "-k 'not triton and not compiled_training_step'"
CORE = ("tests/test_call.py tests/test_options.py tests/test_api.py tests/test_reference.py tests/test_stats.py "
        "tests/test_numerics.py tests/test_logprobs.py tests/test_defaults.py tests/test_registry.py")
RK = "ranktuner_kernels/"

#: group -> (modules, test command, fraction of each module's mutants that is run).
GROUPS = {
    "core": ([RK + m for m in ("_terms.py", "_call.py", "_inputs.py", "_params.py", "_chunks.py", "_schema.py",
                                "_ops.py", "_dispatch.py", "token_loss.py", "token_logprobs.py", "weightings.py")],
             f"{PYTEST} {CORE} {NOT_TRITON}", 0.05),
    "reference": ([f"reference/{m}" for m in ("rows.py", "row_stats.py", "row_grad.py", "stats.py", "thr.py",
                                              "topk_entropy.py", "transform.py")],
                  f"{PYTEST} {CORE} tests/test_thr.py {NOT_TRITON}", 0.03),
    "linear": ([RK + "linear_loss.py"], f"{PYTEST} tests/test_linear.py tests/test_call.py -k reference", 0.25),
    "distributed": ([RK + "_distributed.py"],
                    f"{PYTEST} tests/test_call.py tests/test_vocab_parallel_ignore_index.py {NOT_TRITON}", 0.1),
    "rl": ([RK + "rl/policy_loss.py", RK + "rl/east.py"],
           f"{PYTEST} tests/test_rl_policy_loss.py tests/test_rl_east.py tests/test_acc_policy.py", 0.1),
    "thr": ([RK + "rl/thr.py", RK + "rl/thr_linear.py"],
            f"{PYTEST} tests/test_thr.py tests/test_thr_linear.py tests/test_thr_layouts.py {NOT_TRITON}", 0.025),
}

#: Operators left out (regular expressions on cosmic-ray's names): a binary operator turned into
#: a bit, shift, modulo or floor-division operator (a TypeError on floats and tensors: killed by
#: any test, nothing learnt), ``|`` (``X | None`` annotations: never evaluated), a value comparison
#: turned into an identity test and back, ``~``, and the random variable replacers.
EXCLUDE = [
    r"core/ReplaceBinaryOperator_.*_(Mod|FloorDiv|RShift|LShift|BitOr|BitXor)$",
    r"core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|Pow|Mod|FloorDiv)_BitAnd$",
    r"core/ReplaceBinaryOperator_BitOr_",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
    r"core/ReplaceComparisonOperator_(Is|IsNot)_(Eq|NotEq|Lt|LtE|Gt|GtE)$",
    r"core/ReplaceUnaryOperator_.*Invert", r"core/ReplaceUnaryOperator_UAdd_",
    r"core/Variable(Replacer|Inserter)",
]
SEED = 0
COLUMNS = ("mutants", "after filter", "sampled", "pending", "no test", "run", "killed", "survived")
TIMEOUT = 300.0


def _config(name):
    modules, command, _ = GROUPS[name]
    mods = ", ".join(f'"{m}"' for m in modules)
    return (f'[cosmic-ray]\nmodule-path = [{mods}]\ntimeout = {TIMEOUT}\nexcluded-modules = []\n'
            f'test-command = "{command}"\n\n[cosmic-ray.distributor]\nname = "local"\n')


def init(names):
    import re

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    OUT.mkdir(parents=True, exist_ok=True)
    exclude = re.compile("|".join(f"(?:{e})" for e in EXCLUDE))
    for name in names:
        cfg, db = OUT / f"{name}.toml", OUT / f"{name}.sqlite"
        cfg.write_text(_config(name))
        db.unlink(missing_ok=True)
        subprocess.run(["cosmic-ray", "init", str(cfg), str(db)], check=True, cwd=ROOT)
        rng = random.Random(SEED)
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            # a stable order (cosmic-ray's job ids are random), so that the seed fixes the sample
            items = sorted(work_db.pending_work_items, key=lambda i: (str(i.mutations[0].module_path),
                                                                     i.mutations[0].operator_name,
                                                                     i.mutations[0].occurrence))
            kept = [i for i in items if not exclude.match(i.mutations[0].operator_name)]
            chosen = set()
            for module in GROUPS[name][0]:
                mine = [i.job_id for i in kept if str(i.mutations[0].module_path) == module]
                chosen.update(rng.sample(mine, round(len(mine) * GROUPS[name][2])))
            kept_ids = {i.job_id for i in kept}
            for item in items:
                if item.job_id not in chosen:
                    why = "not sampled" if item.job_id in kept_ids else "filtered operator"
                    work_db.set_result(item.job_id, WorkResult(output=why, worker_outcome=WorkerOutcome.SKIPPED))
            print(f"{name}: {len(items)} mutants, {len(kept)} after the operator filter, {len(chosen)} sampled")


def execute(names):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for name in names:
        subprocess.run(["nice", "-n", "10", "cosmic-ray", "exec", str(OUT / f"{name}.toml"), str(OUT / f"{name}.sqlite")],
                       check=True, cwd=ROOT, env=env)


def report(names):
    from cosmic_ray.work_db import WorkDB, use_db

    totals = {}
    for name in names:
        db = OUT / f"{name}.sqlite"
        if not db.exists():
            continue
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            for item, result in work_db.completed_work_items:
                module = str(item.mutations[0].module_path)
                row = totals.setdefault(module, dict.fromkeys(COLUMNS, 0))
                row["mutants"] += 1
                if result.output == "filtered operator":
                    continue
                row["after filter"] += 1
                if result.output == "not sampled":
                    continue
                row["sampled"] += 1
                if result.worker_outcome != "normal":
                    row["no test"] += 1
                    continue
                row["run"] += 1
                row["killed" if result.test_outcome != "survived" else "survived"] += 1
                if result.test_outcome == "survived":
                    print(f"--- SURVIVED {name} job {item.job_id} {item.mutations[0].operator_name}\n{result.diff}")
            for item in work_db.pending_work_items:
                row = totals.setdefault(str(item.mutations[0].module_path), dict.fromkeys(COLUMNS, 0))
                row["mutants"] += 1
                row["after filter"] += 1
                row["sampled"] += 1
                row["pending"] += 1
    print(json.dumps(totals, indent=1))


if __name__ == "__main__":
    cmd, names = sys.argv[1], sys.argv[2:] or list(GROUPS)
    {"init": init, "exec": execute, "report": report}[cmd](names)
