"""sglang-mage: MAGE ([MASK]-guided sparse attention) for block-diffusion LLMs as an SGLang backend.

Importing this package is cheap: the backend, the Triton ops and FlashInfer load only when SGLang builds
the `mage` attention backend.
"""

import os as _os

__version__ = "0.1.0"

BACKEND_NAME = "mage"

# An installed wheel has ops/ and model_adapters/ inside this package (pyproject's package-dir maps them in).
# In a source checkout they sit beside it; let `sglang_mage.ops` resolve there too, so that examples and
# `python -m sglang_mage.demo` run from the repository root.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "ops")) and _os.path.isfile(_os.path.join(_root, "ops", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - the package's own search path
