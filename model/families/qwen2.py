"""Qwen2: Llama's layers with a bias on q, k and v (``ModelConfig.qkv_bias``)."""

from __future__ import annotations

from typing import Any, Mapping

from model.families.llama import KEY_TABLE  # noqa: F401  (the same HF names as Llama)

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)
QKV_BIAS = True


def check_config(cfg: Mapping[str, Any]) -> None:
    pass
