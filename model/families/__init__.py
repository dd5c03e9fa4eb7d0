"""Model families: each is one short module naming the HF ``model_type`` values it serves, the
config attributes it refuses, and its converter key table. The math they share is in
``model.layers`` and ``model.transformer``; what sets a family apart from Llama is carried by
``ModelConfig`` fields (``qkv_bias``, ``qk_norm``), so the forward pass never asks which family it runs.

Adding a family: a module here with ``NAME``, ``MODEL_TYPES``, ``check_config`` and
``KEY_TABLE``, listed in ``_MODULES``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from model.families import gemma, internlm2, llama, mixtral, phi3, qwen2, qwen3, qwen3_moe

_MODULES: tuple[ModuleType, ...] = (llama, qwen2, qwen3, phi3, gemma, mixtral, qwen3_moe, internlm2)
FAMILIES: dict[str, ModuleType] = {m.NAME: m for m in _MODULES}
MODEL_TYPES: dict[str, str] = {t: m.NAME for m in _MODULES for t in m.MODEL_TYPES}


def family(name: str) -> ModuleType:
    return FAMILIES[name]


def check_config(name: str, hf_cfg: Mapping[str, Any]) -> None:
    """Refuse, by name, what the family's config asks for and we do not implement."""
    FAMILIES[name].check_config(hf_cfg)
