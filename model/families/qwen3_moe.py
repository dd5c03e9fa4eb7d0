"""Qwen3-MoE: Qwen3's attention (q/k norms) with a mixture of experts in the layers that
``decoder_sparse_step`` and ``mlp_only_layers`` leave sparse (the rest have Qwen3's dense MLP).
The chosen experts' weights are renormalised only with ``norm_topk_prob``."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, KeyTable, linear, layer
from model.families.mixtral import expert
from model.families.qwen2 import layer_types  # noqa: F401  (Qwen2's max_window_layers rule)
from model.families.qwen3 import KEY_TABLE as QWEN3_KEYS

NAME = "qwen3_moe"
MODEL_TYPES = ("qwen3_moe",)
QKV_BIAS = False
QK_NORM = True


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedConfigError("attention_bias=true is not supported for qwen3_moe")
    if cfg.get("shared_expert_intermediate_size"):
        raise UnsupportedConfigError("shared experts (shared_expert_intermediate_size) are not supported")


def config_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    layers = int(cfg["num_hidden_layers"])
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)  # (transformers 5 saves the latter)
    dense = set(cfg.get("mlp_only_layers") or ())
    step = int(cfg.get("decoder_sparse_step") or 1)
    sparse = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers))
    return dict(num_experts=experts if any(sparse) else 0, experts_per_token=int(cfg["num_experts_per_tok"]),
                expert_size=int(cfg["moe_intermediate_size"]), norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_layers=() if all(sparse) else sparse)


KEY_TABLE: KeyTable = QWEN3_KEYS + [
    (LAYER + r"mlp\.gate\.weight", linear(layer("router"))),
    (LAYER + r"mlp\.experts\.(\d+)\.gate_proj\.weight", expert("we_gate")),
    (LAYER + r"mlp\.experts\.(\d+)\.up_proj\.weight", expert("we_up")),
    (LAYER + r"mlp\.experts\.(\d+)\.down_proj\.weight", expert("we_down")),
]
