"""Test configuration: Triton runs on the CPU through its interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before triton is first imported, so it happens here,
before anything imports torch or ssa_kernels.
"""

import os

import pytest


def _cuda_present() -> bool:
    # Nothing touches CUDA at import time; this only asks the driver whether a device exists.
    import torch

    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _cuda_present():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
