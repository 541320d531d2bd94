"""Test setup: without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here,
before any test module imports ranktuner_kernels.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk cache keys its C++ kernels without ATEN_CPU_CAPABILITY: a kernel generated
# with AVX-512 vectors in one run and rebuilt in a run under ATEN_CPU_CAPABILITY=default (no vector
# headers) fails to compile (torch 2.13). The suite keeps one cache per capability setting.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"ranktuner-inductor-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))



def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pytest_configure(config):
    """Under pytest-xdist (``-n``), each worker gets its share of the cores as torch threads:
    two workers of two threads each on two cores spin-wait on each other and make the tiny
    models of the suite many times slower (measured: a fine-tuning run 86 s instead of 8 s)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, _cores() // int(workers)))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread (tiny models: threads cost more than they give)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
