"""Device state and the jitted steps: the KV cache, per-slot sampling state, prefill and decode.

Shapes are bucketed so the number of compiled variants is bounded: prefill chunks are padded
to a power of two (``PREFILL_BUCKETS``) and attention reads a power-of-two span of the cache
(``span_buckets``). The cache and sampling state are donated to every step, so XLA updates
them in place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import cpu_kernels, llama
from model.config import ModelConfig
from service import sampling as smp
from sharding.distributed import COPY, DECODE, PREFILL, SET_ROW, STOP


log = logging.getLogger(__name__)

MIN_SPAN = 128

_compiles = 0


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compile_count() -> int:
    """XLA compilations (or persistent-cache loads) in this process so far."""
    return _compiles


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the OS. Every
    step frees and allocates the same buffers (activations, logits, a quantized copy of x);
    given back, they return as fresh pages that fault in again on each step (measured on the
    CPU backend: 1,400-3,000 page faults a decode step in some processes, about 0.4 s of
    system time in a 3.5 s run of 16 streams). Process-wide; False where it does not apply."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # Blocks up to 32 MiB (glibc's largest) come from the heap, and its top is trimmed
        # only past 1 GiB free.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def uses_cpu_kernels(sharded: bool) -> bool:
    """Whether a runner runs on the native CPU kernels: one CPU device (no sharding plan),
    the kernels built. Then weights are packed, activations float32, and the KV cache float32
    unless bfloat16 or int8 is asked."""
    return not sharded and cpu_kernels.available()


def cache_dtype(cfg: ModelConfig, sharded: bool, kv_cache_dtype: str | None = None) -> jnp.dtype:
    """The KV cache's storage dtype: as asked, else float32 on the CPU kernels, else the
    model's. On the kernels a bfloat16 cache is stored as its uint16 bits, and an int8 one
    with each head's scale after its values (``cpu_kernels.to_cache``)."""
    kernels = uses_cpu_kernels(sharded)
    dtype = jnp.dtype(kv_cache_dtype or (jnp.float32 if kernels else cfg.dtype))
    return jnp.dtype(jnp.uint16) if kernels and dtype == jnp.bfloat16 else dtype


def prefill_buckets(max_chunk: int) -> list[int]:
    out, b = [], 16
    while b < max_chunk:
        out.append(b)
        b *= 2
    return out + [max_chunk]


def span_buckets(session_len: int) -> list[int]:
    out, s = [], MIN_SPAN
    while s < session_len:
        out.append(s)
        s *= 2
    return out + [session_len]


def batch_buckets(slots: int) -> list[int]:
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _host(x: jax.Array) -> np.ndarray:
    """A replicated step output as a host array (this process's replica: on a mesh spanning
    processes the others' are not addressable here)."""
    return np.asarray(x.addressable_data(0))


