"""The record each family module exports; kept apart so that family modules and the registry import it
without importing each other."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    family: str
    architectures: tuple[str, ...]
    block_size: int
    mask_id: int
    block_size_keys: tuple[str, ...] = ("block_size", "bd_size")
    mask_id_keys: tuple[str, ...] = ("mask_token_id", "mask_id")
