"""SDAR and SDAR-MoE / TraDo: SGLang 0.5.14's own model classes (`sglang.srt.models.sdar`, `sdar_moe`) serve
them; the plugin supplies their denoising parameters and one config fix. Block size 4 and [MASK] 151669 are the
defaults SGLang hard-codes; a model's config.json (`block_size` / `bd_size`, `mask_token_id` / `mask_id`)
overrides them."""

from __future__ import annotations

from .spec import AdapterSpec

SPECS = (
    AdapterSpec("sdar", ("SDARForCausalLM",), block_size=4, mask_id=151669),
    AdapterSpec("sdar-moe", ("SDARMoeForCausalLM",), block_size=4, mask_id=151669),
)

# SGLang model classes that read the rotary settings as `config.rope_theta` / `config.rope_scaling`.
_LEGACY_ROPE_CLASSES = (("sglang.srt.models.sdar", "SDARForCausalLM"), ("sglang.srt.models.sdar_moe", "SDARMoeForCausalLM"))


def restore_legacy_rope_attributes(config) -> None:
    """transformers 5 keeps a config.json's `rope_theta` / `rope_scaling` only inside `config.rope_parameters`.
    SGLang 0.5.14's SDAR classes read the old attributes with defaults (10000, None), so an SDAR checkpoint
    (rope_theta 1e6) would silently run with the wrong rotary base. Copy the values back where they are
    missing; configs that still carry them (transformers 4) are left alone."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return
    if getattr(config, "rope_theta", None) is None and params.get("rope_theta") is not None:
        config.rope_theta = params["rope_theta"]
    if getattr(config, "rope_scaling", None) is None and params.get("rope_type", "default") != "default":
        config.rope_scaling = dict(params)


def _wrap_init(module, class_name: str) -> None:
    cls = getattr(module, class_name)
    original = cls.__init__
    if getattr(original, "_sglang_mage", False):
        return

    def __init__(self, config, *args, **kwargs):
        restore_legacy_rope_attributes(config)
        original(self, config, *args, **kwargs)

    __init__._sglang_mage = True
    cls.__init__ = __init__


def register_sdar_rope_fix() -> None:
    """Why: see `restore_legacy_rope_attributes`. Applied right after each SDAR model module's first import
    (SGLang's model registry imports them; registration must not). Remove when SGLang's SDAR classes read
    `get_rope_config(config)` as its Qwen2/Qwen3/LLaDA2 classes do."""
    from sglang_mage.compat import when_imported

    for module_name, class_name in _LEGACY_ROPE_CLASSES:
        when_imported(module_name, lambda module, name=class_name: _wrap_init(module, name))
