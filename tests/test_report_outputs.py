"""The reports and their committed results: by default a report goes to a scratch folder and
writes nothing under ``bench/results/``; ``--update`` writes there and merges, keeping the rows
another toolchain measured (``bench/outputs.py``). The GPU compiles and benchmarks are replaced
by small stand-ins: what is tested is where the rows go."""

import hashlib
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "bench", "results")


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """The bench package with its scratch folder and committed results in ``tmp_path`` (the
    committed ones a copy of the real ``bench/results``), and a check that the real
    ``bench/results`` did not change."""
    monkeypatch.syspath_prepend(ROOT)
    from bench import outputs

    def snapshot():
        return {name: hashlib.sha256(open(os.path.join(COMMITTED, name), "rb").read()).hexdigest()
                for name in sorted(os.listdir(COMMITTED))}

    before = snapshot()
    monkeypatch.setattr(outputs, "SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setattr(outputs, "RESULTS", str(tmp_path / "results"))
    shutil.copytree(COMMITTED, tmp_path / "results")
    yield outputs
    assert snapshot() == before, "a report wrote into the committed bench/results/"


def test_merge_rows_keeps_other_toolchains(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from bench.outputs import merge_rows

    committed = [{"t": "3.9", "x": 1}, {"t": "3.6", "x": 2}, {"t": "3.9", "x": 3}, {"t": "3.5", "x": 4}]
    new = [{"t": "3.9", "x": 5}]
    assert merge_rows(committed, new, lambda r: r["t"]) == [{"t": "3.6", "x": 2}, {"t": "3.5", "x": 4}, new[0]]
    assert merge_rows(committed, [], lambda r: r["t"]) == committed
    assert merge_rows([], new, lambda r: r["t"]) == new


def test_destination_is_scratch_unless_update(bench):
    import argparse

    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    assert bench.destination(ap, ap.parse_args([])) == bench.SCRATCH
    assert bench.destination(ap, ap.parse_args([]), "kernels.md") == os.path.join(bench.SCRATCH, "kernels.md")
    assert bench.destination(ap, ap.parse_args(["--update"]), "x.md") == os.path.join(bench.RESULTS, "x.md")
    assert bench.destination(ap, ap.parse_args(["--out", "elsewhere"])) == "elsewhere"
    with pytest.raises(SystemExit):
        bench.destination(ap, ap.parse_args(["--update", "--out", "elsewhere"]))


def _fake_compiles(monkeypatch, version):
    """``bench.gpu_compile`` answering with one recorded variant and one compiled row per target."""
    from bench import gpu_compile

    variant = {"module": "m", "name": "_row_stats_kernel", "args": [["tensor", "bfloat16"]],
               "kwargs": {"BLOCK_V": ["int", 2048], "HAS_TERMS": ["bool", True]}}
    rows = lambda variants, targets, jobs, python: [  # noqa: E731
        {"name": "_row_stats_kernel", "target": t, "key": t, "variant": 0, "num_warps": 4, "shared": 0,
         "constexprs": {"BLOCK_V": 2048}, "registers": 99, "stack": 0, "local": 0, "loops": []} for t in targets]
    monkeypatch.setattr(gpu_compile, "backends_available", lambda: None)
    monkeypatch.setattr(gpu_compile, "record_in_subprocess", lambda python=None: ([variant], 7))
    monkeypatch.setattr(gpu_compile, "triton_version", lambda python=None: version)
    monkeypatch.setattr(gpu_compile, "compile_variants", rows)


def test_kernels_report_writes_scratch_by_default_and_merges_with_update(bench, monkeypatch, capsys):
    from bench import kernels_report

    _fake_compiles(monkeypatch, "3.9.0")
    committed = json.load(open(os.path.join(bench.RESULTS, "kernels.json")))
    foreign = [r for r in committed["rows"] if r["triton"] != "3.9.0"]
    assert foreign, "the committed kernels.json has rows of another Triton"

    assert kernels_report.main(["--targets", "sm_90,sm_80"]) == 0
    scratch = json.load(open(os.path.join(bench.SCRATCH, "kernels.json")))
    assert [r["triton"] for r in scratch["rows"]] == ["3.9.0", "3.9.0"] and "kept" not in scratch["meta"]
    assert os.path.join(bench.SCRATCH, "kernels.md") in capsys.readouterr().out
    assert json.load(open(os.path.join(bench.RESULTS, "kernels.json"))) == committed  # untouched

    assert kernels_report.main(["--update", "--targets", "sm_90"]) == 0
    merged = json.load(open(os.path.join(bench.RESULTS, "kernels.json")))
    assert [r for r in merged["rows"] if r["triton"] != "3.9.0"] == foreign  # kept, as they were
    assert [(r["triton"], r["target"], r["registers"]) for r in merged["rows"] if r["triton"] == "3.9.0"] == [
        ("3.9.0", "sm_90", 99)]  # this Triton's committed rows replaced
    kept = {r["triton"] for r in foreign}
    assert set(merged["meta"]["tritons"]) == {"3.9.0"} | kept and set(merged["meta"]["kept"]) == kept
    md = open(os.path.join(bench.RESULTS, "kernels.md")).read()
    assert all(f"The Triton {t} rows are kept from the run of" in md for t in kept)
    assert sum(line.startswith("| _row_stats_kernel |") and "| sm_90 |" in line for line in md.splitlines()) == (
        1 + sum(r["kernel"] == "_row_stats_kernel" and r["target"] == "sm_90" for r in foreign))

    with pytest.raises(SystemExit):  # --update names its own destination
        kernels_report.main(["--update", "--out", str(bench.SCRATCH)])


def _headline(device, triton, ms):
    env = {"device": device, "torch": "2.11.0", "triton": triton, "cuda": "13.0", "driver": "1"}
    row = {"kind": "linear", "impl": "rk.linear_cross_entropy[sft]", "N": 8, "D": 4, "V": 16, "mean_p_t": 0.5,
           "floor_ms": 1.0, "fwd_bwd_ms": ms, "fwd_nograd_ms": ms / 3, "bwd_ms": ms / 2, "peak_extra_bytes": 2**30,
           "x_floor": ms}
    return {"suite": "headline", "environment": env, "ceilings": {"copy_bytes_per_s": 3e12, "matmul_flops_per_s": 9e14},
            "rows": [row]}


def test_compare_writes_scratch_by_default_and_merges_with_update(bench):
    from bench import compare

    committed = json.load(open(os.path.join(bench.RESULTS, "headline.json")))
    compare.save(_headline("GPU B", "3.9.0", 2.0), bench.SCRATCH, update=False)
    assert [r["fwd_bwd_ms"] for r in json.load(open(os.path.join(bench.SCRATCH, "headline.json")))["rows"]] == [2.0]

    written = compare.save(_headline("GPU B", "3.9.0", 3.0), bench.RESULTS, update=True)
    rows = json.load(open(os.path.join(bench.RESULTS, "headline.json")))["rows"]
    assert len(rows) == len(committed["rows"]) + 1 and rows[-1]["fwd_bwd_ms"] == 3.0
    assert [{k: v for k, v in r.items() if k != "toolchain"} for r in rows[:-1]] == committed["rows"]
    md = open(os.path.join(bench.RESULTS, "headline.md")).read()
    assert md.startswith("### GPU B, torch 2.11.0, Triton 3.9.0") and f"### {committed['environment']['device']}" in md
    assert len(written["toolchains"]) == 2

    compare.save(_headline("GPU B", "3.9.0", 4.0), bench.RESULTS, update=True)  # the same toolchain: replaced
    rows = json.load(open(os.path.join(bench.RESULTS, "headline.json")))["rows"]
    assert len(rows) == len(committed["rows"]) + 1 and rows[-1]["fwd_bwd_ms"] == 4.0
