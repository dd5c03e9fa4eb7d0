"""The device backends: how the model's math runs, chosen once when a runner is built.

Three backends share one interface (``Backend``), each taking a call's tokens with a table
row per token (so one call can carry chunks of several sequences):

- ``cpu.CpuKernels``: one CPU device with the native kernels built. Weights are packed into
  column panels (float32, bfloat16, int8 or w8a8 types), activations are float32, the KV
  cache has its own storage format (float32, bfloat16 bits in uint16, or int8 with a scale),
  and attention reads each query's own context through its block table, so one call can carry
  chunks of several sequences (a table row per token).
- ``xla.Xla``: everything else (sharded meshes, GPUs, the reference path). Weights stay the
  checkpoint's arrays (wrapped, not copied, so their shardings hold), attention gathers a
  bucketed span of each row's blocks; a prefill call packs as many sequences' chunks as its
  span allows (a table row per token, every query scored against all of them, masked) where
  the device's FLOPs are cheap against its bytes (``Xla.pack_prompts``; not on a CPU).
- ``gpu.GpuKernels``: XLA with attention in a ragged paged-attention Pallas kernel, on CUDA
  devices where it applies (``gpu_kernel_applies``).

The KV cache is paged: per layer a pool of fixed-size blocks, and a block table per sequence
(a row of ``tables``, (slots, max blocks) int32, the layer's KV group's: ``layer_tables``)
naming the block of each ``block_size`` positions. Position p of table row r is at offset ``p % block_size`` of block
``tables[r, p // block_size]``; an entry of -1 holds no block. Each pool has one block more
than it hands out, its last: padding tokens (and positions with no block) write there, so
every write is in bounds (a scatter that may drop a write reads the old value to keep it, and
XLA then copies the whole pool for a one-row step).

The model (``model.transformer``) calls ``backend.write_kv`` and ``backend.attend`` and the
weights' own ``apply``/``lookup``; it never asks which backend it runs on.
"""

from __future__ import annotations

import abc
import ctypes
import logging
from typing import Any

import jax
import jax.numpy as jnp

from model.config import AttentionSpec, ModelConfig

log = logging.getLogger("xlaserve")


class Backend(abc.ABC):
    """One device path. Instances are stateless and hashable, so a jitted step can close
    over one."""

    name: str
    # Attention reads each query's own positions: no span buckets are compiled.
    reads_own_context: bool

    def __hash__(self) -> int:
        return hash(type(self))

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    # -- options --------------------------------------------------------------------------------

    @abc.abstractmethod
    def check(self, quantize: str | None, kv_cache_dtype: str | None) -> None:
        """Raise ValueError naming what this backend cannot run."""

    def describe(self) -> str:
        return self.name

    def settle(self, tree) -> None:
        """Make the memory of arrays every step reads ready for it (the weights, the KV cache),
        once they are in place; a backend may leave this to the first step."""

    def activation_dtype(self, cfg: ModelConfig) -> jnp.dtype:
        """The dtype of the activations between layers (what an adapter's update is added to)."""
        return jnp.dtype(cfg.dtype)

    # -- weights --------------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, params: dict[str, Any], cfg: ModelConfig, quantize: str | None = None) -> dict[str, Any]:
        """The checkpoint's param tree as this backend's typed weights (see ``model.transformer``
        for the tree it returns)."""

    # -- KV cache -------------------------------------------------------------------------------

    @abc.abstractmethod
    def cache_dtype(self, cfg: ModelConfig, kv_cache_dtype: str | None = None) -> jnp.dtype:
        """The KV cache's storage dtype, as asked or this backend's default."""

    def cache_head_size(self, head_dim: int, storage: Any) -> int:
        """Entries one position's head takes in a cache of ``storage`` dtype."""
        return head_dim

    def kv_bytes_per_token(self, cfg: ModelConfig, kv_cache_dtype: str | None = None) -> int:
        storage = self.cache_dtype(cfg, kv_cache_dtype)
        return 2 * cfg.num_layers * cfg.num_kv_heads * self.cache_head_size(cfg.head_dim, storage) * storage.itemsize

    def init_cache(self, cfg: ModelConfig, num_blocks: int, block_size: int, storage: Any = None,
                   replicas: int = 1, window_blocks: int = 0) -> list:
        """Per-layer (k, v) block pools, each (replicas, num_blocks + 1, block_size, K, entries
        per head): every data replica its own pool and block ids, and its own last block for
        padding's writes (never in a table). ``window_blocks``: the sliding-window layers'
        pools have that many blocks instead (their own group of tables: ``layer_tables``)."""
        storage = jnp.dtype(storage or self.cache_dtype(cfg))
        rest = (block_size, cfg.num_kv_heads, self.cache_head_size(cfg.head_dim, storage))
        pools = []
        for i in range(cfg.num_layers):
            shape = (replicas, (window_blocks if window_blocks and cfg.is_sliding(i) else num_blocks) + 1, *rest)
            pools.append((jnp.zeros(shape, storage), jnp.zeros(shape, storage)))
        return pools

    @abc.abstractmethod
    def write_kv(self, kv: tuple, k: jax.Array, v: jax.Array, rows: jax.Array | None,
                 positions: jax.Array, tables: jax.Array) -> tuple:
        """Scatter k, v (B, T, K, H) into one layer's pool at each token's position of its
        table row (``rows``: of each token (B, T) or batch row (B,); None: row b). Padding (a
        row out of range, a position with no block) is dropped."""

    @abc.abstractmethod
    def attend(self, q: jax.Array, kv: tuple, rows: jax.Array | None, positions: jax.Array,
               span: int, spec: AttentionSpec, tables: jax.Array, limits: jax.Array | None = None) -> jax.Array:
        """q (B, T, N, H) over one layer's pool -> (B, T, N, H): a query at position p sees
        positions 0..p of its table row, or its window's (``spec``: scale, window, soft-cap).
        ``limits`` (B, T): the last position each query sees instead of its own (a token of an
        image attended both ways sees its image's last; the window still starts from p); it
        never passes the call's last token of the query's row."""

    # -- shapes ---------------------------------------------------------------------------------

    def prompts_per_call(self, bucket: int, slots: int, span: int) -> int:
        """How many sequences' chunks one prefill call of ``bucket`` tokens attending up to
        ``span`` positions may pack."""
        return 1


