"""The layers every family is built of, as pure functions: norms, RoPE, attention, MLP.

Weights are typed (see ``model.backends``): a layer calls ``w.apply(x)`` (one product) or
``w.apply_split(x, sizes)`` (the q/k/v or gate/up products of one input) and ``backend``'s
``write_kv``/``attend``, whatever the device path.

Dimension letters:
  B batch rows        T tokens in this call     S cache positions (span attended)
  D embed             N query heads             K kv heads      G = N // K
  H head dim          F mlp hidden              V vocab         L layers
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import AttentionSpec, ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Statistics in float32: bf16 squares lose too many bits for the mean.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, T, H) for rotate-half RoPE (``local``: the sliding layers' base), for
    a context of the T positions given."""
    # Angles in float32: bf16 positions lose integer precision past 256.
    inv_freq = jnp.asarray(cfg.inv_freq(local, context=positions.shape[-1]), dtype=jnp.float32)  # (H/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, H)
    scale = 1.0 if local else cfg.rope_attention_factor()
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def rope_tables(cfg: ModelConfig, length: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The global layers' ``rope_table``, then the sliding layers' where they have their own base."""
    if cfg.rope_local_theta is None:
        return (rope_table(cfg, length),)
    return rope_table(cfg, length), rope_table(cfg, length, local=True)


def uses_local_rope(cfg: ModelConfig, layer: int) -> bool:
    return cfg.rope_local_theta is not None and cfg.is_sliding(layer)


def rope_table(cfg: ModelConfig, length: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (length, H) for positions 0..length-1, as ``rope_cos_sin`` computes them.

    Steps look their positions up here instead of computing cos and sin: XLA fuses those
    into every layer's rope and evaluates them per element of q and k."""
    inv_freq = np.asarray(cfg.inv_freq(local, context=length), dtype=np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq  # float32, like rope_cos_sin
    angles = np.concatenate([angles, angles], axis=-1)
    scale = np.float32(1.0 if local else cfg.rope_attention_factor())
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H). HF's rotate-half layout, so converted q/k need no permutation."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def with_lora(lora: tuple | None, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y, a projection of x, plus each token's adapter update of ``target`` (``lora``: this
    layer's adapter slots and the tokens' column selection, see ``model.lora``; None: y)."""
    if lora is None or target not in lora[0]:
        return y
    bank, select = lora
    return y.reshape(*x.shape[:-1], -1) + bank[target].delta(x, select).astype(y.dtype)


def attention(
    cfg: ModelConfig,
    layer: dict[str, Any],
    x: jax.Array,  # (B, T, D), already normed
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,  # (B, T)
    kv: tuple[jax.Array, jax.Array],  # one layer's cache
    rows: jax.Array | None,  # block-table rows, as the backend takes them (see Backend.write_kv)
    span: int,
    backend: Any,
    live: jax.Array | None = None,
    spec: AttentionSpec | None = None,  # default: softmax(q.k / sqrt(H)) over 0..p
    tables: jax.Array | None = None,  # (slots, max blocks) int32 block tables
    lora: tuple | None = None,  # adapter slots and selection (see with_lora)
    limits: jax.Array | None = None,  # (B, T) the last position each query sees (see Backend.attend)
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    b, t, _ = x.shape
    n, k_heads, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = layer["qkv"].apply_split(x, (n * h, k_heads * h, k_heads * h), live)
    q, k, v = (with_lora(lora, name, x, y) for name, y in zip("qkv", (q, k, v)))
    q = q.astype(x.dtype).reshape(b, t, n, h)
    k = k.astype(x.dtype).reshape(b, t, k_heads, h)
    v = v.astype(x.dtype).reshape(b, t, k_heads, h)
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    if cfg.qk_norm:  # Qwen3: each head's q and k RMS-normed before RoPE
        q, k = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps), rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = backend.write_kv(kv, k, v, rows, positions, tables)
    spec = spec or AttentionSpec(scale=h ** -0.5)
    out = backend.attend(q, kv, rows, positions, span, spec, tables, limits).reshape(b, t, n * h)  # (B, T, N*H)
    return with_lora(lora, "o", out, layer["wo"].apply(out, live)).astype(x.dtype), kv


def activation(cfg: ModelConfig, gate: jax.Array) -> jax.Array:
    """The MLP gate's nonlinearity: SiLU, or (Gemma) tanh-approximated GELU."""
    return jax.nn.gelu(gate, approximate=True) if cfg.mlp_act == "gelu_tanh" else jax.nn.silu(gate)


def moe(cfg: ModelConfig, layer: dict[str, Any], x: jax.Array) -> jax.Array:
    """A mixture-of-experts MLP: each token's top-k experts by router softmax (in float32, as
    HF computes it), their outputs summed with those probabilities (renormalised to 1 with
    ``norm_topk_prob``). How the chosen experts are computed is the weights' own (see
    ``backends.xla.Experts``)."""
    b, t, d = x.shape
    experts = layer["experts"]
    flat = x.reshape(b * t, d)
    probs = jax.nn.softmax((flat @ experts.router).astype(jnp.float32), axis=-1)  # (M, E)
    top, chosen = jax.lax.top_k(probs, cfg.experts_per_token)  # (M, k)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    out = experts.apply(flat, top.astype(x.dtype), chosen, lambda g: activation(cfg, g))
    return out.reshape(b, t, d)


def mlp(cfg: ModelConfig, layer: dict[str, Any], x: jax.Array, live: jax.Array | None = None,
        lora: tuple | None = None) -> jax.Array:
    f = cfg.intermediate_size
    gate, up = layer["gate_up"].apply_split(x, (f, f), live)
    gate, up = with_lora(lora, "gate", x, gate), with_lora(lora, "up", x, up)
    hidden = activation(cfg, gate.astype(x.dtype)) * up.astype(x.dtype)
    return with_lora(lora, "down", hidden, layer["w_down"].apply(hidden, live)).astype(x.dtype)
