"""The XLA backend: sharded meshes, GPUs and the reference path.

Its weights are the checkpoint's arrays in thin typed wrappers (no copy, so a sharded array
keeps its sharding): ``Dense`` multiplies, ``Split`` gives several products of one input
(q/k/v, gate/up), ``Table`` looks rows up, ``Transposed`` is a tied head.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from model.backends import Backend, flat_slots, scatter_kv


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Experts:
    """A mixture of experts' router (D, E) and its experts' stacked SwiGLU weights: gate, up
    (E, D, F), down (E, F, D).

    ``apply`` computes each token's chosen experts one of two ways:

    - ``grouped`` (the experts on one device): the (token, expert) pairs sorted by expert into
      tiles of one expert each, and a loop over the tiles that hold any (``fori_loop``, not a
      Python loop) multiplying each tile by its expert's weights. Work and weight reads follow
      the experts chosen: a decode step of few tokens reads only their experts, a prefill
      groups many tokens per expert. Outputs are gathered back per token and summed in the
      order of its choices, with no scatter-add, so the sum does not depend on the device's
      atomics.
    - dense (experts split over a mesh, expert parallel): every device runs its own experts for
      every token with the routing weights of the others zero, and the partial outputs are
      summed over the mesh. E/k times the work, but no gather of another device's experts.
    """

    router: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array
    grouped: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def apply(self, x, weights, chosen, act):
        """x (M, D), weights and chosen (M, k) -> (M, D)."""
        if not self.grouped:
            m, e = x.shape[0], self.gate.shape[0]
            combine = jnp.zeros((m, e), x.dtype).at[jnp.arange(m)[:, None], chosen].set(weights)
            h = act(jnp.einsum("md,edf->emf", x, self.gate)) * jnp.einsum("md,edf->emf", x, self.up)
            return jnp.einsum("emd,me->md", jnp.einsum("emf,efd->emd", h, self.down), combine)
        return _grouped_experts(x, weights, chosen, self.gate, self.up, self.down, act)


def _grouped_experts(x, weights, chosen, gate, up, down, act):
    m, d = x.shape
    e, k = gate.shape[0], chosen.shape[1]
    s = m * k  # (token, choice) pairs
    # Tiles of about the pairs an expert gets on average: 1 row for a decode step of few
    # tokens over many experts, up to 256 for a long prefill.
    tile = int(min(256, 2 ** max(0, (s // e).bit_length() - 1)))
    n_tiles = -(-s // tile) + e  # a bound: each expert's last tile may be partial
    expert = chosen.reshape(s)
    order = jnp.argsort(expert, stable=True)  # pairs by expert, each expert's in token order
    by_expert = expert[order]
    counts = jnp.zeros((e,), jnp.int32).at[expert].add(1)
    tiles = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    first_pair = jnp.cumsum(counts) - counts  # each expert's first index in `order`
    slot = (tile_end - tiles)[by_expert] * tile + jnp.arange(s) - first_pair[by_expert]  # row of each sorted pair
    token = jnp.full((n_tiles * tile,), m, jnp.int32).at[slot].set((order // k).astype(jnp.int32))
    rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token]  # (tiles * tile, D); padding: zeros
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), e - 1)

    def one_tile(i, ys):
        ex = tile_expert[i]
        xs = jax.lax.dynamic_slice_in_dim(rows, i * tile, tile)
        y = (act(xs @ gate[ex]) * (xs @ up[ex])) @ down[ex]
        return jax.lax.dynamic_update_slice_in_dim(ys, y.astype(ys.dtype), i * tile, 0)

    ys = jax.lax.fori_loop(0, tile_end[-1], one_tile, jnp.zeros((n_tiles * tile, d), x.dtype))
    where = jnp.zeros((s,), jnp.int32).at[order].set(slot).reshape(m, k)  # each pair's row
    return jnp.sum(ys[where] * weights[..., None], axis=1)


def _spread(a) -> bool:
    """Whether ``a`` lies over several devices (or, traced, might)."""
    return isinstance(a, jax.core.Tracer) or len(a.sharding.device_set) > 1


# Per-layer vectors some families have, used as they are by both backends.
OPTIONAL = ("bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


# A packed prefill call scores each query against every packed sequence's span: at most this
# many key positions in all, so packing costs at most the attention of one span this long.
# Short prompts (spans of 128-512) pack 8 to 2 to a call; a long one (span >= 1024) goes alone.
PACKED_KEYS = 1024


class Xla(Backend):
    """``pack_prompts``: prefill calls pack several sequences. It trades a pass over the weights
    per sequence for up to P times the attention work, which pays where FLOPs are cheap
    against bytes: on a GPU (an 8B model's weight pass is ~5 ms on an H100, the extra attention
    of a packed 512-token call well under 1 ms). On a CPU it does not: a burst of 16 prompts of
    40 tokens prefilled in 2.2 s packed against 1.3 s one per call (the bundled 135M model, 2
    cores), so the default there is one sequence per call."""

    name = "xla"
    reads_own_context = False

    def __init__(self, pack_prompts: bool | None = None):
        self._pack = pack_prompts  # None: decided on first use (see pack_prompts)

    @property
    def pack_prompts(self) -> bool:
        # Asked on first use, not at construction: a module-level instance must not start the
        # XLA backend before a multi-process mesh's jax.distributed.initialize().
        return jax.default_backend() != "cpu" if self._pack is None else self._pack

    def __hash__(self) -> int:
        return hash((type(self), self._pack))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._pack == other._pack

    def prompts_per_call(self, bucket, slots, span):
        if not self.pack_prompts:
            return 1
        return max(1, min(slots, bucket // 16, PACKED_KEYS // span))

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
                   "qkv": Split((Dense(p["wq"]), Dense(p["wk"]), Dense(p["wv"]))), "wo": Dense(p["wo"])}
            if "router" in p:
                out["experts"] = Experts(p["router"], p["we_gate"], p["we_up"], p["we_down"],
                                         grouped=not _spread(p["we_gate"]))
            else:
                out.update(gate_up=Split((Dense(p["w_gate"]), Dense(p["w_up"]))), w_down=Dense(p["w_down"]))
            out.update({b: p[b] for b in OPTIONAL if b in p})
            return out

        head = Transposed(params["embed"]) if cfg.tie_word_embeddings else Dense(params["lm_head"])
        return {"embed": Table(params["embed"]), "head": head, "final_norm": params["final_norm"],
                "layers": [layer(p) for p in params["layers"]]}

    def cache_dtype(self, cfg, kv_cache_dtype=None):
        return jnp.dtype(kv_cache_dtype or cfg.dtype)

    def write_kv(self, kv, k, v, rows, positions, tables):
        b = k.shape[0]
        write_rows = (jnp.arange(b, dtype=jnp.int32)[:, None] if rows is None
                      else rows if rows.ndim == 2 else rows[:, None])
        index = flat_slots(tables, jnp.broadcast_to(write_rows, positions.shape), positions, *kv[0].shape[:3])
        return tuple(scatter_kv(pool, x, index) for pool, x in zip(kv, (k, v)))

    def attend(self, q, kv, rows, positions, span, spec, tables, limits=None):
        if rows is not None and rows.ndim == 2:  # a prefill call's row per token (1, T)
            p = self.prompts_per_call(q.shape[1], tables.shape[0], span)
            if p > 1:
                return _attend_packed(q, kv, rows[0], positions[0], span, spec, tables, p,
                                      None if limits is None else limits[0])
            rows = rows[:, 0]  # one sequence: its first token's row is every real token's
        k_pool, v_pool = kv
        b, t, n, h = q.shape
        k_heads, block = k_pool.shape[3], k_pool.shape[2]
        nb = -(-span // block)  # blocks of each row read
        first = jnp.zeros((b,), jnp.int32)
        if spec.window is not None and spec.window + t - 1 + block < nb * block:
            # A windowed layer reads only the blocks its queries' windows cover: from the block
            # of its first query's window start, window + T - 1 positions and the block that
            # start falls in, not the span.
            nb = -(-(spec.window + t - 1) // block) + 1
            first = jnp.clip((positions[:, 0] - spec.window + 1) // block, 0, tables.shape[1] - nb)
        keys, values = (_gather_blocks(pool, tables, rows, first, nb) for pool in (k_pool, v_pool))  # (B, S, K, H)
        q = q.reshape(b, t, k_heads, n // k_heads, h)  # (B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * spec.scale
        if spec.softcap is not None:
            scores = spec.softcap * jnp.tanh(scores / spec.softcap)
        # A query at position p sees positions 0..p of its sequence: its own prompt, earlier
        # turns, itself; in a windowed layer only the last `window` of them.
        cached = (first[:, None] * block + jnp.arange(nb * block)[None, :])[:, None, :]  # each key's position (B, 1, S)
        visible = cached <= (positions if limits is None else limits)[:, :, None]  # (B, T, S)
        if spec.window is not None:
            visible &= cached > positions[:, :, None] - spec.window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        # A query that sees nothing (padding past the span): zeros, not NaN. Blocks a table
        # lacks are read as block 0, whose values are masked here too.
        probs = jnp.where(visible[:, None, None], probs, 0.0).astype(q.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, values.astype(q.dtype))
        return out.reshape(b, t, n, h)


def _attend_packed(q, kv, rows, positions, span, spec, tables, p, limits=None):
    """q (1, T, N, H) of up to ``p`` sequences' chunks packed in one call, token t in table row
    ``rows[t]`` at ``positions[t]``: each query is scored against the first ``span`` positions of
    every packed sequence, and sees only its own sequence's positions up to its own (and within
    its window). The packed rows are the call's ``p`` smallest distinct rows (padding tokens
    name the out-of-range row, the largest, so it is never among them when p real chunks fill
    the call; when fewer do, it stands for no sequence)."""
    k_pool, v_pool = kv
    _, t, n, h = q.shape
    block, k_heads = k_pool.shape[2], k_pool.shape[3]
    slots = tables.shape[0]
    nb = -(-span // block)
    packed = jnp.unique(rows, size=p, fill_value=slots)  # (P,)
    first = jnp.zeros((p,), jnp.int32)
    keys, values = (_gather_blocks(pool, tables, packed, first, nb).reshape(p * nb * block, k_heads, h)
                    for pool in (k_pool, v_pool))  # (P*S, K, H)
    q = q.reshape(t, k_heads, n // k_heads, h)
    scores = jnp.einsum("tkgh,skh->kgts", q, keys.astype(q.dtype)).astype(jnp.float32) * spec.scale
    if spec.softcap is not None:
        scores = spec.softcap * jnp.tanh(scores / spec.softcap)
    key_pos = jnp.tile(jnp.arange(nb * block), p)  # (P*S,)
    key_row = jnp.repeat(packed, nb * block)
    visible = (key_row[None, :] == rows[:, None]) & (key_row[None, :] < slots) & (
        key_pos[None, :] <= (positions if limits is None else limits)[:, None])  # (T, P*S)
    if spec.window is not None:
        visible &= key_pos[None, :] > positions[:, None] - spec.window
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
    probs = jnp.where(visible[None, None], jax.nn.softmax(scores, axis=-1), 0.0).astype(q.dtype)
    out = jnp.einsum("kgts,skh->tkgh", probs, values.astype(q.dtype))
    return out.reshape(1, t, n, h)


def _gather_blocks(pool, tables, rows, first, nb):
    """Blocks ``first .. first + nb - 1`` of each row's table from a (replicas, blocks, block,
    K, H) pool, as (B, nb * block, K, H). ``rows`` None: row b is table row b (all of them,
    at full width), gathered per replica (a batched gather over the replica axis, which keeps
    a data-sharded pool's reads on their own devices); else rows (B,) of any replicas."""
    replicas, replica_blocks, block = pool.shape[:3]
    slots, max_blocks = tables.shape
    at = jnp.clip(first[:, None] + jnp.arange(nb)[None, :], 0, max_blocks - 1)  # (B, nb)
    if rows is None:
        ids = jnp.maximum(jnp.take_along_axis(tables, at, axis=1), 0)  # (slots, nb)
        out = jax.vmap(lambda p, t: p[t])(pool, ids.reshape(replicas, slots // replicas, nb))
    else:
        rows = jnp.clip(rows, 0, slots - 1)
        ids = jnp.maximum(tables[rows[:, None], at], 0)  # (B, nb)
        replica = rows // (slots // replicas)
        out = pool.reshape(replicas * replica_blocks, *pool.shape[2:])[replica[:, None] * replica_blocks + ids]
    return out.reshape(-1, nb * block, *pool.shape[3:])
