"""Llama 2/3/3.x, Mistral (full attention) and SmolLM: the reference family."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import (LAYER, KeyTable, head_bias, kv_proj, layer, linear, o_proj,
                                      q_proj, same, top)

NAME = "llama"
MODEL_TYPES = ("llama", "mistral")
QKV_BIAS = False


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedConfigError("attention_bias=true (bias on o_proj) is not supported")


def layer_types(cfg: Mapping[str, Any], layers: int) -> list[str] | None:
    """Mistral windows every layer when its config sets sliding_window."""
    if cfg.get("model_type") == "mistral" and cfg.get("sliding_window") is not None:
        return ["sliding_attention"] * layers
    return None


# HF key regex -> transform into our param tree. The keys every Llama-like layout shares
# (families that pack q/k/v or gate/up differently add their own for those).
SHARED_KEYS: KeyTable = [
    (r"model\.embed_tokens\.weight", same(top("embed"))),
    (r"model\.norm\.weight", same(top("final_norm"))),
    (r"lm_head\.weight", linear(top("lm_head"))),
    (LAYER + r"input_layernorm\.weight", same(layer("attn_norm"))),
    (LAYER + r"post_attention_layernorm\.weight", same(layer("mlp_norm"))),
    (LAYER + r"self_attn\.o_proj\.weight", o_proj),
    (LAYER + r"mlp\.down_proj\.weight", linear(layer("w_down"))),
]
KEY_TABLE: KeyTable = SHARED_KEYS + [
    (LAYER + r"self_attn\.q_proj\.weight", q_proj),
    (LAYER + r"self_attn\.k_proj\.weight", kv_proj("wk")),
    (LAYER + r"self_attn\.v_proj\.weight", kv_proj("wv")),
    (LAYER + r"self_attn\.q_proj\.bias", head_bias("bq", "num_heads")),
    (LAYER + r"self_attn\.k_proj\.bias", head_bias("bk", "num_kv_heads")),
    (LAYER + r"self_attn\.v_proj\.bias", head_bias("bv", "num_kv_heads")),
    (LAYER + r"mlp\.gate_proj\.weight", linear(layer("w_gate"))),
    (LAYER + r"mlp\.up_proj\.weight", linear(layer("w_up"))),
]
