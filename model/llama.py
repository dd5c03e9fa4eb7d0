"""The Llama-family transformer (Llama 2/3, Mistral, SmolLM2, Qwen2, InternLM2) as pure
functions over the param tree described in ``model.weights``.

Dimension letters:
  B batch rows        T tokens in this call     S cache positions (span attended)
  D embed             N query heads             K kv heads      G = N // K
  H head dim          F mlp hidden              V vocab         L layers

Packed params (``pack_params``, native CPU kernels on one device): each layer's q/k/v and
gate/up weights are fused, and every projection and the output head are stored as column
panels for ``cpu_kernels.matmul``; a tied embedding is then read from the packed head.

KV cache: a list over layers of ``(k, v)``, each ``(B_cache, S_max, K, H)``. Writes are
scatters at each token's position, so with a donated cache they happen in place; no step
copies the cache. Attention reads only the first ``span`` positions (a static bucket), so
decode cost follows the live context, not the allocated length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import cpu_kernels
from model.config import ModelConfig

KVCache = list  # list[tuple[jax.Array, jax.Array]], one (k, v) pair per layer


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Statistics in float32: bf16 squares lose too many bits for the mean.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, T, H) for rotate-half RoPE."""
    # Angles in float32: bf16 positions lose integer precision past 256.
    inv_freq = jnp.asarray(cfg.inv_freq(), dtype=jnp.float32)  # (H/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, H)
    return jnp.cos(angles), jnp.sin(angles)


