"""Block-diffusion model families SGLang can serve with the plugin, and their denoising parameters.

SGLang 0.5.14 hard-codes three architectures with a fixed block size and [MASK] id (`DllmConfig`). Here each
family is an `AdapterSpec`; its block size and mask id come, in this order of precedence, from
`--dllm-algorithm-config` (YAML keys `block_size`, `mask_id`), the model's config.json (the keys listed in
the spec), and the family's defaults. `install_dllm_config_hook` makes SGLang's `DllmConfig` use this table.
The families themselves are defined in sdar.py, llada2.py and fast_dllm_v2.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from . import fast_dllm_v2, llada2, sdar
from .spec import AdapterSpec

__all__ = ["ADAPTERS", "AdapterSpec", "UnsupportedArchitectureError", "find_adapter", "resolve_block_params",
           "supported_architectures", "install_dllm_config_hook"]


class UnsupportedArchitectureError(RuntimeError):
    pass


# One module per family; each exports SPECS. SDAR, SDAR-MoE and LLaDA2-MoE use SGLang's own model classes,
# Fast-dLLM v2 the plugin's (fast_dllm_v2_model.py).
ADAPTERS: dict[str, AdapterSpec] = {spec.family: spec for module in (sdar, llada2, fast_dllm_v2) for spec in module.SPECS}


def supported_architectures() -> list[str]:
    return sorted(a for spec in ADAPTERS.values() for a in spec.architectures)


def find_adapter(architecture: str) -> AdapterSpec:
    for spec in ADAPTERS.values():
        if architecture in spec.architectures:
            return spec
    raise UnsupportedArchitectureError(
        f"no block-diffusion adapter for architecture {architecture!r}; supported: "
        f"{', '.join(supported_architectures())}"
    )


def _first(mapping: Any, keys: tuple[str, ...]) -> Optional[Any]:
    for key in keys:
        value = mapping.get(key) if isinstance(mapping, Mapping) else getattr(mapping, key, None)
        if value is not None:
            return value
    return None


def resolve_block_params(spec: AdapterSpec, hf_config: Any, overrides: Mapping[str, Any]) -> tuple[int, int]:
    """(block_size, mask_id) for a model; raises ValueError naming the source of a bad value."""
    vocab = getattr(hf_config, "vocab_size", None)
    out = []
    for name, keys, default in (("block_size", spec.block_size_keys, spec.block_size),
                                ("mask_id", spec.mask_id_keys, spec.mask_id)):
        if overrides.get(name) is not None:
            value, source = overrides[name], f"--dllm-algorithm-config {name}"
        elif _first(hf_config, keys) is not None:
            value, source = _first(hf_config, keys), f"config.json ({'/'.join(keys)})"
        else:
            value, source = default, f"the {spec.family} default"
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "block_size" else 0):
            raise ValueError(f"{spec.family}: invalid {name} {value!r} from {source}")
        if name == "mask_id" and vocab is not None and value >= vocab:
            raise ValueError(f"{spec.family}: mask_id {value} from {source} is outside the vocabulary ({vocab})")
        out.append(value)
    return out[0], out[1]


def _dllm_config_from_server_args(server_args):
    """Replacement for `DllmConfig.from_server_args`: the same DllmConfig, built from the adapter table."""
    if server_args.dllm_algorithm is None:
        return None
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.dllm.config import DllmConfig

    model_config = ModelConfig.from_server_args(
        server_args, model_path=server_args.model_path, model_revision=server_args.revision
    )
    spec = find_adapter(model_config.hf_config.architectures[0])
    algorithm_config: dict = {}
    if server_args.dllm_algorithm_config is not None:
        import yaml

        with open(server_args.dllm_algorithm_config) as f:
            algorithm_config = yaml.safe_load(f) or {}
    block_size, mask_id = resolve_block_params(spec, model_config.hf_config, algorithm_config)
    max_running = 1 if server_args.max_running_requests is None else server_args.max_running_requests
    return DllmConfig(
        algorithm=server_args.dllm_algorithm, algorithm_config=algorithm_config, block_size=block_size,
        mask_id=mask_id, max_running_requests=max_running,
    )


def _patch_dllm_config(module) -> None:
    cls = module.DllmConfig
    if getattr(cls.from_server_args, "_sglang_mage", False):
        return
    _dllm_config_from_server_args._sglang_mage = True
    cls.from_server_args = staticmethod(_dllm_config_from_server_args)


def install_dllm_config_hook() -> None:
    """Why: `DllmConfig.from_server_args` hard-codes three architectures and their block size and mask id;
    every part of SGLang's dLLM path builds its config through it. After `sglang.srt.dllm.config` is first
    imported (not at registration: it imports SGLang's model config stack), replace it by the adapter-table
    version above. Remove when SGLang reads these from a registry or the model config."""
    from sglang_mage.compat import when_imported

    when_imported("sglang.srt.dllm.config", _patch_dllm_config)
