"""sglang-mage: MAGE ([MASK]-guided sparse attention) for block-diffusion LLMs as an SGLang backend.

Importing this package is cheap: the backend, the Triton ops and FlashInfer load only when SGLang builds
the `mage` attention backend.
"""

__version__ = "0.1.0"

BACKEND_NAME = "mage"
