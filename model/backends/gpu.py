"""Ragged paged attention for GPUs: one Pallas kernel (Triton lowering) for decode rows,
prefill chunks and mixed calls, reading each query's own context through its block table.

The XLA path gathers a bucketed span of every row's blocks and scores every query against it:
correct, but it reads each key twice (the gather, then the einsum), materialises the scores,
and pays for the span bucket rather than the context. The kernel reads every key once per
tile of queries, keeps the softmax online in registers, and stops at each tile's own context.

How one call is cut into work (``_work_items``, plain XLA ops inside the same jit):

- The call's tokens are flattened (B*T of them), each with its table row and position. A
  *segment* is a run of consecutive tokens of one row at consecutive positions: a decode row is
  a segment of one, a prefill chunk one of its length. Padding (a row out of range, or a
  position past every table) forms runs of its own, whose outputs are zeros.
- Each segment is cut into *tiles* of at most ``tq`` tokens. A tile is one work item: its first
  token, its length, its table row and its first position. The number of items has a static
  bound (tokens / tq + the segments a call can hold), so the grid never depends on the data and
  a new mix of prompts compiles nothing.
- Grid: (items, KV heads). Item w, head k loads the queries of its tile's tokens for the query
  heads sharing KV head k (GQA: the group's heads are rows of one tile, padded to a power of
  two), and walks its row's blocks from the first one its window can see to the block of its
  last query, one pool block per step: a (rows, H) x (H, block) product, a float32 online
  softmax, and a (rows, block) x (block, H) product into a float32 accumulator. Causal masking
  inside a chunk, windows and soft-caps are masks and a tanh on the block's scores. With
  ``limits`` (an image's tokens attend to the whole image) each query row is masked by its own
  limit instead of its position, and a tile walks to its last token's limit.

Queries are laid out (K, tokens * Gp, H) so a tile's rows are one contiguous slice: token t's
group is rows t*Gp .. t*Gp + Gp - 1. Tiles are ``rows`` = 16 query rows for decode calls (one
token a tile: a tile never holds two sequences) and 64 for prefill calls.

In interpret mode (``interpret=True``) the same kernel runs on any backend, as XLA ops: the
tests compare it with the XLA gather on a CPU. Head sizes that are not a power of two (Triton
tiles are) keep the XLA gather; ``supported`` says which.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.backends.xla import Xla
from model.config import AttentionSpec

# A finite "minus infinity": exp(NEG - NEG) stays defined for a row that has seen no key yet.
NEG = -1e30
LOG2E = 1.4426950408889634  # scores are kept in base 2 (see _kernel)


def supported(head_dim: int) -> bool:
    """Whether the kernel runs heads of this size (a power of two, 16 or more: Triton's tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _work_items(rows, positions, tq: int, n_items: int, slots: int, limit: int):
    """(starts, lengths, rows, first positions) of up to ``n_items`` tiles over flat tokens
    (``rows``, ``positions`` (M,)); unused items start at M with length 0, and a tile of
    padding (a row out of range, a position at or past ``limit``) has first position -1."""
    m = rows.shape[0]
    idx = jnp.arange(m, dtype=jnp.int32)
    valid = (rows >= 0) & (rows < slots) & (positions >= 0) & (positions < limit)
    prev_row = jnp.concatenate([jnp.full((1,), -2, rows.dtype), rows[:-1]])
    prev_pos = jnp.concatenate([jnp.full((1,), -2, positions.dtype), positions[:-1]])
    prev_valid = jnp.concatenate([jnp.zeros((1,), bool), valid[:-1]])
    new_segment = (rows != prev_row) | (valid != prev_valid) | (valid & (positions != prev_pos + 1))
    segment_start = lax.cummax(jnp.where(new_segment, idx, 0))
    tile_start = new_segment | ((idx - segment_start) % tq == 0)
    starts = jnp.nonzero(tile_start, size=n_items, fill_value=m)[0].astype(jnp.int32)
    following = jnp.concatenate([starts[1:], jnp.full((1,), m, jnp.int32)])
    at = jnp.minimum(starts, m - 1)
    lengths = jnp.minimum(tq, following - starts)  # 0 for an unused item
    # A padding tile or an unused item attends nothing (its rows are stored as zeros, or not
    # at all): its first position -1. An unused item used to take the last token's position
    # and walk that row's whole context for nothing (4,160 blocks against 1,808 for the real
    # tiles of a full 512-token chunk over 64 slots).
    first_pos = jnp.where(valid[at] & (lengths > 0), positions[at], -1)
    return starts, lengths.astype(jnp.int32), jnp.clip(rows[at], 0, slots - 1), first_pos


def _kernel(starts_ref, lengths_ref, rows_ref, pos_ref, last_ref, tables_ref, q_ref, lim_ref, k_ref, v_ref, o_ref, *,
            group: int, rows: int, scale: float, window: int | None, softcap: float | None,
            rows_per_replica: int, limited: bool):
    w, kh = pl.program_id(0), pl.program_id(1)
    start, n, row, p0 = starts_ref[w], lengths_ref[w], rows_ref[w], pos_ref[w]
    block = k_ref.shape[2]
    head = q_ref.shape[-1]
    replica = row // rows_per_replica
    r = lax.broadcasted_iota(jnp.int32, (rows,), 0)  # the tile's query rows (Triton: no tensor slicing)
    q_pos = p0 + r // group
    real = r < n * group
    q = q_ref[kh, pl.ds(start * group, rows), :]
    # float32 stays float32 (no TF32 rounding): that path exists for exactness, bfloat16 for speed.
    tf32 = q.dtype != jnp.float32

    # ``limited``: each query sees up to its own limit (an image's tokens, its image's last
    # position); limits never decrease along a row, so the tile's last one bounds its blocks.
    q_lim = lim_ref[pl.ds(start * group, rows)] if limited else q_pos
    first = jnp.int32(0) if window is None else jnp.maximum(p0 - window + 1, 0) // block
    last = last_ref[w] if limited else p0 + n - 1
    end = jnp.where(p0 >= 0, last // block + 1, first)

    def step(j, carry):
        m_prev, l_prev, acc = carry
        blk = jnp.maximum(tables_ref[row, j], 0)
        k = k_ref[replica, blk, :, kh, :]
        v = v_ref[replica, blk, :, kh, :]
        # Scores in base 2 (log2(e) folded into the scale): exp2 is the units' native exponential.
        s = plgpu.dot(q, k.astype(q.dtype), trans_b=True, allow_tf32=tf32).astype(jnp.float32)  # (rows, block)
        if softcap is None:
            s = s * (scale * LOG2E)
        else:
            s = (softcap * LOG2E) * jnp.tanh(s * (scale / softcap))
        k_pos = j * block + lax.broadcasted_iota(jnp.int32, (rows, block), 1)
        seen = k_pos <= q_lim[:, None]
        if window is not None:
            seen &= k_pos > q_pos[:, None] - window
        s = jnp.where(seen, s, NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.where(seen, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * correction + p.sum(axis=-1)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(q.dtype), v.astype(q.dtype),
                                                    allow_tf32=tf32).astype(jnp.float32)
        return m_next, l_next, acc

    init = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head), jnp.float32))
    _, l, acc = lax.fori_loop(first, end, step, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    # A tile's row window runs past its own tokens into the next tile's: store only its own.
    plgpu.store(o_ref.at[kh, pl.ds(start * group, rows), :], out.astype(o_ref.dtype),
                mask=jnp.broadcast_to(real[:, None], (rows, head)))


def ragged_paged_attention(q, k_pool, v_pool, rows, positions, tables, spec: AttentionSpec, *,
                           interpret: bool = False, segments: int | None = None, tile_rows: int = 64,
                           limits=None):
    """q (M, N, H) of M flat tokens, token i of table row ``rows[i]`` at ``positions[i]``, over
    one layer's (replicas, blocks, block, K, H) pools -> (M, N, H): each query sees positions
    0..p of its row (its window's only), through the row's ``tables`` entry; with ``limits``
    (M,), 0..limits[i] (never decreasing along a row's run, never past the call's last token of
    that row). ``segments``: a bound on the runs of consecutive tokens of one row the call
    holds (default M)."""
    m, n, h = q.shape
    replicas, _, block, k_heads, _ = k_pool.shape
    slots, max_blocks = tables.shape
    group = n // k_heads
    gp = _pow2(group)
    rows_per_tile = max(tile_rows, gp)
    tq = rows_per_tile // gp
    n_items = min(m, -(-m // tq) + (segments or m))
    starts, lengths, item_rows, item_pos = _work_items(rows.astype(jnp.int32), positions.astype(jnp.int32), tq,
                                                       n_items, slots, max_blocks * block)
    # (K, M * Gp + pad, H): each token's group of heads in consecutive rows, zero heads padding
    # the group to a power of two, and one tile of zero rows at the end, so no tile's slice
    # runs past the array.
    qs = q.reshape(m, k_heads, group, h)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, gp - group), (0, 0))).transpose(1, 0, 2, 3).reshape(k_heads, m * gp, h)
    qs = jnp.pad(qs, ((0, 0), (0, rows_per_tile), (0, 0)))
    limited = limits is not None
    if limited:  # each query row's limit, laid out as the query rows are; each tile's last
        lim = jnp.pad(jnp.repeat(limits.astype(jnp.int32), gp), (0, rows_per_tile))
        last = limits.astype(jnp.int32)[jnp.clip(starts + lengths - 1, 0, m - 1)]
    else:  # unused operands: the kernel reads the positions instead
        lim, last = jnp.zeros((1,), jnp.int32), jnp.zeros_like(starts)
    kernel = functools.partial(_kernel, group=gp, rows=rows_per_tile, scale=float(spec.scale),
                               window=spec.window, softcap=spec.softcap, rows_per_replica=slots // replicas,
                               limited=limited)
    extra = {}
    if not interpret:
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    out = pl.pallas_call(kernel, grid=(n_items, k_heads), out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype),
                         interpret=interpret, name="ragged_paged_attention", **extra)(
        starts, lengths, item_rows, item_pos, last, tables, qs, lim, k_pool, v_pool)
    out = out[:, :m * gp].reshape(k_heads, m, gp, h)[:, :, :group].transpose(1, 0, 2, 3)
    return out.reshape(m, n, h)


