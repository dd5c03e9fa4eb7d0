"""Mixtral: Mistral's attention with a mixture of experts in every layer: a router picks each
token's top ``num_experts_per_tok`` of ``num_local_experts`` SwiGLU experts, whose outputs are
summed with the chosen routing weights renormalised to 1."""

from __future__ import annotations

from typing import Any, Mapping

from model.config import UnsupportedConfigError
from model.convert.transforms import LAYER, KeyTable, Out, kv_proj, linear, layer, q_proj
from model.families.llama import SHARED_KEYS

NAME = "mixtral"
MODEL_TYPES = ("mixtral",)
QKV_BIAS = False


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedConfigError("attention_bias=true is not supported for mixtral")
    # router_jitter_noise and router_aux_loss_coef act in training only: no-ops here.


def layer_types(cfg: Mapping[str, Any], layers: int) -> list[str] | None:
    """Mixtral windows every layer when its config sets sliding_window (as Mistral)."""
    return ["sliding_attention"] * layers if cfg.get("sliding_window") is not None else None


def config_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return dict(num_experts=int(cfg["num_local_experts"]), experts_per_token=int(cfg["num_experts_per_tok"]),
                expert_size=int(cfg["intermediate_size"]), norm_topk_prob=True)


def expert(name: str):
    """One expert's (out, in) Linear weight -> its slice (in, out) of the stacked ``name``."""
    def f(w, cfg, m) -> Out:
        return [(("layers", int(m[1]), name, int(m[2])), w.T)]
    return f


KEY_TABLE: KeyTable = [(k, fn) for k, fn in SHARED_KEYS if "mlp" not in k] + [
    (LAYER + r"self_attn\.q_proj\.weight", q_proj),
    (LAYER + r"self_attn\.k_proj\.weight", kv_proj("wk")),
    (LAYER + r"self_attn\.v_proj\.weight", kv_proj("wv")),
    (LAYER + r"block_sparse_moe\.gate\.weight", linear(layer("router"))),
    (LAYER + r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", expert("we_gate")),
    (LAYER + r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", expert("we_up")),
    (LAYER + r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", expert("we_down")),
]
