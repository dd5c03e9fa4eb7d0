"""The decoder stack over a prepared param tree, for every family: embed, blocks, final norm,
logits, and the KV cache they read and write.

A prepared tree (``Backend.prepare``) holds typed weights:

    {"embed": .lookup(ids), "head": .apply(x), "final_norm": (D,),
     "layers": [{"attn_norm", "qkv": .apply_split(x, sizes), "wo", ["bq", "bk", "bv"],
                 "mlp_norm", "gate_up": .apply_split(x, sizes), "w_down"}, ...]}

KV cache: a list over layers of ``(k, v)`` block pools, each ``(replicas, blocks, block_size,
K, entries per head)``, addressed through block tables (``tables``: a row of block ids per
sequence; see ``model.backends``). Writes are scatters at each token's block and offset, so
with a donated cache they happen in place; no step copies the cache. On XLA attention gathers
only the blocks of the first ``span`` positions (a static bucket), so decode cost follows the
live context, not the allocated length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from model.backends import Backend, layer_tables
from model.backends.xla import Xla
from model.config import ModelConfig
from model.layers import attention, mlp, moe, rms_norm, rope_cos_sin, uses_local_rope

KVCache = list  # list[tuple[jax.Array, jax.Array]], one (k, v) pair per layer

XLA = Xla()


def prepare(params: dict[str, Any], cfg: ModelConfig, backend: Backend = XLA,
            quantize: str | None = None) -> dict[str, Any]:
    return backend.prepare(params, cfg, quantize)


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,  # (B, T) int32
    positions: jax.Array,  # (B, T) int32, absolute positions in each row's sequence
    cache: KVCache,
    span: int,
    rows: jax.Array | None = None,  # cache rows (see Backend.write_kv); None: row b
    backend: Backend = XLA,
    rope: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
    live: jax.Array | None = None,
    tables: jax.Array | None = None,  # (groups, slots, max blocks) int32 (see layer_tables); None: identity
    lora: tuple | None = None,  # (bank, select): adapter slots per layer and the tokens' selection (model.lora)
    images: tuple | None = None,  # (embeds (B, T, D), use (B, T) bool, limits (B, T) int32): see below
) -> tuple[jax.Array, KVCache]:
    """Run the blocks; returns final-normed hidden states (B, T, D) and the updated cache.

    Works for prefill (T > 1, any start position: chunked prefill, session turns) and decode
    (T == 1) alike. ``span`` (static) bounds the attended cache prefix on backends that read
    a span, and must exceed every position in ``positions`` that matters. ``rope``: a
    ``layers.rope_tables`` to look cos/sin up in (positions past its end, padding, read its
    last row) instead of computing them. ``live`` (int32 scalar): the first ``live`` of the
    B * T rows hold data and padding follows them; packed projections skip the padding.
    ``tables`` None: row b owns the pool's blocks in order, as ``init_cache`` of B rows lays
    them out. ``lora``: the adapter bank (a dict of ``model.lora.Slots`` per layer) and each
    token's column selection (B, T, slots * rank); None: the base model. ``images``: the
    tokens where ``use`` is set take ``embeds`` (an image's soft tokens, from
    ``model.vision.encode``) in place of their embedding, and each query sees the positions up
    to its ``limits`` entry (its image's last token inside an image, else its own position).
    """
    if tables is None:
        pool = cache[0][0]
        tables = identity_tables(tokens.shape[0], (pool.shape[1] - 1) * pool.shape[2] // tokens.shape[0],
                                 pool.shape[2])
    x = params["embed"].lookup(tokens)  # (B, T, D)
    if cfg.embed_scale is not None:  # Gemma: sqrt(D), rounded to the activations' dtype as HF does
        x = x * jnp.asarray(cfg.embed_scale, dtype=x.dtype)
    limits = None
    if images is not None:
        embeds, use, limits = images
        x = jnp.where(use[..., None], embeds.astype(x.dtype), x)
    if rope is None:
        ropes = [rope_cos_sin(cfg, positions)]
        if cfg.rope_local_theta is not None:
            ropes.append(rope_cos_sin(cfg, positions, local=True))
    else:
        ropes = [tuple(jnp.take(t, positions, axis=0, mode="clip") for t in pair) for pair in rope]
    eps = cfg.rms_norm_eps
    new_cache = []
    for i, (layer, kv) in enumerate(zip(params["layers"], cache)):
        cos, sin = ropes[1 if uses_local_rope(cfg, i) else 0]
        adapters = None if lora is None else (lora[0][i], lora[1])
        with jax.named_scope("attention"):
            h, kv = attention(cfg, layer, rms_norm(x, layer["attn_norm"], eps), cos, sin, positions, kv,
                              rows, span, backend, live, cfg.attention_spec(i), layer_tables(tables, cfg, i),
                              adapters, limits)
        if cfg.post_norms:  # Gemma: each block's output normed before the residual add
            h = rms_norm(h, layer["post_attn_norm"], eps)
        x = x + h
        with jax.named_scope("mlp"):
            normed = rms_norm(x, layer["mlp_norm"], eps)
            h = moe(cfg, layer, normed) if cfg.is_moe(i) else mlp(cfg, layer, normed, live, adapters)
        if cfg.post_norms:
            h = rms_norm(h, layer["post_mlp_norm"], eps)
        x = x + h
        new_cache.append(kv)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), new_cache


def logits(params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array,
           live: jax.Array | None = None) -> jax.Array:
    """(..., D) -> (..., V) float32 logits (``live`` as in ``forward``), soft-capped where the
    model caps them (Gemma 2)."""
    out = params["head"].apply(hidden, live).astype(jnp.float32)
    if cfg.final_softcap is not None:
        out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
    return out


BLOCK = 16  # the block size of init_cache's pools


def init_cache(cfg: ModelConfig, rows: int, length: int, dtype: Any = None, backend: Backend = XLA) -> KVCache:
    """Zeroed block pools for ``rows`` sequences of ``length`` positions, row b owning blocks
    b * M .. (b + 1) * M - 1 (``identity_tables``); ``dtype`` is the storage dtype (default:
    the backend's)."""
    return backend.init_cache(cfg, rows * -(-length // BLOCK), BLOCK, dtype)


def identity_tables(rows: int, length: int, block_size: int = BLOCK) -> jax.Array:
    """Block tables (one group: (1, rows, blocks)) of ``rows`` sequences owning consecutive
    blocks of one pool."""
    per_row = -(-length // block_size)
    return jnp.arange(rows * per_row, dtype=jnp.int32).reshape(1, rows, per_row)


def full_logits(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array, backend: Backend = XLA,
                kv_dtype: Any = None) -> jax.Array:
    """Uncached forward over whole sequences (B, T) -> (B, T, V); the reference path.
    ``kv_dtype``: the cache's storage dtype (default: the backend's)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, b, t, kv_dtype, backend)
    hidden, _ = forward(params, cfg, tokens, positions, cache, span=t, backend=backend)
    return logits(params, cfg, hidden)
