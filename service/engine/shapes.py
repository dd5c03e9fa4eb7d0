"""The bounded set of step shapes, and a step's host inputs padded to them (plain numpy: no
device, so every process of a multi-process mesh can pass them).

Prefill calls are padded to a power-of-two token count (``prefill_sizes``), decode steps to a
power-of-two batch (``batch_sizes``), and on a backend that attends a span of the cache, that
span to a power of two (``spans``). Every shape is compiled at warm-up, so serving never
compiles.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from model.backends import Backend

MIN_SPAN = 128


def _doubling(start: int, limit: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class StepShapes:
    backend: Backend
    slots: int
    vocab: int
    session_len: int
    max_chunk: int
    # Slots split over a data axis decode at full width, each replica over its own rows:
    # gathering a compacted batch from rows on other devices would move their KV.
    full_width: bool = False
    block_size: int = 32

    @functools.cached_property
    def pad_position(self) -> int:
        """A padding token's position: past every block table's last entry, so its KV write
        is dropped."""
        return -(-self.session_len // self.block_size) * self.block_size

    @functools.cached_property
    def prefill_sizes(self) -> list[int]:
        return _doubling(16, self.max_chunk)

    @functools.cached_property
    def spans(self) -> list[int]:
        # A backend that reads each query's own context needs no span buckets.
        return [self.session_len] if self.backend.reads_own_context else _doubling(MIN_SPAN, self.session_len)

    @functools.cached_property
    def batch_sizes(self) -> list[int]:
        return [self.slots] if self.full_width else _doubling(1, self.slots)

    def prefill_span(self, n_tokens: int, max_start: int) -> int:
        """The span bucket a prefill call of ``n_tokens`` whose chunks start at most at
        ``max_start`` attends."""
        size = bucket_for(n_tokens, self.prefill_sizes)
        return bucket_for(min(max_start + size, self.session_len), self.spans)

    def prompts_per_call(self, n_tokens: int, max_start: int = 0) -> int:
        """How many sequences' chunks one prefill call of ``n_tokens`` whose chunks start at most
        at ``max_start`` may pack (the backend says, from the call's size and span)."""
        return self.backend.prompts_per_call(bucket_for(n_tokens, self.prefill_sizes), self.slots,
                                             self.prefill_span(n_tokens, max_start))

    @property
    def mask_words(self) -> int:
        """int32 words of a token bitmask row (see ``sampling.sample``)."""
        return (self.vocab + 31) // 32

    def allowed(self, b: int, slots, masks: dict | None) -> np.ndarray:
        """(b, W) token bitmasks of batch rows whose slots are ``slots``: the grammar's row of
        each slot in ``masks``, all ones (unconstrained) elsewhere."""
        if not masks:
            return self._all_allowed(b)
        out = np.full((b, self.mask_words), -1, np.int32)
        for i, slot in enumerate(slots):
            if int(slot) in masks:
                out[i] = masks[int(slot)]
        return out

    @functools.lru_cache(maxsize=None)
    def _all_allowed(self, b: int) -> np.ndarray:
        # Made once per batch size: most steps constrain nothing (read-only, it is shared).
        out = np.full((b, self.mask_words), -1, np.int32)
        out.flags.writeable = False
        return out

    def prefill_zeros(self, size: int, p: int) -> tuple[np.ndarray, ...]:
        """Zeroed inputs of a prefill call: tokens, positions, rows, ends, slots, last, steps,
        the chunks' token bitmasks (all ones), the token after each position (scored calls)
        and whether the call is scored."""
        z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        rows = z(1, size) if self.backend.rows_per_token else z(1)
        return (z(1, size), z(1, size), rows, z(p), z(p), z(p), z(p), self.allowed(p, (), None), z(1, size),
                np.int32(0))

    def verify_inputs(self, chunks: list[tuple]) -> tuple[tuple[np.ndarray, ...], int, int]:
        """(arrays, real token count, span) of a verify call (speculative decoding): decode
        rows (slot, tokens, start, step), each its last token and its drafts, drawing a token
        at every position: as many sampling rows as the call's size, row i at token i, with
        the step count the plain decode of that position would have. Nothing is accounted for
        penalties (a speculating request has none)."""
        n = sum(len(c[1]) for c in chunks)
        size = bucket_for(n, self.prefill_sizes)
        tokens, positions, rows, ends, slots, last, steps, _, following, _ = self.prefill_zeros(size, size)
        positions[:] = self.pad_position
        rows[:] = self.slots
        slots[:] = self.slots
        if not self.backend.rows_per_token or len({c[0] for c in chunks}) < len(chunks):
            raise ValueError("a verify call packs chunks of distinct slots on a backend with a row per token")
        i = 0
        for slot, toks, start, step in chunks:
            k = len(toks)
            tokens[0, i:i + k] = toks
            positions[0, i:i + k] = np.arange(start, start + k)
            rows[0, i:i + k] = slot
            ends[i:i + k] = np.arange(i, i + k)
            slots[i:i + k] = slot
            steps[i:i + k] = np.arange(step, step + k)
            i += k
        span = self.prefill_span(n, max(c[2] for c in chunks))
        return (tokens, positions, rows, ends, slots, last, steps, self.allowed(size, (), None), following,
                np.int32(0)), n, span

    def prefill_inputs(self, chunks: list[tuple], masks: dict | None = None) -> tuple[tuple[np.ndarray, ...], int, int]:
        """(arrays, real token count, span) of one prefill call packing ``chunks`` (slot,
        tokens, start, last[, step[, score, next token]]); see ``ModelRunner.prefill_packed``.
        ``masks``: token bitmask rows by slot, for the sequences a grammar constrains."""
        n = sum(len(c[1]) for c in chunks)
        size = bucket_for(n, self.prefill_sizes)
        p = self.prompts_per_call(n, max((c[2] for c in chunks), default=0))
        if not chunks or len(chunks) > p or len({c[0] for c in chunks}) < len(chunks):
            raise ValueError(f"a prefill call packs 1 to {p} chunks of distinct slots, got {len(chunks)}")
        tokens, positions, rows, ends, slots, last, steps, _, following, _ = self.prefill_zeros(size, p)
        positions[:] = self.pad_position  # padding: out of range, writes dropped
        rows[:] = self.slots
        slots[:] = self.slots
        scored = False
        i = 0
        for j, (slot, toks, start, is_last, *extra) in enumerate(chunks):
            step, score, next_token = (*extra, *(0, False, 0)[len(extra):])
            k = len(toks)
            tokens[0, i:i + k] = toks
            positions[0, i:i + k] = np.arange(start, start + k)
            if self.backend.rows_per_token:
                rows[0, i:i + k] = slot
            else:
                rows[0] = slot  # (1,): the one chunk's slot
            ends[j], slots[j], last[j], steps[j] = i + k - 1, slot, is_last, step
            if score:
                following[0, i:i + k - 1] = toks[1:]
                following[0, i + k - 1] = next_token
                scored = True
            i += k
        span = self.prefill_span(n, max(c[2] for c in chunks))
        allowed = self.allowed(p, slots, masks)
        return (tokens, positions, rows, ends, slots, last, steps, allowed, following, np.int32(scored)), n, span

    def decode_inputs(self, slots: list[int], positions: list[int], steps: list[int], masks: dict | None = None):
        """(positions, steps, rows, allowed, where, span) of one decode step over ``slots``:
        batch row ``where[i]`` is slot ``slots[i]``; padding rows name slot ``self.slots`` and
        position ``pad_position`` (past every table: their writes are dropped). ``allowed``: the
        rows' token bitmasks (``masks`` by slot; all ones elsewhere)."""
        n = len(slots)
        b = bucket_for(n, self.batch_sizes)
        span = bucket_for(max(positions) + 1, self.spans)
        # Batch row of each given slot: itself at full width, else packed from row 0.
        where = np.asarray(slots) if self.full_width else np.arange(n)
        pos = np.full((b,), self.pad_position, np.int32)
        st = np.zeros((b,), np.int32)
        pos[where], st[where] = positions, steps
        rows = np.full((b,), self.slots, np.int32)
        rows[:n] = slots
        row_slots = np.full((b,), self.slots, np.int32)  # each batch row's slot (padding: none)
        row_slots[where] = slots
        allowed = self.allowed(b, row_slots, masks)
        return pos, st, rows, allowed, where, span

    def warmup_shapes(self, verify_tokens: int = 0) -> list[tuple]:
        """Every shape serving may run; ``verify_tokens``: the most tokens a verify call holds
        (speculative decoding; 0: none)."""
        shapes = [("decode", b, s) for b in self.batch_sizes for s in self.spans]
        shapes += [("prefill", n, s) for n in self.prefill_sizes for s in self.spans if s >= n]
        if verify_tokens:
            top = bucket_for(min(verify_tokens, self.max_chunk), self.prefill_sizes)
            shapes += [("verify", n, s) for n in self.prefill_sizes if n <= top for s in self.spans if s >= n]
        return shapes + [("score", n) for n in self.prefill_sizes]
