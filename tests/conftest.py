"""Test setup: without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here,
before any test module imports ranktuner_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
