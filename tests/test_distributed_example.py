"""Clean exits of ranks started by ``torchrun`` (``examples/distributed_train.py``).

A gloo worker thread drops its reference to a finished collective's tensors after the caller's
wait has returned, and takes the GIL to release a tensor's Python object; once the interpreter is
finalizing, Python ends that thread inside the C++ destructor and the process aborts (SIGABRT,
"terminate called without an active exception"), after a correct run. The example ends each rank
with ``exit_cleanly`` (barrier, ``destroy_process_group``, ``os._exit(0)``).

* fast: the race forced on two ranks (the main thread keeps the GIL while a collective that
  only the worker references finishes, then the rank ends): a plain end aborts, an end through
  the example's ``exit_cleanly`` exits 0;
* slow: the FSDP example itself, run several times, exits 0 every time (on 2 loaded CPU cores
  it aborted in about 1 run of 10 before ``exit_cleanly``; 20 of 20 runs exited 0 with it).
"""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from helpers import EXAMPLES

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

RUNS = 3  # the slow test's runs of the example (about 25 s each on 2 loaded CPU cores)

#: one rank of the forced race; ``{ending}`` is how the rank ends
RACE = """
import sys, time
sys.path.insert(0, {examples!r})
import torch, torch.distributed as dist
from distributed_train import exit_cleanly

dist.init_process_group("gloo")
dist.barrier()
sys.setswitchinterval(1000.0)  # this thread keeps the GIL until it blocks or exits
# a collective on a tensor only gloo's worker references: when it finishes, the worker drops the
# last reference, which needs the GIL (the tensor's Python object is preserved until then)
dist.all_reduce(torch.ones(4), async_op=True)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 1.0:  # the collective finishes meanwhile; the worker waits
    pass
{ending}
"""


def torchrun(*args, timeout=300):
    """Two local ranks (``--standalone``: a free port, no clash with other runs)."""
    if not os.path.isdir(EXAMPLES):
        pytest.skip("examples/ is not beside tests/ (not a source checkout)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ending, aborts", [("exit_cleanly()", False), ("pass  # a plain end", True)])
def test_a_worker_holding_the_gil_at_exit(tmp_path, ending, aborts):
    """The forced race: a plain end aborts (the hazard is real, and this harness sees it), an end
    through ``exit_cleanly`` exits 0 on both ranks."""
    script = tmp_path / "race.py"
    script.write_text(RACE.format(examples=os.path.abspath(EXAMPLES), ending=ending))
    proc = torchrun(str(script))
    out = proc.stdout + proc.stderr
    if aborts:
        assert proc.returncode != 0 and "terminate called without an active exception" in out, out[-3000:]
    else:
        assert proc.returncode == 0 and "terminate called" not in out, out[-3000:]


@pytest.mark.slow
def test_fsdp_example_exits_cleanly_every_time():
    """``examples/distributed_train.py --parallel fsdp --check`` (short): every run exits 0 with
    the check line printed and no abort."""
    script = os.path.join(EXAMPLES, "distributed_train.py")
    for run in range(RUNS):
        proc = torchrun(script, "--parallel", "fsdp", "--check", "--steps", "3")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"run {run + 1} of {RUNS}: exit status {proc.returncode}\n{out[-3000:]}"
        assert "terminate called" not in out and "check: loss" in proc.stdout, out[-3000:]
