"""Qwen3 (dense): Llama's layers with each head's q and k RMS-normed before RoPE
(``ModelConfig.qk_norm``), no q/k/v bias, and ``head_dim`` apart from hidden / heads."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, KeyTable, layer, same
from model.families.llama import KEY_TABLE as LLAMA_KEYS
from model.families.qwen2 import layer_types  # noqa: F401  (Qwen2's max_window_layers rule)

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)
QKV_BIAS = False
QK_NORM = True


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedConfigError("attention_bias=true is not supported for qwen3")


KEY_TABLE: KeyTable = LLAMA_KEYS + [
    (LAYER + r"self_attn\.q_norm\.weight", same(layer("q_norm"))),
    (LAYER + r"self_attn\.k_norm\.weight", same(layer("k_norm"))),
]
