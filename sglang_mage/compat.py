"""The SGLang version gate. Every other module names SGLang internals only through imports that this gate
has approved, so an unsupported SGLang fails at startup with one clear message instead of deep inside a
forward pass."""

from __future__ import annotations

SUPPORTED_SGLANG = "0.5.14"


class UnsupportedSGLangError(RuntimeError):
    pass


def sglang_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return None


def check_sglang_version() -> str:
    found = sglang_version()
    if found is None:
        raise UnsupportedSGLangError(
            f"sglang-mage needs sglang=={SUPPORTED_SGLANG}, but sglang is not installed"
        )
    if found != SUPPORTED_SGLANG:
        raise UnsupportedSGLangError(
            f"sglang-mage {__import__('sglang_mage').__version__} is built against sglang=={SUPPORTED_SGLANG} "
            f"(it hooks internals that change between releases); found sglang=={found}"
        )
    return found
