"""The runner: device state (params, paged KV cache, per-slot sampling state) and the host API
that runs the jitted steps of ``steps`` over it, padded to the shapes of ``shapes``; ``execute``
runs a scheduler's plan.

The KV cache is a pool of ``num_blocks`` blocks of ``block_size`` positions per data replica;
each step is given the block tables of every slot (``tables``, (slots, max blocks) int32, the
block manager's). Called without tables, slot s owns the blocks ``s * M .. (s + 1) * M - 1``
of its replica (``identity``), as when every slot held a ``session_len`` row.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import layers
from model.backends import Backend, keep_freed_memory, param_bytes, select
from model.config import ModelConfig
from service import sampling as smp
from service.engine.plan import StepPlan
from service.engine.shapes import StepShapes
from service.engine.steps import Steps
from service.params import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

_compiles = 0


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compile_count() -> int:
    """XLA compilations (or persistent-cache loads) in this process so far."""
    return _compiles


def window_pool_blocks(window: int | None, slots: int, block_size: int, session_len: int,
                       max_chunk: int = 512) -> int:
    """Blocks of one data replica's pool for the sliding-window layers (see
    ``service.engine.blocks``): every slot's window and the block it writes, then a prefill
    step's chunks beyond their windows twice over, so prefixes and sessions stay cached a
    while. 0 when windows do not make the pool smaller than a session per slot."""
    if not window:
        return 0
    per_sequence = -(-(window - 1) // block_size) + 2
    chunks = -(-min(max_chunk, session_len) // block_size) + 1
    blocks = slots * per_sequence + 2 * chunks
    return blocks if blocks < slots * -(-session_len // block_size) else 0


def _host(x: jax.Array) -> np.ndarray:
    """A replicated step output as a host array (this process's replica: on a mesh spanning
    processes the others' are not addressable here)."""
    return np.asarray(x.addressable_data(0))


def replayed(method):
    """A step every process of a multi-process mesh runs: process 0 announces the call (its
    name and host arguments) before running it, and the others replay it in ``follow``."""

    @functools.wraps(method)
    def announced(self, *args):
        if self.channel is not None and self.channel.leader:
            self.channel.announce(method.__name__, args)
        return method(self, *args)

    return announced


@dataclasses.dataclass
class DecodeHandle:
    """A dispatched decode step: its device outputs, and where its slots' rows are."""

    out: tuple
    where: np.ndarray
    rows: np.ndarray


class ModelRunner:
    """Owns the device state. With a sharding ``plan`` (see ``sharding``), params, KV cache and
    per-slot state live sharded on its mesh: weights split over ``model`` (tensor parallel),
    slots over ``data`` (data parallel); logits are gathered before sampling."""

    def __init__(self, cfg: ModelConfig, params: Any, max_batch_size: int, session_len: int,
                 eos_ids: frozenset[int] = frozenset(), max_prefill_chunk: int = 512,
                 top_logprobs: int = MAX_TOP_LOGPROBS, plan: Any = None, channel: Any = None,
                 quantize: str | None = None, kv_cache_dtype: str | None = None,
                 backend: Backend | None = None, block_size: int = 32, num_blocks: int | None = None,
                 window_blocks: int = 0):
        self.cfg = cfg
        self.plan = plan
        self.channel = channel  # sharding.distributed.StepChannel when the mesh spans processes
        mask = np.zeros((cfg.vocab_size,), bool)
        mask[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
        self.slots = max_batch_size
        self.session_len = session_len
        self.max_chunk = min(max_prefill_chunk, session_len)
        # The device path, chosen once: the native CPU kernels on one CPU device, else XLA.
        self.backend = backend or select(sharded=plan is not None, cfg=cfg, plan=plan)
        self.backend.check(quantize, kv_cache_dtype)
        if jax.default_backend() == "cpu":
            keep_freed_memory()
        self.full_width = plan is not None and plan.mesh.shape["data"] > 1
        self.replicas = 1 if plan is None else plan.mesh.shape["data"]
        if max_batch_size % self.replicas:
            raise ValueError(f"{max_batch_size} slots do not split over {self.replicas} data replicas")
        if block_size < 1 or block_size % 16:
            raise ValueError(f"--block-size {block_size}: a multiple of 16 positions")
        self.block_size = block_size
        self.max_blocks = -(-session_len // block_size)  # table entries of one sequence
        # Per replica; by default every slot can hold a whole session.
        self.num_blocks = num_blocks or max_batch_size // self.replicas * self.max_blocks
        # The sliding-window layers' own pool (see service.engine.blocks): ``window_blocks``
        # blocks per replica, the tables a step takes then (2, slots, max blocks).
        self.window = cfg.sliding_window if window_blocks and cfg.sliding_window and window_blocks < self.num_blocks \
            else None
        self.window_blocks = window_blocks if self.window else 0
        if self.window and window_blocks < -(-self.window // block_size) + 2:
            raise ValueError(f"{window_blocks} blocks of {block_size} cannot hold one sequence's window of "
                             f"{self.window} positions")
        self.identity = None if self.window else self._identity_tables()
        self.shapes = StepShapes(self.backend, max_batch_size, cfg.vocab_size, session_len, self.max_chunk,
                                 self.full_width, block_size)
        # Every array is committed to its final placement, like every later (jit-output) value
        # of it: otherwise the second call of each step sees new input shardings and compiles
        # all over again.
        if plan is None:
            device = jax.devices()[0]
            place = lambda tree: jax.device_put(tree, device)  # noqa: E731
            self._cache_sh = self._sampling_sh = self._out_sh = None
            self.params = self.backend.prepare(params, cfg, quantize)
            self.eos_mask = place(jnp.asarray(mask))
        else:
            cache_sh = plan.cache_sharding()
            self._cache_sh = [(cache_sh, cache_sh)] * cfg.num_layers
            self._sampling_sh = jax.tree.map(lambda x: plan.slot_sharding(x.ndim),
                                             jax.eval_shape(lambda: smp.SlotSampling.empty(
                                                 max_batch_size, cfg.vocab_size)))
            self._out_sh = plan.replicated
            self.params = self.backend.prepare(jax.device_put(params, plan.param_shardings(cfg)), cfg)
            self.eos_mask = jax.device_put(mask, plan.replicated)
        # Every step looks its positions' cos/sin up here (see layers.rope_tables).
        self.rope = jax.device_put(layers.rope_tables(cfg, session_len),
                                   jax.devices()[0] if plan is None else plan.replicated)
        kv_dtype = self._kv_dtype = self.backend.cache_dtype(cfg, kv_cache_dtype)
        # Tests set this to an exception the next step raises after its state was donated (as a
        # step failing on the device would), to check that the engine recovers.
        self.fault: Exception | None = None
        self._new_state()
        weight_mib = param_bytes(self.params) / 2**20
        cache_mib = sum(x.nbytes for kv in self.cache for x in kv) / 2**20
        log.info("%s: weights %s, %.0f MiB; KV cache %s, %.0f MiB: %d blocks of %d positions (%d tokens)%s%s, "
                 "%d slots", self.backend.describe(),
                 quantize or cfg.dtype, weight_mib, "bfloat16" if kv_dtype == jnp.uint16 else kv_dtype.name,
                 cache_mib, self.num_blocks, block_size, self.num_blocks * block_size,
                 f", the {sum(map(cfg.is_sliding, range(cfg.num_layers)))} sliding-window layers "
                 f"{self.window_blocks} blocks" if self.window else "",
                 f" per data replica (x{self.replicas})" if self.replicas > 1 else "", max_batch_size)
        self._token_sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if plan is None
                                else plan.replicated)
        self._prefill, self._decode, self._set_row, self._score = Steps(
            cfg, self.backend, max_batch_size, top_logprobs, plan).jitted(self._cache_sh, self._sampling_sh,
                                                                            self._out_sh)

    def _new_state(self) -> None:
        """The KV cache and sampling state, created directly in place (sharded when there is a
        plan), never whole on one device; every block and row empty."""
        cfg = self.cfg
        self.cache = jax.jit(lambda: self.backend.init_cache(cfg, self.num_blocks, self.block_size, self._kv_dtype,
                                                             self.replicas, self.window_blocks),
                             out_shardings=self._cache_sh)()
        self.sampling = jax.jit(lambda: smp.SlotSampling.empty(self.slots, cfg.vocab_size),
                                out_shardings=self._sampling_sh)()
        if self.plan is None:
            device = jax.devices()[0]
            self.cache, self.sampling = jax.device_put((self.cache, self.sampling), device)

    def recover(self) -> bool:
        """After a failed step: whether the device state survived; if a step had taken the
        (donated) KV cache or sampling state with it, both are made anew, empty, so the next
        steps run (every sequence's KV and sampling row must then be set again)."""
        leaves = jax.tree.leaves((self.cache, self.sampling))
        if not any(x.is_deleted() for x in leaves):
            return True
        log.warning("the failed step consumed the KV cache; creating it anew")
        self._new_state()
        return False

    def _identity_tables(self) -> np.ndarray | None:
        """Slot s owning its replica's blocks s' * M .. (s' + 1) * M - 1 (s' its index in the
        replica); None when the pool is too small for that."""
        per = self.slots // self.replicas
        if self.num_blocks < per * self.max_blocks:
            return None
        local = np.arange(self.slots) % per
        return (local[:, None] * self.max_blocks + np.arange(self.max_blocks)[None, :]).astype(np.int32)

    def empty_tables(self) -> np.ndarray:
        """Tables of the shape every step takes, every entry block 0."""
        shape = (self.slots, self.max_blocks)
        return np.zeros((2, *shape) if self.window else shape, np.int32)

    def _tables(self, tables):
        if tables is not None:
            return tables
        if self.identity is None:
            raise ValueError("this pool is smaller than a session per slot (or has a window group): "
                             "pass block tables")
        return self.identity

    # -- host API (engine thread only) ----------------------------------------------------------
    # Inputs go in as numpy values, which every process of a multi-process mesh can pass.
    # With a ``channel`` (several processes), process 0 announces each step before running it
    # and the others replay it in ``follow``.

    def execute(self, plan: StepPlan, inflight: "DecodeHandle | None" = None, masks: dict | None = None):
        """Run a step's plan: its prefill calls in order, then dispatch its decode
        step (fed by ``inflight``'s tokens on the device when the plan chains on it). ``masks``:
        the token bitmask row (W,) int32 of each slot a grammar constrains this step. Returns
        the prefill calls' host outputs and the decode step's handle (or None)."""
        results = []
        tables = plan.tables
        for op in plan.ops:
            if op.verify:
                results.append(self.verify([(c.slot, list(c.tokens), c.start, c.step) for c in op.chunks], tables))
                continue
            results.append(self.prefill_packed(
                [(c.slot, list(c.tokens), c.start, c.last, c.step, c.score, c.next_token) for c in op.chunks],
                masks, tables, hidden=op.embeds))
        handle = None
        d = plan.decode
        if d is not None:
            handle = self.dispatch_decode(list(d.slots), inflight if d.chained else list(d.tokens),
                                          list(d.positions), list(d.steps), masks, tables)
        return results, handle

    def set_slot(self, slot: int, params: SamplingParams, prompt_ids, seed: int) -> None:
        self._set_row_step(slot, smp.row_values(params, self.cfg.vocab_size, prompt_ids, seed))

    @replayed
    def _set_row_step(self, slot: int, row) -> None:
        self.sampling = self._set_row(self.sampling, np.int32(slot), row)

    def prompts_per_call(self, n_tokens: int, max_start: int = 0) -> int:
        return self.shapes.prompts_per_call(n_tokens, max_start)

    def prefill(self, slot: int, tokens: list[int], start: int, last: bool = True):
        """Prefill one chunk (len <= max_chunk) of a slot's sequence at ``start``. Returns host
        arrays (token, logprob, top ids, top logprobs) of the chunk's last position."""
        out = self.prefill_packed([(slot, tokens, start, last)])
        return tuple(None if x is None else x[:1] for x in out[:4])

    def prefill_packed(self, chunks: list[tuple], masks: dict | None = None, tables: np.ndarray | None = None,
                       hidden: bool = False):
        """Prefill chunks (slot, tokens, start, last[, step[, score, next token]]) of different
        slots in one call: at most ``prompts_per_call`` of them, ``max_chunk`` tokens in all.
        Returns host arrays (tokens, logprobs, top ids, top logprobs) whose first rows follow
        ``chunks``: the token sampled at each chunk's last position (meaningful where the chunk
        ends its prompt); then, when a chunk is scored, the call's (T,) logprobs of each
        position's successor and its (T, K) top ids and logprobs, rows in the chunks' order
        (else three Nones).

        A decode row can ride along as a one-token chunk (its last token at its position,
        ``last`` true, ``step`` its generated count): its sampled token is its next one.

        ``hidden``: one more array, the call's final hidden states (T, D) as float32, rows in
        the chunks' order (embedding requests pool them)."""
        self._check_positions(max(c[2] + len(c[1]) for c in chunks) - 1)
        arrays, n, span = self.shapes.prefill_inputs(chunks, masks)
        out, states = self._prefill_step(self._tables(tables), arrays, n, span)
        sampled = tuple(None if x is None else _host(x) for x in out[:4])
        scored = tuple(_host(x) for x in out[4:]) if arrays[-1] else (None, None, None)
        return sampled + scored + ((_host(states)[:n].astype(np.float32),) if hidden else ())

    def verify(self, chunks: list[tuple], tables: np.ndarray | None = None):
        """A verify call (speculative decoding): decode rows (slot, tokens, start, step), each
        its last token at ``start`` and its draft tokens after it, of distinct slots. Returns
        host arrays (tokens, logprobs, top ids, top logprobs) with a row per position, in the
        chunks' order: the token drawn after each position, as a decode step at that
        position (``step`` + its offset) would draw it."""
        self._check_positions(max(c[2] + len(c[1]) for c in chunks) - 1)
        arrays, n, span = self.shapes.verify_inputs(chunks)
        out, _ = self._prefill_step(self._tables(tables), arrays, n, span)
        return tuple(None if x is None else _host(x)[:n] for x in out[:4])

    @replayed
    def _prefill_step(self, tables, arrays, n, span):
        *inputs, following, scored = arrays
        cache, sampling, (out, hidden) = self._prefill(
            self.params, self.cache, self.sampling, self.rope, self.eos_mask, tables, *inputs, np.int32(n),
            span=span)
        self._raise_fault()
        self.cache, self.sampling = cache, sampling
        if scored:
            out = (*out, *self._score(self.params, hidden, following, np.int32(n)))
        return out, hidden

    def _check_positions(self, last: int) -> None:
        """Every real token's position has a row in the RoPE table (``session_len`` rows): the
        step looks positions up with clipping, which only padding may rely on."""
        if last >= self.session_len:
            raise ValueError(f"position {last} is past the {self.session_len} positions a sequence may hold "
                             "(--session-len)")

    def decode(self, slots: list[int], tokens: list[int], positions: list[int], steps: list[int]):
        """One step for the given slots (each with its last token, that token's position and
        the count of tokens it generated so far). Returns host arrays (tokens, logprobs,
        top ids, top logprobs) whose rows follow ``slots``."""
        return self.fetch(self.dispatch_decode(slots, tokens, positions, steps))

    def dispatch_decode(self, slots: list[int], tokens, positions: list[int], steps: list[int],
                        masks: dict | None = None, tables: np.ndarray | None = None):
        """Start a decode step and return its handle without waiting for it (``fetch`` waits).

        ``tokens`` is a list of ints, or the handle of the previous step over the same slots:
        then its sampled tokens feed this step on the device, so step t+1 is queued before
        the host has even looked at step t's tokens."""
        n = len(slots)
        self._check_positions(max(positions))
        tables = self._tables(tables)
        pos, st, rows, allowed, where, span = self.shapes.decode_inputs(slots, positions, steps, masks)
        if isinstance(tokens, DecodeHandle):
            if tokens.rows.shape != rows.shape or (tokens.rows != rows).any() or self.channel is not None:
                raise ValueError("chained decode steps must cover the same slots on one process")
            out = self._run_decode(tables, tokens.out[0], pos, st, rows, allowed, n, span)
        else:
            host_tok = np.zeros(rows.shape, np.int32)
            host_tok[where] = tokens
            out = self._decode_step(tables, host_tok, pos, st, rows, allowed, n, span)
        return DecodeHandle(out, where, rows)

    @replayed
    def _decode_step(self, tables, host_tok, pos, st, rows, allowed, n, span):
        # Placed like a step's own output tokens, so both kinds of input share one compile.
        return self._run_decode(tables, jax.device_put(host_tok, self._token_sharding), pos, st, rows, allowed, n,
                                span)

    def fetch(self, handle: "DecodeHandle"):
        """Wait for a dispatched step: host arrays whose rows follow its slots."""
        return tuple(None if x is None else _host(x)[handle.where] for x in handle.out)

    def _run_decode(self, tables, tok, pos, st, rows, allowed, n, span):
        # Live rows first, padding after (at full width every row is a slot: all count).
        live = np.int32(len(pos) if self.full_width else n)
        rows = None if self.full_width else rows
        cache, sampling, out = self._decode(
            self.params, self.cache, self.sampling, self.rope, self.eos_mask, tables, tok, pos, st, rows, allowed,
            live, span=span)
        self._raise_fault()
        self.cache, self.sampling = cache, sampling
        return out

    def _raise_fault(self) -> None:
        if self.fault is not None:
            fault, self.fault = self.fault, None
            raise fault

    def follow(self) -> None:
        """On processes other than 0: replay the steps process 0 announces, until it stops."""
        while (call := self.channel.next_call()) is not None:
            name, args = call
            getattr(self, name)(*args)

    def stop_followers(self) -> None:
        """Process 0: release the other processes (once)."""
        if self.channel is not None and self.channel.leader:
            self.channel.stop()
            self.channel = None

    def compiled_variants(self) -> int:
        return sum(f._cache_size() for f in (self._prefill, self._decode, self._set_row, self._score))

    def warmup(self, progress=None, verify_tokens: int = 0) -> None:
        """Compile every prefill/decode shape now, so serving never compiles (``verify_tokens``:
        the most tokens a verify call of speculative decoding holds; 0: none)."""
        shapes = self.shapes.warmup_shapes(verify_tokens)
        self.set_slot(0, SamplingParams(), [0], 0)
        # Nothing is cached yet: every position of every slot may land in block 0.
        tables = self.empty_tables()
        for i, shape in enumerate(shapes):
            if progress:
                progress(i, len(shapes), shape)
            if shape[0] == "decode":
                b, span = shape[1], shape[2]
                self.fetch(self.dispatch_decode(list(range(b)), [0] * b, [span - 1] * b, [0] * b, tables=tables))
            elif shape[0] == "verify":
                n, span = shape[1], shape[2]
                self.verify([(0, [0] * n, span - n, 1)], tables=tables)
            elif shape[0] == "score":  # a scored prompt: its prefill, then its scores
                self.prefill_packed([(0, [0] * shape[1], 0, True, 0, True, 0)], tables=tables)
            else:
                n, span = shape[1], shape[2]
                self.prefill_packed([(0, [0] * n, span - n, True)], tables=tables)
        jax.block_until_ready(self.cache)