def rope_table(cfg: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (length, H) for positions 0..length-1, as ``rope_cos_sin`` computes them.

    Steps look their positions up here (``forward``'s ``rope``) instead of computing cos and
    sin: XLA fuses those into every layer's rope and evaluates them per element of q and k,
    which cost a tenth of a 128-token prefill on the CPU."""
    inv_freq = np.asarray(cfg.inv_freq(), dtype=np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq  # float32, like rope_cos_sin
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H). HF's rotate-half layout, so converted q/k need no permutation."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention(
    cfg: ModelConfig,
    layer: dict[str, jax.Array],
    x: jax.Array,  # (B, T, D), already normed
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,  # (B, T)
    kv: tuple[jax.Array, jax.Array],  # each (B_cache, S_max, K, H)
    rows: jax.Array | None,  # (B,) cache row of each batch row, (B, T) of each token (kernel
    #                          only); None: row b is cache row b
    span: int,
    attn_kernel: bool = False,
    live: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    b, t, d = x.shape
    k_heads, g, h = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    if "wqkv" in layer:  # packed: one kernel call for q, k and v
        nq, nk = k_heads * g * h, k_heads * h
        qkv = cpu_kernels.matmul(x, layer["wqkv"], nq + 2 * nk, live).astype(x.dtype)
        q = qkv[..., :nq].reshape(b, t, k_heads * g, h)
        k = qkv[..., nq:nq + nk].reshape(b, t, k_heads, h)
        v = qkv[..., nq + nk:].reshape(b, t, k_heads, h)
    else:
        # Projections as plain 2-D matmuls over merged (heads x head_dim) columns: XLA's CPU
        # dot runs a 3-D-weight einsum through extra copies (measured 2x slower at batch 1).
        q = (x @ layer["wq"].reshape(d, -1)).reshape(b, t, k_heads * g, h)
        k = (x @ layer["wk"].reshape(d, -1)).reshape(b, t, k_heads, h)
        v = (x @ layer["wv"].reshape(d, -1)).reshape(b, t, k_heads, h)
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    k_cache, v_cache = kv
    # Each token's K/V lands at its own position of its row; padding (a position past the
    # end, or with per-token rows a row out of range) is dropped.
    if rows is None:
        write_rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    elif rows.ndim == 2:
        if not attn_kernel:
            raise ValueError("per-token cache rows need the native attention kernel")
        write_rows = rows
    else:
        write_rows = rows[:, None]
    k_cache = k_cache.at[write_rows, positions].set(cpu_kernels.to_cache(k, k_cache.dtype), mode="drop")
    v_cache = v_cache.at[write_rows, positions].set(cpu_kernels.to_cache(v, v_cache.dtype), mode="drop")
    if attn_kernel:
        # The native kernel reads each query's own positions 0..p of its row; a prefill
        # chunk's T queries are T kernel rows on the same cache row.
        q_rows = jnp.broadcast_to(write_rows, (b, t)).reshape(b * t)
        out = cpu_kernels.decode_attention(q.reshape(b * t, k_heads * g, h), k_cache, v_cache, q_rows,
                                           positions.reshape(b * t) + 1)
        out = out.astype(x.dtype)
    else:
        if rows is None:  # a slice, not a gather: decode over all rows copies nothing
            keys, values = k_cache[:, :span], v_cache[:, :span]  # (B, S, K, H)
        else:
            keys, values = k_cache[rows, :span], v_cache[rows, :span]  # (B, S, K, H)

        q = q.reshape(b, t, k_heads, g, h)  # (B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (1.0 / np.sqrt(h))
        # A query at position p sees cache positions 0..p: its own prompt, earlier turns, itself.
        visible = jnp.arange(span)[None, None, :] <= positions[:, :, None]  # (B, T, S)
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, values.astype(x.dtype))
    out = out.reshape(b, t, k_heads * g * h)  # (B, T, N*H)
    if "wqkv" in layer:
        return cpu_kernels.matmul(out, layer["wo"], d, live).astype(x.dtype), (k_cache, v_cache)
    return out @ layer["wo"].reshape(-1, d), (k_cache, v_cache)


def mlp(cfg: ModelConfig, layer: dict[str, jax.Array], x: jax.Array, live: jax.Array | None = None) -> jax.Array:
    if "w_gate_up" in layer:  # packed: gate and up in one kernel call
        f = cfg.intermediate_size
        gate_up = cpu_kernels.matmul(x, layer["w_gate_up"], 2 * f, live).astype(x.dtype)
        hidden = jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]
        return cpu_kernels.matmul(hidden, layer["w_down"], cfg.hidden_size, live).astype(x.dtype)
    gate = jnp.einsum("btd,df->btf", x, layer["w_gate"])
    up = jnp.einsum("btd,df->btf", x, layer["w_up"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, layer["w_down"])


def embed(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, D) embeddings; from the packed head when a tied one is packed.
    Packed params compute in float32 whatever their weights' dtype."""
    if "head" not in params:
        return params["embed"][tokens]
    if "embed" in params:
        return params["embed"][tokens].astype(jnp.float32)
    return cpu_kernels.columns(params["head"], tokens, params["final_norm"].shape[0])  # (B, T, D)


def pack_params(params: dict[str, Any], cfg: ModelConfig, quantize: str | None = None) -> dict[str, Any]:
    """The param tree in the native CPU kernels' layout (see the module docstring). Matrices
    stay bfloat16 when the model is (half the bytes to stream per token; the kernel widens
    them to float32 as it loads them), float16 ones become float32; ``quantize="int8"``
    stores them as int8 with a scale per output column instead (a quarter of float32's bytes),
    ``"w8a8"`` the same int8 weights multiplied by int8 activations (quantized per row and
    block of 64 as they come; four times the multiply-adds per instruction).
    Norms and biases become float32, the dtype the packed model computes and caches in. The
    inputs are not kept: with the returned tree, the originals can be freed."""
    if quantize not in (None, "int8", "w8a8"):
        raise ValueError(f"quantize: int8, w8a8 or None, not {quantize!r}")
    wdtype = quantize or ("bfloat16" if jnp.dtype(cfg.dtype) == jnp.bfloat16 else "float32")
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731

    def layer_packed(layer):
        d = cfg.hidden_size
        out = {"attn_norm": f32(layer["attn_norm"]), "mlp_norm": f32(layer["mlp_norm"])}
        qkv = jnp.concatenate([layer[w].reshape(d, -1) for w in ("wq", "wk", "wv")], axis=1)
        out["wqkv"] = cpu_kernels.pack(qkv, wdtype)
        out["wo"] = cpu_kernels.pack(layer["wo"].reshape(-1, d), wdtype)
        out["w_gate_up"] = cpu_kernels.pack(jnp.concatenate([layer["w_gate"], layer["w_up"]], axis=1),
                                            wdtype)
        out["w_down"] = cpu_kernels.pack(layer["w_down"], wdtype)
        for bias in ("bq", "bk", "bv"):
            if bias in layer:
                out[bias] = f32(layer[bias])
        return out

    pack_layer = jax.jit(layer_packed)
    packed: dict[str, Any] = {"final_norm": f32(params["final_norm"]),
                              "layers": [pack_layer(layer) for layer in params["layers"]]}
    if cfg.tie_word_embeddings:
        packed["head"] = jax.jit(lambda e: cpu_kernels.pack(e.T, wdtype))(params["embed"])
    else:
        packed["embed"] = params["embed"]
        packed["head"] = jax.jit(lambda h: cpu_kernels.pack(h, wdtype))(params["lm_head"])
    return packed


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,  # (B, T) int32
    positions: jax.Array,  # (B, T) int32, absolute positions in each row's sequence
    cache: KVCache,
    span: int,
    rows: jax.Array | None = None,  # (B,) cache rows, or (B, T) per token; None: row b
    attn_kernel: bool = False,
    rope: tuple[jax.Array, jax.Array] | None = None,
    live: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the blocks; returns final-normed hidden states (B, T, D) and the updated cache.

    Works for prefill (T > 1, any start position: chunked prefill, session turns) and decode
    (T == 1) alike. ``span`` (static) bounds the attended cache prefix and must exceed every
    position in ``positions`` that matters. ``attn_kernel``: attend through the native CPU
    kernel (``model.cpu_kernels``; float32 cache, one device), which reads each query's own
    context and ignores ``span``; only it takes ``rows`` per token, so one call can prefill
    chunks of several sequences packed into one row of tokens. ``rope``: a ``rope_table`` to look cos/sin up in (positions
    past its end, padding, read its last row) instead of computing them. ``live`` (int32
    scalar, packed params only): the first ``live`` of the B * T rows hold data and padding
    follows them; the projections skip the padding (its outputs are zeros).
    """
    x = embed(params, tokens)  # (B, T, D)
    if rope is None:
        cos, sin = rope_cos_sin(cfg, positions)
    else:
        cos, sin = (jnp.take(t, positions, axis=0, mode="clip") for t in rope)
    new_cache = []
    for layer, kv in zip(params["layers"], cache):
        with jax.named_scope("attention"):
            h, kv = attention(cfg, layer, rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps),
                              cos, sin, positions, kv, rows, span, attn_kernel, live)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + mlp(cfg, layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), live)
        new_cache.append(kv)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), new_cache


def logits(params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array,
           live: jax.Array | None = None) -> jax.Array:
    """(..., D) -> (..., V) float32 logits, tied or untied head (``live`` as in ``forward``)."""
    if "head" in params:  # packed
        return cpu_kernels.matmul(hidden, params["head"], cfg.vocab_size, live)
    if cfg.tie_word_embeddings:
        out = jnp.einsum("...d,vd->...v", hidden, params["embed"])
    else:
        out = jnp.einsum("...d,dv->...v", hidden, params["lm_head"])
    return out.astype(jnp.float32)


def init_cache(cfg: ModelConfig, rows: int, length: int, dtype: Any = None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (rows, length, cfg.num_kv_heads, cpu_kernels.cache_head_size(cfg.head_dim, dtype))
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def full_logits(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array,
                attn_kernel: bool = False, kv_dtype: Any = None) -> jax.Array:
    """Uncached forward over whole sequences (B, T) -> (B, T, V); the reference path.
    ``attn_kernel``: attention through the native CPU kernel, over a cache of ``kv_dtype``
    (default float32; as the kernel stores it: see ``cpu_kernels.to_cache``)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, b, t, (kv_dtype or jnp.float32) if attn_kernel else None)
    hidden, _ = forward(params, cfg, tokens, positions, cache, span=t, attn_kernel=attn_kernel)
    return logits(params, cfg, hidden)
