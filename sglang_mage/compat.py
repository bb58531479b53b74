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


# ---- post-import registration ------------------------------------------------------------------------------
# Hooks on SGLang modules that are expensive to import (the dLLM algorithm package pulls in ~900 modules)
# must not import them at plugin registration. `when_imported` runs a callback right after a module's
# first import, in whatever process imports it, or at once if it is already imported.

import importlib.abc  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any, Callable  # noqa: E402

_pending: dict[str, list[Callable[[Any], None]]] = {}
_lock = threading.Lock()


class _NotifyingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, name: str):
        self._inner, self._name = inner, name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        # The module is complete only now; give it back its own loader for everything that inspects it.
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        with _lock:
            callbacks = _pending.pop(self._name, [])
        for callback in callbacks:
            callback(module)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _NotifyingLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def when_imported(module_name: str, callback: Callable[[Any], None]) -> None:
    """Call `callback(module)` once `module_name` has been imported: now if it already is, else right after
    its first import finishes."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    with _lock:
        _pending.setdefault(module_name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def hook_when_imported(module_name: str, target: str, hook: Callable, hook_type: Any) -> None:
    """Register `hook` on `target` (a dotted path inside `module_name`) with SGLang's `HookRegistry` and
    patch it right after `module_name`'s first import, so that plugin registration does not import it.

    Only this hook is applied: `HookRegistry.apply_hooks()` would also apply other plugins' pending targets,
    possibly in the middle of an import chain. If another plugin's hooks on the same target are registered
    but not applied yet, ours joins them and their pending apply patches all of them at once."""

    def install(_module: Any) -> None:
        from sglang.srt.plugins.hook_registry import HookRegistry

        hooks = HookRegistry._hooks
        if any(h is hook for _, h, _ in hooks.get(target, ())):
            return
        others_pending = bool(hooks.get(target)) and target not in HookRegistry._patched
        HookRegistry.register(target, hook, hook_type)
        if others_pending:
            return
        try:
            HookRegistry._apply_target(target, [hooks[target][-1]])
            HookRegistry._patched.add(target)
        except Exception:  # noqa: BLE001 - SGLang's apply_hooks logs and goes on in the same way
            import logging

            logging.getLogger("sglang_mage").exception("sglang-mage: failed to apply hooks to %s", target)

    when_imported(module_name, install)
