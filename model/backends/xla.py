"""The XLA backend: sharded meshes, GPUs and the reference path.

Its weights are the checkpoint's arrays in thin typed wrappers (no copy, so a sharded array
keeps its sharding): ``Dense`` multiplies, ``Split`` gives several products of one input
(q/k/v, gate/up), ``Table`` looks rows up, ``Transposed`` is a tied head.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from model.backends import Backend


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dense:
    """x (..., K) @ w, with w stored (K, ...) in the checkpoint's layout (heads split)."""

    w: jax.Array

    def apply(self, x, live=None):
        # A plain 2-D matmul over merged (heads x head_dim) columns: XLA's CPU dot runs a
        # 3-D-weight einsum through extra copies.
        return x @ self.w.reshape(x.shape[-1], -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Split:
    """Several weights applied to one input, each its own product."""

    parts: tuple

    def apply_split(self, x, sizes=None, live=None):
        return tuple(p.apply(x, live) for p in self.parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Table:
    """Embedding rows (V, D), read as ``dtype`` when one is given."""

    w: jax.Array
    dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    def lookup(self, ids):
        rows = self.w[ids]
        return rows if self.dtype is None else rows.astype(self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transposed:
    """A tied head: x (..., D) against the embedding (V, D)."""

    w: jax.Array

    def apply(self, x, live=None):
        return jnp.einsum("...d,vd->...v", x, self.w)


# Per-layer vectors some families have, used as they are by both backends.
OPTIONAL = ("bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


class Xla(Backend):
    name = "xla"
    rows_per_token = False
    reads_own_context = False

    def check(self, quantize, kv_cache_dtype):
        if quantize is not None:
            raise ValueError(f"quantize={quantize!r} needs the native CPU kernels: one CPU device, "
                             "no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0")
        if kv_cache_dtype is not None and jnp.dtype(kv_cache_dtype) == jnp.int8:
            raise ValueError("kv_cache_dtype='int8' needs the native CPU kernels: one CPU device, "
                             "no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0")

    def describe(self) -> str:
        return f"XLA on {jax.devices()[0].platform}"

    def prepare(self, params, cfg, quantize=None):
        self.check(quantize, None)

        def layer(p):
            out = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
                   "qkv": Split((Dense(p["wq"]), Dense(p["wk"]), Dense(p["wv"]))), "wo": Dense(p["wo"]),
                   "gate_up": Split((Dense(p["w_gate"]), Dense(p["w_up"]))), "w_down": Dense(p["w_down"])}
            out.update({b: p[b] for b in OPTIONAL if b in p})
            return out

        head = Transposed(params["embed"]) if cfg.tie_word_embeddings else Dense(params["lm_head"])
        return {"embed": Table(params["embed"]), "head": head, "final_norm": params["final_norm"],
                "layers": [layer(p) for p in params["layers"]]}

    def cache_dtype(self, cfg, kv_cache_dtype=None):
        return jnp.dtype(kv_cache_dtype or cfg.dtype)

    def write_kv(self, kv, k, v, rows, positions):
        if rows is not None and rows.ndim == 2:
            raise ValueError("per-token cache rows need the native attention kernel")
        b = k.shape[0]
        write_rows = jnp.arange(b, dtype=jnp.int32)[:, None] if rows is None else rows[:, None]
        k_cache, v_cache = kv
        k_cache = k_cache.at[write_rows, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[write_rows, positions].set(v.astype(v_cache.dtype), mode="drop")
        return k_cache, v_cache

    def attend(self, q, kv, rows, positions, span, spec):
        k_cache, v_cache = kv
        b, t, n, h = q.shape
        k_heads = k_cache.shape[2]
        if rows is None:  # a slice, not a gather: decode over all rows copies nothing
            keys, values = k_cache[:, :span], v_cache[:, :span]  # (B, S, K, H)
        else:
            keys, values = k_cache[rows, :span], v_cache[rows, :span]  # (B, S, K, H)
        q = q.reshape(b, t, k_heads, n // k_heads, h)  # (B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * spec.scale
        if spec.softcap is not None:
            scores = spec.softcap * jnp.tanh(scores / spec.softcap)
        # A query at position p sees cache positions 0..p: its own prompt, earlier turns, itself;
        # in a windowed layer only the last `window` of them.
        cached = jnp.arange(span)[None, None, :]
        visible = cached <= positions[:, :, None]  # (B, T, S)
        if spec.window is not None:
            visible &= cached > positions[:, :, None] - spec.window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, values.astype(q.dtype))
        return out.reshape(b, t, n, h)
