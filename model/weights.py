"""Each weight described once: shape, logical axes. That one table drives abstract shapes
(for restore), shardings (``sharding/``), random init (tests) and the converter's checks.

The param pytree is plain nested dicts and lists of arrays:

    {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V) unless tied,
     "layers": [{"attn_norm", "wq", "wk", "wv", ["bq", "bk", "bv"], ["q_norm", "k_norm"], "wo",
                 ["post_attn_norm"], "mlp_norm", "w_gate", "w_up", "w_down", ["post_mlp_norm"]}, ...]}

An MoE layer has "router" (D, E) and the experts "we_gate", "we_up" (E, D, F_e) and "we_down"
(E, F_e, D) in place of the dense MLP's three.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str = "normal"  # "normal" (matrices) or "ones" (norm scales) or "zeros" (biases)


def layer_specs(cfg: ModelConfig, layer: int = 0) -> dict[str, WeightSpec]:
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                     cfg.num_kv_heads, cfg.head_dim)
    specs = {
        "attn_norm": WeightSpec((d,), ("norm",), "ones"),
        "wq": WeightSpec((d, n, h), ("embed", "heads", "head_dim")),
        "wk": WeightSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wv": WeightSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wo": WeightSpec((n, h, d), ("heads", "head_dim", "embed")),
        "mlp_norm": WeightSpec((d,), ("norm",), "ones"),
    }
    if cfg.is_moe(layer):  # the router, and the experts stacked on a leading axis
        e, fe = cfg.num_experts, cfg.expert_size
        specs["router"] = WeightSpec((d, e), ("embed", None))
        specs["we_gate"] = WeightSpec((e, d, fe), ("experts", "embed", "expert_mlp"))
        specs["we_up"] = WeightSpec((e, d, fe), ("experts", "embed", "expert_mlp"))
        specs["we_down"] = WeightSpec((e, fe, d), ("experts", "expert_mlp", "embed"))
    else:
        specs["w_gate"] = WeightSpec((d, f), ("embed", "mlp"))
        specs["w_up"] = WeightSpec((d, f), ("embed", "mlp"))
        specs["w_down"] = WeightSpec((f, d), ("mlp", "embed"))
    if cfg.qkv_bias:
        specs["bq"] = WeightSpec((n, h), ("heads", "head_dim"), "zeros")
        specs["bk"] = WeightSpec((k, h), ("kv_heads", "head_dim"), "zeros")
        specs["bv"] = WeightSpec((k, h), ("kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        specs["q_norm"] = WeightSpec((h,), ("head_dim",), "ones")
        specs["k_norm"] = WeightSpec((h,), ("head_dim",), "ones")
    if cfg.post_norms:
        specs["post_attn_norm"] = WeightSpec((d,), ("norm",), "ones")
        specs["post_mlp_norm"] = WeightSpec((d,), ("norm",), "ones")
    return specs


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The full param tree of WeightSpecs."""
    specs: dict[str, Any] = {
        "embed": WeightSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")),
        "layers": [layer_specs(cfg, i) for i in range(cfg.num_layers)],
        "final_norm": WeightSpec((cfg.hidden_size,), ("norm",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    return specs


def is_spec(x: Any) -> bool:
    return isinstance(x, WeightSpec)


def abstract_params(cfg: ModelConfig, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for restore; ``shardings`` is a matching tree or None."""
    dtype = jnp.dtype(cfg.dtype)
    specs = param_specs(cfg)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
        specs, shardings, is_leaf=is_spec,
    )


def init_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> Any:
    """Random params for tests (numpy on the host, then device arrays)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(cfg.dtype)

    def make(spec: WeightSpec):
        if spec.init == "ones":
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif spec.init == "zeros":
            value = 0.1 * rng.standard_normal(spec.shape)
        else:
            value = scale * rng.standard_normal(spec.shape)
        return jnp.asarray(value.astype(np.float32), dtype=dtype)

    return jax.tree.map(make, param_specs(cfg), is_leaf=is_spec)


class WeightsError(ValueError):
    """A param tree that does not fit the model: names the tensor (one line)."""


def _leaf_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_params(cfg: ModelConfig, params: Any) -> Any:
    """``params`` (nested dicts and lists, or dicts keyed "0", "1", ... for the layers; arrays of
    any kind and placement) checked against the model's table before anything uses them: every
    tensor present, none extra, each of its shape and a floating dtype. Returns the tree in the
    table's own structure, its leaves as given. Raises WeightsError naming the first tensor
    that does not fit."""
    specs = param_specs(cfg)
    want, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    got = {_leaf_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    names = [_leaf_name(path) for path, _ in want]
    missing = [n for n in names if n not in got]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"tensor {missing[0]} is missing{more}")
    extra = sorted(set(got) - set(names))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"tensor {extra[0]} is not a weight of this model{more}")
    for name, (_, spec) in zip(names, want):
        x = got[name]
        shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
        if shape != spec.shape:
            raise WeightsError(f"tensor {name} has shape {shape}, the model's is {spec.shape}")
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise WeightsError(f"tensor {name} has dtype {dtype}, not a floating type")
    return jax.tree_util.tree_unflatten(treedef, [got[n] for n in names])
