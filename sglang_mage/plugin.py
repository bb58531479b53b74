"""Entry point of the `sglang.srt.plugins` group: registers the `mage` attention backend.

SGLang calls `register()` in the main process and again in every scheduler process. It is idempotent and
cheap: it adds the backend name, a lazy factory and the server-argument hooks; the backend module, the
Triton ops and FlashInfer are imported only when SGLang builds a `mage` backend. Hooks on heavy SGLang modules
(chunked prefill, incremental radix caching of dLLM rounds, the dLLM config, FixedSteps, the Fast-dLLM v2 model and algorithm, SDAR's rotary config) are applied right after those modules' first import.

SGLang's loader logs and swallows exceptions raised here, so a failure is also remembered and re-raised
from the factory: asking for `--attention-backend mage` then fails at startup with the reason.
"""

from __future__ import annotations

import logging

from . import BACKEND_NAME

logger = logging.getLogger("sglang_mage")

_registered = False
_registration_error: BaseException | None = None


def create_mage_backend(model_runner):
    if _registration_error is not None:
        raise RuntimeError(f"sglang-mage failed to register: {_registration_error}") from _registration_error
    from .backend import MageAttnBackend

    return MageAttnBackend(model_runner)


def register() -> None:
    global _registered, _registration_error
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    # The name and the factory come first, so that a failure below still surfaces when `mage` is asked for.
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    ATTENTION_BACKENDS[BACKEND_NAME] = create_mage_backend
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry

        from .chunked_prefill import register_chunked_prefill_hooks
        from .compat import check_sglang_version
        from .forward_profile import register_forward_profile_hook
        from .hooks import register_server_args_hooks
        from .model_adapters.fast_dllm_v2 import register_fast_dllm_v2
        from .model_adapters.registry import install_dllm_config_hook
        from .model_adapters.schedules import register_schedules
        from .model_adapters.sdar import register_sdar_rope_fix
        from .radix_rounds import register_radix_rounds_hook

        check_sglang_version()
        register_server_args_hooks()
        register_chunked_prefill_hooks()
        register_radix_rounds_hook()
        register_forward_profile_hook()
        register_schedules()
        install_dllm_config_hook()
        register_fast_dllm_v2()
        register_sdar_rope_fix()
        # Inside SGLang's loader this is repeated right after us; outside it (tests, custom launchers)
        # the hooks would otherwise stay unapplied. apply_hooks skips targets it already patched.
        HookRegistry.apply_hooks()
        _registered = True
    except Exception as e:  # noqa: BLE001 - re-raised from the factory, see module docstring
        _registration_error = e
        logger.error("sglang-mage: registration failed: %s", e)
        raise
