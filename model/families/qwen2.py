"""Qwen2: Llama's layers with a bias on q, k and v (``ModelConfig.qkv_bias``)."""

from __future__ import annotations

from typing import Any, Mapping

from model.families.llama import KEY_TABLE  # noqa: F401  (the same HF names as Llama)

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)
QKV_BIAS = True


def check_config(cfg: Mapping[str, Any]) -> None:
    pass


def layer_types(cfg: Mapping[str, Any], layers: int) -> list[str] | None:
    """With use_sliding_window, the layers from max_window_layers on are windowed (an older
    config without layer_types)."""
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return None
    first = int(cfg.get("max_window_layers", layers))
    return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