def layer_tables(tables: jax.Array, cfg: ModelConfig, layer: int) -> jax.Array:
    """The (slots, max blocks) block tables layer ``layer`` reads, of ``tables`` (groups, slots,
    max blocks): the KV group its kind of layer keeps its KV in (``ModelConfig.kv_group``),
    the first where the tables have no group of that kind (every layer then shares one pool)."""
    group = cfg.kv_group(layer)
    return tables[group if group < tables.shape[0] else 0]


def flat_slots(tables: jax.Array, rows: jax.Array, positions: jax.Array, replicas: int, replica_blocks: int,
               block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each token's (replica, block, offset) in a (replicas, blocks, block_size, ...) pool, the
    pool's last block (no table's: padding's) for a row out of range or a position with no
    block. ``rows`` and ``positions`` share a shape; table row r belongs to replica
    ``r // (slots / replicas)``."""
    slots, max_blocks = tables.shape
    index = positions // block_size
    valid = (rows >= 0) & (rows < slots) & (index < max_blocks) & (positions >= 0)
    block = tables[jnp.clip(rows, 0, slots - 1), jnp.clip(index, 0, max_blocks - 1)]
    valid &= block >= 0
    replica = jnp.clip(rows, 0, slots - 1) // (slots // replicas)
    return replica, jnp.where(valid, block, replica_blocks - 1), positions % block_size


def scatter_kv(pool: jax.Array, values: jax.Array, index: tuple) -> jax.Array:
    """values (..., K, E) into a (replicas, blocks, block_size, K, E) pool at each token's
    (replica, block, offset) (``flat_slots``: always in bounds). In place when the pool is
    donated."""
    index = tuple(i.reshape(-1) for i in index)
    values = values.astype(pool.dtype).reshape(index[0].shape[0], *pool.shape[3:])
    if values.shape[0] == 1:
        # One row more, to the padding block: XLA turns a one-row scatter into a
        # dynamic-update-slice that reads the old row apart, and copies the whole pool for it.
        index = tuple(jnp.concatenate([i, jnp.asarray([last], i.dtype)])
                      for i, last in zip(index, (0, pool.shape[1] - 1, 0)))
        values = jnp.concatenate([values, jnp.zeros_like(values)])
    return pool.at[index].set(values, mode="promise_in_bounds")


def select(sharded: bool, cfg: ModelConfig | None = None, plan: Any = None) -> Backend:
    """The backend a runner uses: the native CPU kernels on one CPU device where they build;
    on GPUs XLA with the ragged paged attention kernel where it applies (``gpu_kernel_applies``);
    else XLA. (A mixture of experts' expert layers have no kernel: on the kernels' path they
    run as XLA ops in the same step, and the log says so.)"""
    from model.backends import cpu, gpu, xla

    if cfg is not None and gpu_kernel_applies(cfg, plan):
        return gpu.GpuKernels(mesh=None if plan is None else plan.mesh)
    if not sharded and cpu.available():
        if cfg is not None and cfg.num_experts and not _said_moe:
            _said_moe.append(True)
            log.info("mixture of experts: attention and the dense layers on the CPU kernels, the experts on XLA")
        return cpu.CpuKernels()
    return xla.Xla()


_said_moe: list[bool] = []


def gpu_kernel_applies(cfg: ModelConfig, plan: Any = None) -> bool:
    """Whether attention runs in the GPU kernel: a CUDA device, ``XLASERVE_GPU_KERNEL`` not 0,
    a head size the kernel tiles (a power of two), and on a mesh one data replica with query
    and KV heads both split over ``model`` (each device then holds whole GQA groups)."""
    import os

    from model.backends import gpu

    if os.environ.get("XLASERVE_GPU_KERNEL", "1") == "0" or jax.default_backend() != "gpu":
        return False
    if not gpu.supported(cfg.head_dim):
        return False
    if plan is None:
        return True
    tp = plan.mesh.shape["model"]
    return (plan.mesh.shape["data"] == 1 and plan.rules.get("heads") == "model"
            and plan.rules.get("kv_heads") == "model" and cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0)


def param_bytes(params: Any) -> int:
    """Bytes of a prepared param tree, a leaf shared by two weights (a tied head) once."""
    return sum({id(x): x.nbytes for x in jax.tree.leaves(params)}.values())


def trim_freed_memory() -> bool:
    """Hand the heap's free memory back to the OS now (glibc's malloc_trim), where
    ``keep_freed_memory`` keeps it in the process otherwise: after memory is freed for good,
    not per step (the checkpoint's arrays once the weights are prepared, the compilers'
    working memory after warm-up, the old weights after an update, what a sleep frees). At
    start it took the bundled model's server from 3.1 to 2.6 GB resident. False where it
    does not apply."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the OS. Every
    step frees and allocates the same buffers (activations, logits, a quantized copy of x);
    given back, they return as fresh pages that fault in again on each step. Process-wide;
    False where it does not apply."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # Blocks up to 32 MiB (glibc's largest) come from the heap, and its top is trimmed
        # only past 1 GiB free.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
