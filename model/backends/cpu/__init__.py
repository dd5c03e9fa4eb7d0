"""The native CPU kernels backend: one CPU device, the kernels of ``kernels`` built.

Weights: each layer's q/k/v and gate/up are fused, and every projection and the output head
are packed as column panels (float32; bfloat16 for a bfloat16 model; int8 or w8a8 with
``quantize``). Activations are float32. A tied embedding is read from the packed head.

KV cache: block pools of float32, bfloat16 (stored as its uint16 bits) or int8 (each head's
values and its float32 scale, ``kernels.to_cache``). Attention reads each query's own positions
0..p through its sequence's block table, so one call can carry chunks of several sequences (a
table row per token) and no span buckets are needed.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from model.backends import Backend, flat_slots, scatter_kv
from model.backends.cpu import kernels
from model.backends.cpu.kernels import Int8Panels, Panels, W8A8Panels, available
from model.backends.xla import OPTIONAL, Experts, Table

log = logging.getLogger(__name__)

__all__ = ["CpuKernels", "Int8Panels", "Panels", "W8A8Panels", "available", "kernels"]

_KV_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8))


def _rows(rows, b: int):
    """The table row of each token (B, T) or of each batch row (B, 1); None: row b."""
    if rows is None:
        return jnp.arange(b, dtype=jnp.int32)[:, None]
    return rows if rows.ndim == 2 else rows[:, None]


class CpuKernels(Backend):
    name = "native CPU kernels"
    reads_own_context = True

    def check(self, quantize, kv_cache_dtype):
        if quantize not in (None, "int8", "w8a8"):
            raise ValueError(f"quantize: int8, w8a8 or None, not {quantize!r}")
        if kv_cache_dtype is not None and jnp.dtype(kv_cache_dtype) not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: the CPU kernels keep the KV cache "
                             "in float32, bfloat16 or int8")

    def activation_dtype(self, cfg):
        return jnp.dtype(jnp.float32)

    def settle(self, tree) -> None:
        kernels.use_huge_pages(tree)

    def prepare(self, params, cfg, quantize=None):
        """Matrices stay bfloat16 when the model is (half the bytes to stream per token; the
        kernel widens them to float32 as it loads them), float16 ones become float32;
        ``quantize="int8"`` stores them as int8 with a scale per output column instead,
        ``"w8a8"`` the same int8 weights multiplied by int8 activations (quantized per row and
        block of 64 as they come). Norms and biases become float32, the dtype the packed model
        computes and caches in. The inputs are not kept: with the returned tree, the originals
        can be freed."""
        if quantize not in (None, "int8", "w8a8"):
            raise ValueError(f"quantize: int8, w8a8 or None, not {quantize!r}")
        if cfg.num_experts and quantize:
            log.warning("--quantize %s applies to attention and the dense layers: the experts stay %s",
                        quantize, "bfloat16" if jnp.dtype(cfg.dtype) == jnp.bfloat16 else "float32")
        if quantize == "w8a8" and not kernels.int8_dot_native():
            log.warning("w8a8: this CPU has no AVX512-VNNI; int8 dot products run in scalar code "
                        "(slow): prefer --quantize int8")
        wdtype = quantize or ("bfloat16" if jnp.dtype(cfg.dtype) == jnp.bfloat16 else "float32")
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        d = cfg.hidden_size

        def layer_packed(layer):
            out = {"attn_norm": f32(layer["attn_norm"]), "mlp_norm": f32(layer["mlp_norm"])}
            qkv = jnp.concatenate([layer[w].reshape(d, -1) for w in ("wq", "wk", "wv")], axis=1)
            out["qkv"] = kernels.pack(qkv, wdtype)
            out["wo"] = kernels.pack(layer["wo"].reshape(-1, d), wdtype)
            if "router" in layer:
                # Experts have no kernel: XLA's grouped tiles compute them inside the same step,
                # from weights kept as they are (bfloat16 ones widened per tile, as loaded).
                keep = lambda a: a if a.dtype == jnp.bfloat16 else f32(a)  # noqa: E731
                out["experts"] = Experts(f32(layer["router"]), keep(layer["we_gate"]), keep(layer["we_up"]),
                                         keep(layer["we_down"]), grouped=True)
            else:
                out["gate_up"] = kernels.pack(jnp.concatenate([layer["w_gate"], layer["w_up"]], axis=1), wdtype)
                out["w_down"] = kernels.pack(layer["w_down"], wdtype)
            for bias in OPTIONAL:
                if bias in layer:
                    out[bias] = f32(layer[bias])
            return out

        pack_layer = jax.jit(layer_packed)
        packed = {"final_norm": f32(params["final_norm"]),
                  "layers": [pack_layer(layer) for layer in params["layers"]]}
        if cfg.tie_word_embeddings:
            packed["head"] = jax.jit(lambda e: kernels.pack(e.T, wdtype))(params["embed"])
            packed["embed"] = packed["head"]  # the embedding is read from the packed head
        else:
            packed["embed"] = Table(params["embed"], "float32")
            packed["head"] = jax.jit(lambda h: kernels.pack(h, wdtype))(params["lm_head"])
        return packed

    def cache_dtype(self, cfg, kv_cache_dtype=None):
        dtype = jnp.dtype(kv_cache_dtype or jnp.float32)
        # A bfloat16 cache is kept as uint16 bits: XLA's CPU backend widens a bfloat16
        # scatter's whole operand to float32 and back; an integer scatter is in place.
        return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype

    def cache_head_size(self, head_dim, storage):
        return kernels.cache_head_size(head_dim, storage)

    def init_cache(self, cfg, num_blocks, block_size, storage=None, replicas=1, window_blocks=0):
        if replicas != 1 or block_size % 16:
            raise ValueError(f"the CPU kernels read one pool of blocks of a multiple of 16 positions, "
                             f"not {replicas} pools of {block_size}")
        return super().init_cache(cfg, num_blocks, block_size, storage, replicas, window_blocks)

    def write_kv(self, kv, k, v, rows, positions, tables):
        write_rows = jnp.broadcast_to(_rows(rows, k.shape[0]), positions.shape)
        index = flat_slots(tables, write_rows, positions, *kv[0].shape[:3])
        return tuple(scatter_kv(pool, kernels.to_cache(x, pool.dtype), index) for pool, x in zip(kv, (k, v)))

    def attend(self, q, kv, rows, positions, span, spec, tables, limits=None):
        # A prefill chunk's T queries are T kernel rows of the same sequence. A query sees up
        # to its limit (its position, or its image's end), from its own window's start.
        b, t, n, h = q.shape
        q_rows = jnp.broadcast_to(_rows(rows, b), (b, t)).reshape(b * t)
        k_pool, v_pool = (x.reshape(x.shape[1:]) for x in kv)  # the one replica's (blocks, block, K, E)
        pos = positions.reshape(b * t)
        ends = (pos if limits is None else limits.reshape(b * t)) + 1
        starts = jnp.maximum(pos + 1 - spec.window, 0) if spec.window else jnp.zeros_like(pos)
        out = kernels.decode_attention(q.reshape(b * t, n, h), k_pool, v_pool, q_rows, ends, tables,
                                       scale=spec.scale, softcap=spec.softcap, starts=starts)
        return out.astype(q.dtype).reshape(b, t, n, h)

    def prompts_per_call(self, bucket, slots, span):
        """Up to one chunk per 4 tokens of the call's bucket, at most one per slot: every call
        samples that many rows, which a lone short prompt pays for."""
        return min(slots, max(1, bucket // 4))
