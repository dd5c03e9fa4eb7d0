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
MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
QKV_BIAS = False
# Gemma3TextConfig's defaults: the text configs inside Gemma 3's vision-language checkpoints
# (4B, 12B, 27B) leave most fields to them.
GEMMA3_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                       sliding_window=4096, sliding_window_pattern=6, tie_word_embeddings=True,
                       bos_token_id=2, eos_token_id=1)


def normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A Gemma 3 vision-language config (model_type gemma3) as its text model's: the language
    model is served, the vision tower is not converted; Gemma 3 text fields it omits take
    transformers' defaults."""
    cfg = dict(cfg)
    if cfg.get("model_type") == "gemma3":
        text = dict(cfg.get("text_config") or {})
        for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "dtype", "torch_dtype"):
            if key in cfg and key not in text:
                text[key] = cfg[key]
        cfg = {**text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    if cfg.get("model_type") == "gemma3_text":
        uses_new_rope = isinstance(cfg.get("rope_parameters"), Mapping)
        cfg = {**{k: v for k, v in GEMMA3_DEFAULTS.items()
                  if not (uses_new_rope and k in ("rope_theta", "rope_local_base_freq"))}, **cfg}
    return cfg


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


def dropped(w, cfg, m) -> list:
    """A vision-language checkpoint's vision tower and projector: not served, not converted."""
    return []


def plus_one(path):
    """A Gemma norm weight w, stored as the scale it applies: 1 + w (in float32, as HF adds it)."""
    return lambda w, cfg, m: [(path(m), np.asarray(w, np.float32) + 1.0)]


_TEXT_KEYS: KeyTable = [
    (r"model\.embed_tokens\.weight", same(top("embed"))),
    (r"model\.norm\.weight", plus_one(top("final_norm"))),
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
# A text checkpoint's keys, or a vision-language one's language model under "language_model."
# (or, as transformers 5 names it in memory, "model.language_model.").
KEY_TABLE: KeyTable = [(r"(?:language_model\.)?" + k.replace(r"model\.", r"model\.(?:language_model\.)?", 1), fn)
                       for k, fn in _TEXT_KEYS] + [
    (r"(?:language_model\.)?lm_head\.weight", linear(top("lm_head"))),
    (r"(?:model\.)?(?:vision_tower|multi_modal_projector)\..*", dropped),
]
