"""Phi-3 / Phi-3.5-mini: Llama's math with q/k/v packed in one ``qkv_proj`` and gate/up in one
``gate_up_proj``; the 128k models' ``longrope`` scaling is read by ``model.config``. A partial
rotary factor below 1 is refused by name."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, ConversionError, KeyTable, Out
from model.families.llama import SHARED_KEYS

NAME = "phi3"
MODEL_TYPES = ("phi3",)
QKV_BIAS = False


def check_config(cfg: Mapping[str, Any]) -> None:
    rope = cfg.get("rope_parameters") or {}
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise UnsupportedConfigError(f"partial_rotary_factor={partial} is not supported (only 1.0)")


def layer_types(cfg: Mapping[str, Any], layers: int) -> list[str] | None:
    """Phi-3 windows every layer when its config sets sliding_window."""
    return ["sliding_attention"] * layers if cfg.get("sliding_window") is not None else None


def qkv_proj(w, cfg, m) -> Out:
    """Rows [q (N*H), k (K*H), v (K*H)] -> wq (D, N, H), wk and wv (D, K, H)."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if w.shape != ((n + 2 * k) * h, d):
        raise ConversionError(f"{m[0]}: shape {w.shape}, expected {((n + 2 * k) * h, d)}")
    q, kk, v = w[:n * h], w[n * h:(n + k) * h], w[(n + k) * h:]
    i = int(m[1])
    return [(("layers", i, "wq"), q.T.reshape(d, n, h)), (("layers", i, "wk"), kk.T.reshape(d, k, h)),
            (("layers", i, "wv"), v.T.reshape(d, k, h))]


def gate_up_proj(w, cfg, m) -> Out:
    """Rows [gate (F), up (F)] -> w_gate, w_up (D, F)."""
    f = cfg.intermediate_size
    if w.shape != (2 * f, cfg.hidden_size):
        raise ConversionError(f"{m[0]}: shape {w.shape}, expected {(2 * f, cfg.hidden_size)}")
    i = int(m[1])
    return [(("layers", i, "w_gate"), w[:f].T), (("layers", i, "w_up"), w[f:].T)]


KEY_TABLE: KeyTable = SHARED_KEYS + [
    (LAYER + r"self_attn\.qkv_proj\.weight", qkv_proj),
    (LAYER + r"mlp\.gate_up_proj\.weight", gate_up_proj),
]
