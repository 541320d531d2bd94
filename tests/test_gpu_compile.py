"""Every kernel variant the library launches compiles for the GPUs people use, without a GPU,
and keep their registers: no stack in the row kernels (any target) nor in THR on sm_80, sm_90
and sm_100 (THR's stack on gfx942 is reported by ``bench.kernels_report``, not tested).

The launches are recorded from the public functions under the interpreter
(``bench/gpu_inventory.py``: every weighting of the registry, both option sets, three dtypes,
both paths, in-place, token_stats, logprobs, linear_logprobs, THR), then compiled by
subprocesses for sm_80, sm_90, sm_100 and gfx942 with a driver that only reports the
target. To keep CI within a few minutes: every recorded variant for sm_90, and for the other
targets one bf16 variant per kernel and switch set (the weighting's formula aside;
``python -m bench.kernels_report --all`` compiles everything for every target). Beside that
inventory, :func:`exercise_row_kernels` records the row kernels with the optional statistics'
switches on and off at a vocabulary that is a multiple of 16 and at 50257 (GPT-2's, not one:
no 16-byte loads), compiled for sm_80, sm_90 and sm_100. Also: the one-command GPU window's
``--dry-run``.
"""

import json
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


#: A vocabulary that is not a multiple of 16 (GPT-2's): the row strides lose their 16-byte alignment.
V_ODD = 50257


def exercise_row_kernels(gc):
    """The row kernels' launches from the public functions at ``gpu_inventory.V_RECORD`` and :data:`V_ODD`:
    float32 and bfloat16, without and with soft-cap, temperature, label smoothing and z-loss,
    the optional statistics off (the default pass) and all on (``return_stats=True``), EAFT's
    top-K kernel, the gradient kernel."""
    import torch

    import ranktuner_kernels as rk
    from bench.gpu_inventory import V_RECORD

    g = torch.Generator().manual_seed(1)
    for v in (V_RECORD, V_ODD):
        y = torch.randint(0, v, (1, 3), generator=g)
        y[0, 1] = -100
        for dtype in (torch.float32, torch.bfloat16):
            z0 = torch.randn(1, 3, v, generator=g).to(dtype)
            for opts in ({}, dict(softcap=6.0, temperature=1.3, label_smoothing=0.1, z_loss=1e-3)):
                for return_stats in (False, True):
                    z = z0.clone().requires_grad_()
                    out = rk.cross_entropy(z, y, weighting="dft", impl="triton", return_stats=return_stats, **opts)
                    (out[0] if return_stats else out).backward()
                if v == V_ODD:
                    rk.cross_entropy(z0, y, weighting=rk.EAFT(k=20), impl="triton", **opts)
            rk.logprobs(z0, y, impl="triton", return_stats=("log_sum_p2",), softcap=6.0, temperature=1.3)


def row_kernel_variants(gc):
    from bench.gpu_inventory import ROW_KERNELS

    launches: list = []
    with gc.record_launches(launches):
        exercise_row_kernels(gc)
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen and launch["name"] in ROW_KERNELS:
            seen.add(key)
            out.append(launch)
    return out


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
    row_variants = row_kernel_variants(gc)
    switches = {k for v in row_variants for k, x in v["kwargs"].items() if x == ["bool", True]}
    assert {"HAS_SUM_P2", "HAS_TOP1", "HAS_MEAN", "HAS_ONEHOT", "HAS_UNIFORM"} <= switches, switches
    assert any(["int", V_ODD] in v["args"] for v in row_variants)  # V is a runtime argument: specialized on % 16
    half = len(variants) // 2  # sm_90's list in two processes, for the two cores
    plan = {"sm_90#1": variants[:half], "sm_90#2": variants[half:], "sm_80": others, "sm_100": others,
            "gfx942": others, "sm_80#rows": row_variants, "sm_90#rows": row_variants, "sm_100#rows": row_variants}
    rows = gc.compile_variants(plan, targets=tuple(plan), jobs=2)
    errors = [f"{r['target']} {r['name']}: {r['error']}" for r in rows if r.get("error")]
    assert not errors, "\n".join(errors)
    assert len(rows) == sum(len(v) for v in plan.values())
    spills = [(r["target"], r["name"], describe(plan[r["key"]][r["variant"]]), r["stack"]) for r in rows
              if r["stack"] and must_not_spill(r["name"], r["target"])]
    assert not spills, spills
