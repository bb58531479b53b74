import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests are collected everywhere so that they are counted, and skipped with a stated reason where
    # there is no CUDA device; on the GPU host they run (`pytest -m gpu`).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
