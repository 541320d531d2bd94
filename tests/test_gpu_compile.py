"""Every kernel variant the library launches compiles for the GPUs people use, without a GPU,
and keep their registers: no stack in the row kernels (any target) nor in THR on sm_80, sm_90
and sm_100 (THR's stack on gfx942 is reported by ``bench.kernels_report``, not tested).

The launches are recorded from the public functions under the interpreter
(``bench/gpu_inventory.py``: every weighting of the registry, both option sets, three dtypes,
both paths, in-place, token_stats, logprobs, linear_logprobs, THR), then compiled by
subprocesses for sm_80, sm_90, sm_100 and gfx942 with a driver that only reports the
target. To keep CI within a few minutes: every recorded variant for sm_90, and for the other
targets one bf16 variant per kernel and switch set (the weighting's formula aside;
``python -m bench.kernels_report --all`` compiles everything for every target). Also: the
one-command GPU window's ``--dry-run``.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_on_gpu_dry_run_lists_every_step_within_budget():
    out = subprocess.run([sys.executable, "-m", "bench.on_gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for step in ("gpu tests", "numerics on the device", "headline", "frontier", "THR benchmark"):
        assert step in out.stdout
    assert "estimated in all" in out.stdout


@pytest.mark.long
def test_every_kernel_compiles_for_every_target_without_spills(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # the bench package, from the checkout
    from bench import gpu_compile as gc
    from bench.gpu_inventory import must_not_spill
    from bench.gpu_metrics import describe, distinct_kernels

    why = gc.backends_available()
    if why:
        pytest.skip(why)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the launches are recorded under Triton's CPU interpreter (a CPU-only test process)")
    variants, launches = gc.record_variants()
    names = {v["name"] for v in variants}
    assert {"_row_stats_kernel", "_row_grad_kernel", "_topk_entropy_kernel", "_thr_pair_kernel"} <= names, names
    others = [v for v in distinct_kernels(variants) if v["args"][0][1] == "bfloat16"]
    half = len(variants) // 2  # sm_90's list in two processes, for the two cores
    plan = {"sm_90#1": variants[:half], "sm_90#2": variants[half:], "sm_80": others, "sm_100": others,
            "gfx942": others}
    rows = gc.compile_variants(plan, targets=tuple(plan), jobs=2)
    errors = [f"{r['target']} {r['name']}: {r['error']}" for r in rows if r.get("error")]
    assert not errors, "\n".join(errors)
    assert len(rows) == sum(len(v) for v in plan.values())
    spills = [(r["target"], r["name"], describe(plan[r["key"]][r["variant"]]), r["stack"]) for r in rows
              if r["stack"] and must_not_spill(r["name"], r["target"])]
    assert not spills, spills
