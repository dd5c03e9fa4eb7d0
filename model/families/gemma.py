"""Gemma 2 and Gemma 3 (text): Llama's attention and a gated MLP, with

- embeddings scaled by sqrt(D), and RMSNorm as ``x_normed * (1 + w)``: the converter stores
  ``1 + w``, so the shared ``rms_norm`` serves it;
- a norm before and after attention and before and after the MLP (``post_norms``);
- a gelu-tanh gate, scores scaled by ``query_pre_attn_scalar ** -0.5``;
- Gemma 2: attention-score and final-logit soft-capping;
- Gemma 3: q/k RMS-normed per head, and the sliding layers' own RoPE base;
- alternating sliding and global layers (``layer_types``, or the configs' older pattern).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, KeyTable, kv_proj, linear, layer, o_proj, q_proj, same, top

NAME = "gemma"
MODEL_TYPES = ("gemma2", "gemma3_text")
QKV_BIAS = False


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedConfigError("attention_bias=true is not supported for gemma")


def layer_types(cfg: Mapping[str, Any], layers: int) -> list[str]:
    """An older config without layer_types: Gemma 2 alternates (sliding first), Gemma 3 has
    one global layer in every ``sliding_window_pattern`` (6)."""
    pattern = 2 if cfg.get("model_type") == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def config_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    gemma3 = cfg.get("model_type") == "gemma3_text"
    return dict(
        qk_norm=gemma3,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_softcap=_cap(cfg.get("attn_logit_softcapping")),
        final_softcap=_cap(cfg.get("final_logit_softcapping")),
        embed_scale=math.sqrt(int(cfg["hidden_size"])),
        post_norms=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def _cap(value: Any) -> float | None:
    return None if value is None else float(value)


def plus_one(path):
    """A Gemma norm weight w, stored as the scale it applies: 1 + w (in float32, as HF adds it)."""
    return lambda w, cfg, m: [(path(m), np.asarray(w, np.float32) + 1.0)]


KEY_TABLE: KeyTable = [
    (r"model\.embed_tokens\.weight", same(top("embed"))),
    (r"model\.norm\.weight", plus_one(top("final_norm"))),
    (r"lm_head\.weight", linear(top("lm_head"))),
    (LAYER + r"input_layernorm\.weight", plus_one(layer("attn_norm"))),
    (LAYER + r"post_attention_layernorm\.weight", plus_one(layer("post_attn_norm"))),
    (LAYER + r"pre_feedforward_layernorm\.weight", plus_one(layer("mlp_norm"))),
    (LAYER + r"post_feedforward_layernorm\.weight", plus_one(layer("post_mlp_norm"))),
    (LAYER + r"self_attn\.q_proj\.weight", q_proj),
    (LAYER + r"self_attn\.k_proj\.weight", kv_proj("wk")),
    (LAYER + r"self_attn\.v_proj\.weight", kv_proj("wv")),
    (LAYER + r"self_attn\.o_proj\.weight", o_proj),
    (LAYER + r"self_attn\.q_norm\.weight", plus_one(layer("q_norm"))),
    (LAYER + r"self_attn\.k_norm\.weight", plus_one(layer("k_norm"))),
    (LAYER + r"mlp\.gate_proj\.weight", linear(layer("w_gate"))),
    (LAYER + r"mlp\.up_proj\.weight", linear(layer("w_up"))),
    (LAYER + r"mlp\.down_proj\.weight", linear(layer("w_down"))),
]