def _copy_slot(cache, src, dst):
    """Row ``src`` of every layer's K and V into row ``dst`` (in place when donated)."""
    return [tuple(jax.lax.dynamic_update_index_in_dim(x, jax.lax.dynamic_index_in_dim(x, src, 0), dst, 0)
                  for x in kv) for kv in cache]


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
                 top_logprobs: int = smp.MAX_TOP_LOGPROBS, plan: Any = None, channel: Any = None,
                 quantize: str | None = None, kv_cache_dtype: str | None = None):
        self.cfg = cfg
        self.plan = plan
        self.channel = channel  # sharding.distributed.StepChannel when the mesh spans processes
        mask = np.zeros((cfg.vocab_size,), bool)
        mask[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
        self.slots = max_batch_size
        self.session_len = session_len
        self.max_chunk = min(max_prefill_chunk, session_len)
        self.prefill_sizes = prefill_buckets(self.max_chunk)
        self.spans = span_buckets(session_len)
        # On one CPU device the native kernels run the model: every projection through
        # packed weights (float32; bfloat16 for a bfloat16 model; int8 with ``quantize``),
        # float32 activations, and attention that reads each query's own context, so neither
        # decode nor prefill needs span buckets (one compile per batch or chunk size).
        self.kernels = uses_cpu_kernels(plan is not None)
        if jax.default_backend() == "cpu":
            keep_freed_memory()
        if quantize is not None and not self.kernels:
            raise ValueError(f"quantize={quantize!r} needs the native CPU kernels: one CPU device, "
                             "no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0")
        if (self.kernels and kv_cache_dtype is not None
                and jnp.dtype(kv_cache_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                      jnp.dtype(jnp.int8))):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: the CPU kernels keep the KV cache "
                             "in float32, bfloat16 or int8")
        if not self.kernels and kv_cache_dtype is not None and jnp.dtype(kv_cache_dtype) == jnp.int8:
            raise ValueError("kv_cache_dtype='int8' needs the native CPU kernels: one CPU device, "
                             "no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0")
        if quantize == "w8a8" and not cpu_kernels.int8_dot_native():
            log.warning("w8a8: this CPU has no AVX512-VNNI; int8 dot products run in scalar code "
                        "(slow): prefer --quantize int8")
        self.decode_spans = [session_len] if self.kernels else self.spans
        self.prefill_spans = [session_len] if self.kernels else self.spans
        # Slots split over a data axis decode at full width, each replica over its own rows:
        # gathering a compacted batch from rows on other devices would move their KV.
        self.full_width = plan is not None and plan.mesh.shape["data"] > 1
        self.batch_sizes = [max_batch_size] if self.full_width else batch_buckets(max_batch_size)
        self.top_n = top_logprobs
        # Every array is committed to its final placement, like every later (jit-output) value
        # of it: otherwise the second call of each step sees new input shardings and compiles
        # all over again.
        if plan is None:
            device = jax.devices()[0]
            place = lambda tree: jax.device_put(tree, device)  # noqa: E731
            self._cache_sh = self._sampling_sh = self._out_sh = None
            self.params = llama.pack_params(params, cfg, quantize) if self.kernels else params
            self.eos_mask = place(jnp.asarray(mask))
        else:
            cache_sh = plan.cache_sharding()
            self._cache_sh = [(cache_sh, cache_sh)] * cfg.num_layers
            self._sampling_sh = jax.tree.map(lambda x: plan.slot_sharding(x.ndim),
                                             jax.eval_shape(lambda: smp.SlotSampling.empty(
                                                 max_batch_size, cfg.vocab_size)))
            self._out_sh = plan.replicated
            self.params = jax.device_put(params, plan.param_shardings(cfg))
            self.eos_mask = jax.device_put(mask, plan.replicated)
        # Every step looks its positions' cos/sin up here (see llama.rope_table).
        self.rope = jax.device_put(llama.rope_table(cfg, session_len),
                                   jax.devices()[0] if plan is None else plan.replicated)
        # Created directly in place (sharded when there is a plan), never whole on one device.
        kv_dtype = cache_dtype(cfg, plan is not None, kv_cache_dtype)
        self.cache = jax.jit(lambda: llama.init_cache(cfg, max_batch_size, session_len, kv_dtype),
                             out_shardings=self._cache_sh)()
        self.sampling = jax.jit(lambda: smp.SlotSampling.empty(max_batch_size, cfg.vocab_size),
                                out_shardings=self._sampling_sh)()
        if plan is None:
            self.cache, self.sampling = place(self.cache), place(self.sampling)
        weight_mib = sum(x.nbytes for x in jax.tree.leaves(self.params)) / 2**20
        cache_mib = sum(x.nbytes for kv in self.cache for x in kv) / 2**20
        log.info("%s: weights %s, %.0f MiB; KV cache %s, %.0f MiB (%d slots x %d positions)",
                 "native CPU kernels" if self.kernels else f"XLA on {jax.devices()[0].platform}",
                 quantize or cfg.dtype, weight_mib, "bfloat16" if kv_dtype == jnp.uint16 else kv_dtype.name,
                 cache_mib, max_batch_size, session_len)
        self._token_sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if plan is None
                                else plan.replicated)
        step_out = None if plan is None else (self._cache_sh, self._sampling_sh, self._out_sh)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("span",), donate_argnums=(1, 2),
                                out_shardings=step_out)
        self._decode = jax.jit(self._decode_fn, static_argnames=("span",), donate_argnums=(1, 2),
                               out_shardings=step_out)
        self._set_row = jax.jit(smp.set_row, donate_argnums=(0,), out_shardings=self._sampling_sh)
        self._copy_slot = jax.jit(_copy_slot, donate_argnums=(0,), out_shardings=self._cache_sh)

    def _gathered(self, logits: jax.Array) -> jax.Array:
        """Logits whole on every device (vocab-split lm_head) before sampling."""
        if self.plan is None:
            return logits
        # Computed split over vocab where the head is (so no device gathers the head's weight),
        # then gathered: (b, V) logits are far smaller than the (D, V) head.
        logits = jax.lax.with_sharding_constraint(logits, self.plan.sharding((None, "vocab")))
        return jax.lax.with_sharding_constraint(logits, self.plan.replicated)

    # -- jitted bodies -------------------------------------------------------------------------

    def _prefill_fn(self, params, cache, sampling, rope, tokens, positions, rows, ends, slots, last, steps,
                    live, span):
        """Chunks of up to P sequences packed into one row of tokens.

        tokens, positions (1, T), padded at the end (padding positions are out of range, so
        their cache writes are dropped); rows: each token's cache row (1, T) on the kernels,
        else the one chunk's (1,). ends, slots, last (P,): each chunk's last index in
        ``tokens``, its slot (padding entries: out of range) and whether it ends its prompt.
        steps (P,): tokens each chunk's sequence generated so far (0 for a prompt; a decode
        row riding along is a one-token chunk with its own count, as ``_decode_fn`` has it).
        live: the real tokens' count (the kernels' projections skip the padding).

        Returns the token sampled at each chunk's last position (P,) with its logprobs. Only
        a chunk that ends its prompt really emits its token; only those are accounted for
        penalties.
        """
        hidden, cache = llama.forward(params, self.cfg, tokens, positions, cache, span=span,
                                      rows=rows, attn_kernel=self.kernels, rope=rope, live=live)
        final = jnp.take(hidden[0], ends, axis=0)  # (P, D)
        logits = self._gathered(llama.logits(params, self.cfg, final))  # (P, V)
        out = smp.sample(logits, sampling, steps, self.eos_mask, self.top_n, rows=slots)
        sampling = smp.record(sampling, out[0], jnp.where(last > 0, slots, self.slots))
        return cache, sampling, out

    def _decode_fn(self, params, cache, sampling, rope, tokens, positions, steps, rows, live, span):
        """One token for each of the slots ``rows`` (b,): tokens, positions, steps (b,).

        b is a bucket of the live slot count, so the step costs what the live requests need,
        not what ``max_batch_size`` allows. Padding rows name slot ``self.slots`` (out of
        range): their cache and sampling-state writes are dropped. In full-width mode
        ``rows`` is None and batch row i is slot i.
        """
        hidden, cache = llama.forward(params, self.cfg, tokens[:, None], positions[:, None], cache,
                                      span=span, rows=rows, attn_kernel=self.kernels, rope=rope, live=live)
        logits = self._gathered(llama.logits(params, self.cfg, hidden[:, 0], live))  # (b, V)
        out = smp.sample(logits, sampling, steps, self.eos_mask, self.top_n, rows=rows)
        sampling = smp.record(sampling, out[0], rows)
        return cache, sampling, out

    # -- host API (engine thread only) ----------------------------------------------------------
    # Inputs go in as numpy values, which every process of a multi-process mesh can pass.
    # With a ``channel`` (several processes), process 0 announces each step before running it
    # and the others replay it in ``follow``.

    def set_slot(self, slot: int, params: smp.SamplingParams, prompt_ids, seed: int) -> None:
        row = smp.row_values(params, self.cfg.vocab_size, prompt_ids, seed)
        if self.channel is not None:
            self.channel.send(SET_ROW, (slot,), row)
        self._run_set_row(slot, row)

    def _run_set_row(self, slot: int, row) -> None:
        self.sampling = self._set_row(self.sampling, np.int32(slot), row)

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s KV into slot ``dst`` (a prompt prefix they share is then
        prefilled once: n > 1 samples, common system prompts)."""
        if self.channel is not None:
            self.channel.send(COPY, (src, dst))
        self._run_copy(src, dst)

    def _run_copy(self, src: int, dst: int) -> None:
        self.cache = self._copy_slot(self.cache, np.int32(src), np.int32(dst))

    def prompts_per_call(self, n_tokens: int) -> int:
        """How many sequences' chunks one prefill call of ``n_tokens`` may pack. The kernels
        take cache rows per token: up to one chunk per 4 tokens of the call's bucket, at most
        one per slot. Every call samples that many rows, which a lone short prompt pays for
        (about 0.7 ms at 4 rows, 3 ms at 16, on the default model). XLA attends per batch
        row: one."""
        if not self.kernels:
            return 1
        return min(self.slots, max(1, bucket_for(n_tokens, self.prefill_sizes) // 4))

    def _prefill_arrays(self, size: int, p: int):
        """Zeroed inputs of a prefill call: tokens, positions, rows, ends, slots, last, steps."""
        z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        return z(1, size), z(1, size), z(1, size) if self.kernels else z(1), z(p), z(p), z(p), z(p)

    def prefill(self, slot: int, tokens: list[int], start: int, last: bool = True):
        """Prefill one chunk (len <= max_chunk) of a slot's sequence at ``start``. Returns host
        arrays (token, logprob, top ids, top logprobs) of the chunk's last position."""
        out = self.prefill_packed([(slot, tokens, start, last)])
        return tuple(None if x is None else x[:1] for x in out)

    def prefill_packed(self, chunks: list[tuple]):
        """Prefill chunks (slot, tokens, start, last[, step]) of different slots in one call:
        at most ``prompts_per_call`` of them, ``max_chunk`` tokens in all. Returns host arrays
        (tokens, logprobs, top ids, top logprobs) whose first rows follow ``chunks``: the token
        sampled at each chunk's last position (meaningful where the chunk ends its prompt).

        A decode row can ride along as a one-token chunk (its last token at its position,
        ``last`` true, ``step`` its generated count): its sampled token is its next one."""
        n = sum(len(c[1]) for c in chunks)
        size = bucket_for(n, self.prefill_sizes)
        p = self.prompts_per_call(n)
        if not chunks or len(chunks) > p or len({c[0] for c in chunks}) < len(chunks):
            raise ValueError(f"a prefill call packs 1 to {p} chunks of distinct slots, "
                             f"got {len(chunks)}")
        tokens, positions, rows, ends, slots, last, steps = self._prefill_arrays(size, p)
        positions[:] = self.session_len  # padding: out of range, writes dropped
        rows[:] = self.slots
        slots[:] = self.slots
        i = 0
        for j, (slot, toks, start, is_last, *step) in enumerate(chunks):
            k = len(toks)
            tokens[0, i:i + k] = toks
            positions[0, i:i + k] = np.arange(start, start + k)
            if self.kernels:
                rows[0, i:i + k] = slot
            else:
                rows[0] = slot  # (1,): the one chunk's slot
            ends[j], slots[j], last[j], steps[j] = i + k - 1, slot, is_last, step[0] if step else 0
            i += k
        starts = [c[2] for c in chunks]
        span = bucket_for(min(max(starts) + size, self.session_len), self.prefill_spans)
        arrays = (tokens, positions, rows, ends, slots, last, steps)
        if self.channel is not None:
            self.channel.send(PREFILL, (size, p, span, n), arrays)
        out = self._run_prefill(arrays, n, span)
        return tuple(None if x is None else _host(x) for x in out)

    def _run_prefill(self, arrays, n, span):
        self.cache, self.sampling, out = self._prefill(
            self.params, self.cache, self.sampling, self.rope, *arrays, np.int32(n), span=span)
        return out

    def decode(self, slots: list[int], tokens: list[int], positions: list[int], steps: list[int]):
        """One step for the given slots (each with its last token, that token's position and
        the count of tokens it generated so far). Returns host arrays (tokens, logprobs,
        top ids, top logprobs) whose rows follow ``slots``."""
        return self.fetch(self.dispatch_decode(slots, tokens, positions, steps))

    def dispatch_decode(self, slots: list[int], tokens, positions: list[int], steps: list[int]):
        """Start a decode step and return its handle without waiting for it (``fetch`` waits).

        ``tokens`` is a list of ints, or the handle of the previous step over the same slots:
        then its sampled tokens feed this step on the device, so step t+1 is queued before
        the host has even looked at step t's tokens."""
        n = len(slots)
        b = bucket_for(n, self.batch_sizes)
        span = bucket_for(max(positions) + 1, self.decode_spans)
        # Batch row of each given slot: itself at full width, else packed from row 0.
        where = np.asarray(slots) if self.full_width else np.arange(n)
        pos = np.full((b,), self.session_len, np.int32)  # padding: out of range, writes dropped
        st = np.zeros((b,), np.int32)
        pos[where], st[where] = positions, steps
        rows = np.full((b,), self.slots, np.int32)
        rows[:n] = slots
        if isinstance(tokens, DecodeHandle):
            if tokens.rows.shape != rows.shape or (tokens.rows != rows).any() or self.channel is not None:
                raise ValueError("chained decode steps must cover the same slots on one process")
            tok = tokens.out[0]
        else:
            host_tok = np.zeros((b,), np.int32)
            host_tok[where] = tokens
            if self.channel is not None:
                self.channel.send(DECODE, (b, span, n), (host_tok, pos, st, rows))
            # Placed like a step's own output tokens, so both kinds of input share one compile.
            tok = jax.device_put(host_tok, self._token_sharding)
        out = self._run_decode(tok, pos, st, rows, n, span)
        return DecodeHandle(out, where, rows)

    def fetch(self, handle: "DecodeHandle"):
        """Wait for a dispatched step: host arrays whose rows follow its slots."""
        return tuple(None if x is None else _host(x)[handle.where] for x in handle.out)

    def _run_decode(self, tok, pos, st, rows, n, span):
        # Live rows first, padding after (at full width every row is a slot: all count).
        live = np.int32(len(pos) if self.full_width else n)
        rows = None if self.full_width else rows
        self.cache, self.sampling, out = self._decode(
            self.params, self.cache, self.sampling, self.rope, tok, pos, st, rows, live, span=span)
        return out

    def follow(self) -> None:
        """On processes other than 0: replay the steps process 0 announces, until it stops."""
        like_row = smp.row_values(smp.SamplingParams(), self.cfg.vocab_size, [0], 0)
        while True:
            header = self.channel.receive_header()
            op, ints = int(header[0]), [int(x) for x in header[1:]]
            if op == STOP:
                return
            if op == SET_ROW:
                self._run_set_row(ints[0], self.channel.receive(like_row))
            elif op == PREFILL:
                size, p, span, n = ints[:4]
                self._run_prefill(self.channel.receive(self._prefill_arrays(size, p)), n, span)
            elif op == COPY:
                self._run_copy(ints[0], ints[1])
            elif op == DECODE:
                b, span, n = ints[:3]
                z = np.zeros((b,), np.int32)
                tok, pos, st, rows = self.channel.receive((z, z, z, z))
                self._run_decode(jax.device_put(tok, self._token_sharding), pos, st, rows, n, span)
            else:
                raise RuntimeError(f"unknown step {op} from process 0")

    def stop_followers(self) -> None:
        """Process 0: release the other processes (once)."""
        if self.channel is not None and self.channel.leader:
            self.channel.send(STOP)
            self.channel = None

    def compiled_variants(self) -> int:
        return sum(f._cache_size() for f in (self._prefill, self._decode, self._set_row))

    def warmup_shapes(self) -> list[tuple]:
        shapes = [("decode", b, s) for b in self.batch_sizes for s in self.decode_spans]
        return shapes + [("prefill", n, s) for n in self.prefill_sizes for s in self.prefill_spans
                         if s >= n]

    def warmup(self, progress=None) -> None:
        """Compile every prefill/decode shape now, so serving never compiles."""
        shapes = self.warmup_shapes()
        self.set_slot(0, smp.SamplingParams(), [0], 0)
        self.copy_slot(0, 0)
        for i, shape in enumerate(shapes):
            if progress:
                progress(i, len(shapes), shape)
            if shape[0] == "decode":
                b, span = shape[1], shape[2]
                self.decode(list(range(b)), [0] * b, [span - 1] * b, [0] * b)
            else:
                n, span = shape[1], shape[2]
                self.prefill(0, [0] * n, span - n)
        jax.block_until_ready(self.cache)
