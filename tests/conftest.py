"""Test setup: without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here,
before any test module imports ranktuner_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



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