class GpuKernels(Xla):
    """The XLA path with its attention in the ragged paged kernel: weights, matmuls and KV
    writes stay XLA's; ``attend`` runs the kernel over each query's own context. So no span
    buckets are compiled (``reads_own_context``), and a prefill call packs as many sequences'
    chunks as the scheduler gives it at no extra attention work (each tile reads its own row).

    On a mesh the kernel runs per device inside ``shard_map``: query and KV heads split over
    ``model``, so each device attends its own heads over its own slice of the pools (``select``
    takes this backend only where both head counts split and there is one data replica).
    ``interpret``: run the kernel as XLA ops (tests, on a CPU)."""

    name = "xla+pallas"
    reads_own_context = True

    def __init__(self, mesh=None, interpret: bool = False):
        super().__init__(pack_prompts=True)
        self.mesh = mesh
        self.interpret = interpret

    def __hash__(self) -> int:
        return hash((type(self), self.mesh, self.interpret))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and (self.mesh, self.interpret) == (other.mesh, other.interpret)

    def describe(self) -> str:
        how = " (interpreted)" if self.interpret else ""
        return f"XLA on {jax.devices()[0].platform}, ragged paged attention kernel{how}"

    def prompts_per_call(self, bucket, slots, span):
        # Every packed chunk is a row the call samples; one per 4 tokens bounds that for a lone
        # short prompt, as on the CPU kernels.
        return min(slots, max(1, bucket // 4))

    def attend(self, q, kv, rows, positions, span, spec, tables, limits=None):
        b, t, n, h = q.shape
        if rows is None:
            rows = jnp.arange(b, dtype=jnp.int32)
        if rows.ndim == 1:  # a batch row's table row for each of its tokens
            rows, segments = jnp.broadcast_to(rows[:, None], (b, t)), b
        else:  # a prefill call: a table row per token, chunks of distinct rows and a padding run
            segments = self.prompts_per_call(t, tables.shape[0], span) + 1
        def call(q, k, v, rows, positions, tables, limits=None):  # (positional: shard_map passes them so)
            return ragged_paged_attention(q, k, v, rows, positions, tables, spec, interpret=self.interpret,
                                          segments=segments, tile_rows=16 if t == 1 else 64, limits=limits)

        flat = (q.reshape(b * t, n, h), *kv, rows.reshape(b * t), positions.reshape(b * t), tables)
        if limits is not None:
            flat = (*flat, limits.reshape(b * t))
        if self.mesh is None:
            out = call(*flat)
        else:
            from jax.sharding import PartitionSpec as P

            heads, pool = P(None, "model", None), P(None, None, None, "model", None)
            specs = (heads, pool, pool, P(), P(), P()) + ((P(),) if limits is not None else ())
            out = jax.shard_map(call, mesh=self.mesh, in_specs=specs, out_specs=heads, check_vma=False)(*flat)
        return out.reshape(b, t, n, h)
