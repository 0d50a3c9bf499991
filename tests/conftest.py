"""Test-suite settings: one torch thread (see the README) and GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
# transformers warns at import that torchvision (which has no CPU wheel here) is missing
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
