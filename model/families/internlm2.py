"""InternLM2: Llama's math with its own key names and a packed ``wqkv``."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, ConversionError, KeyTable, Out, layer, linear, o_proj, same, top

NAME = "internlm2"
MODEL_TYPES = ("internlm2",)
QKV_BIAS = False


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("bias"):
        raise UnsupportedConfigError("InternLM2 bias=true is not supported")


def wqkv(w, cfg, m) -> Out:
    """The packed wqkv: rows grouped per KV head as [G query heads, k, v]."""
    k, g, h, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    if w.shape != ((g + 2) * k * h, d):
        raise ConversionError(f"{m[0]}: shape {w.shape}, expected {((g + 2) * k * h, d)}")
    w = w.reshape(k, g + 2, h, d)  # (K, G+2, H, D)
    q = w[:, :g].reshape(k * g, h, d).transpose(2, 0, 1)  # (D, N, H)
    i = int(m[1])
    return [(("layers", i, "wq"), q),
            (("layers", i, "wk"), w[:, g].transpose(2, 0, 1)),  # (D, K, H)
            (("layers", i, "wv"), w[:, g + 1].transpose(2, 0, 1))]


KEY_TABLE: KeyTable = [
    (r"model\.tok_embeddings\.weight", same(top("embed"))),
    (r"model\.norm\.weight", same(top("final_norm"))),
    (r"output\.weight", linear(top("lm_head"))),
    (LAYER + r"attention_norm\.weight", same(layer("attn_norm"))),
    (LAYER + r"ffn_norm\.weight", same(layer("mlp_norm"))),
    (LAYER + r"attention\.wqkv\.weight", wqkv),
    (LAYER + r"attention\.wo\.weight", o_proj),
    (LAYER + r"feed_forward\.w1\.weight", linear(layer("w_gate"))),
    (LAYER + r"feed_forward\.w3\.weight", linear(layer("w_up"))),
    (LAYER + r"feed_forward\.w2\.weight", linear(layer("w_down"))),
]
