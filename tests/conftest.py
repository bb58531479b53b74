import os
import sys

# Tests run against the installed package (`pip install .`), where ops/ and model_adapters/ live inside
# sglang_mage. The checkout's own sglang_mage/ folder lacks them, so the repository root (which
# `python -m pytest` puts first on sys.path) must not shadow the installation; pytest runs with
# --import-mode=importlib (pyproject.toml) so that it does not put the root back in front either.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]
sys.path.append(_ROOT)  # last, for `tests.utils` only: the installed sglang_mage comes first
for _name in [m for m in sys.modules if m == "sglang_mage" or m.startswith("sglang_mage.")]:
    if not getattr(sys.modules[_name], "__file__", "").startswith(_ROOT + os.sep + "sglang_mage"):
        continue
    del sys.modules[_name]

import pytest  # noqa: E402
import torch  # noqa: E402

# Kernels are decorated when an op package is first imported; without CUDA they must be decorated in
# interpreter mode, so the variable is set before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # GPU tests are collected everywhere so that they are counted, and skipped with a stated reason where
    # there is no CUDA device; on the GPU host they run (`pytest -m gpu`).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
