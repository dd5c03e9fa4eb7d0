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
from service.engine.plan import Decode, Prefill
from service.engine import images
from service.engine.step_io import DecodeInputs, ImageRows, PrefillInputs

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


def _used(adapters: np.ndarray | None, slots: np.ndarray) -> np.ndarray | None:
    """The adapter slots of these (decode) slots, or None when none has one: a step without
    adapters compiles and runs as the base model's, a program of its own."""
    if adapters is None:
        return None
    out = adapters[slots]
    return out if (out >= 0).any() else None


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
    image_width: int = 0  # a vision-language model's text width: its prefill calls carry ImageRows

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

    def _blank(self, size: int, p: int) -> dict[str, np.ndarray]:
        """A prefill call's arrays with every token padding (its KV writes dropped) and every
        sampling row pointing at no slot."""
        z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        return dict(tokens=z(1, size), positions=np.full((1, size), self.pad_position, np.int32),
                    rows=np.full((1, size), self.slots, np.int32), ends=z(p), slots=np.full((p,), self.slots, np.int32),
                    last=z(p), steps=z(p), following=z(1, size))

    def prefill_inputs(self, op: Prefill, masks: dict | None = None,
                       adapters: np.ndarray | None = None, as_tokens: int | None = None) -> PrefillInputs:
        """The inputs of one prefill call packing ``op``'s chunks (of distinct slots) into one
        row of tokens, each token with its slot's table row. A plain call samples at each
        chunk's last token (P sampling rows, a bound of the call's size and span: see
        ``prompts_per_call``); a verify call at every token (as many rows as tokens), with
        the step count a plain decode of that position would have (nothing is accounted for
        penalties there: a speculating request has none). ``masks``: token bitmask rows by
        slot, for the sequences a grammar constrains. ``adapters`` (slots + 1,): each slot's
        adapter slot (-1: none; the last entry, padding's, -1). ``as_tokens``: shaped as a call of
        that many tokens (warm-up runs each shape on one token: padding costs nothing)."""
        chunks = op.chunks
        n = sum(len(c.tokens) for c in chunks)
        shaped = as_tokens or n
        size = bucket_for(shaped, self.prefill_sizes)
        max_start = max((c.start for c in chunks), default=0)
        p = size if op.verify else self.prompts_per_call(shaped, max_start)
        if not chunks or (not op.verify and len(chunks) > p) or len({c.slot for c in chunks}) < len(chunks):
            raise ValueError(f"a prefill call packs 1 to {p} chunks of distinct slots, got {len(chunks)}")
        a = self._blank(size, p)
        i = 0
        for j, c in enumerate(chunks):
            k = len(c.tokens)
            a["tokens"][0, i:i + k] = c.tokens
            a["positions"][0, i:i + k] = np.arange(c.start, c.start + k)
            a["rows"][0, i:i + k] = c.slot
            if op.verify:  # a sampling row per token
                a["ends"][i:i + k], a["slots"][i:i + k] = np.arange(i, i + k), c.slot
                a["steps"][i:i + k] = np.arange(c.step, c.step + k)
            else:
                a["ends"][j], a["slots"][j], a["last"][j], a["steps"][j] = i + k - 1, c.slot, c.last, c.step
            if c.score:
                a["following"][0, i:i + k - 1] = c.tokens[1:]
                a["following"][0, i + k - 1] = c.next_token
            i += k
        allowed = self.allowed(p, a["slots"], None if op.verify else masks)
        a["adapters"] = _used(adapters, a["rows"])
        return PrefillInputs(**a, allowed=allowed, live=np.int32(n), images=self._image_rows(chunks, a["positions"]),
                             span=self.prefill_span(shaped, max_start))

    def _image_rows(self, chunks, positions: np.ndarray) -> ImageRows | None:
        """A vision-language model's image rows of a call: the chunks' image tokens (their
        owners' ``images`` and ``image_features``), every other token seeing up to itself."""
        if not self.image_width:
            return None
        size = positions.shape[1]
        embeds = np.zeros((size, self.image_width), np.float32)
        use = np.zeros((size,), bool)
        limits = positions[0].copy()
        at = 0
        for c in chunks:
            owner = c.owner
            if owner is not None and owner.req.images and not c.decode:
                images.fill(owner.req.images, owner.image_features, c.start, len(c.tokens), embeds, use, limits, at)
            at += len(c.tokens)
        return ImageRows(embeds[None], use[None], limits[None])

    def decode_inputs(self, d: Decode, masks: dict | None = None, adapters: np.ndarray | None = None,
                      as_rows: int | None = None) -> tuple[DecodeInputs, np.ndarray]:
        """The inputs of one decode step over ``d``'s slots, and ``where``: batch row
        ``where[i]`` is slot ``d.slots[i]``. Padding rows name slot ``self.slots`` and position
        ``pad_position`` (past every table: their writes are dropped). The rows' token
        bitmasks come from ``masks`` by slot (all ones elsewhere), their adapter slots from
        ``adapters`` (as ``prefill_inputs`` takes it). ``tokens`` is left zero for a
        chained step (its input comes from the step in flight, on the device). ``as_rows``:
        shaped as a step of that many rows (as ``prefill_inputs``'s ``as_tokens``)."""
        n = len(d.slots)
        b = bucket_for(as_rows or n, self.batch_sizes)
        span = bucket_for(max(d.positions) + 1, self.spans)
        # Batch row of each given slot: itself at full width, else packed from row 0.
        where = np.asarray(d.slots) if self.full_width else np.arange(n)
        pos = np.full((b,), self.pad_position, np.int32)
        st = np.zeros((b,), np.int32)
        tok = np.zeros((b,), np.int32)
        pos[where], st[where] = d.positions, d.steps
        if d.tokens is not None:
            tok[where] = d.tokens
        row_slots = np.full((b,), self.slots, np.int32)  # each batch row's slot (padding: none)
        row_slots[where] = d.slots
        rows = np.full((b,), self.slots, np.int32)
        rows[:n] = d.slots
        # Live rows first, padding after (at full width every row is a slot: all count).
        adapter = _used(adapters, row_slots)
        return DecodeInputs(tok, pos, st, None if self.full_width else rows, adapter,
                            self.allowed(b, row_slots, masks),
                            np.int32(b if self.full_width else n), span), where

    def warmup_shapes(self, verify_tokens: int = 0) -> list[tuple]:
        """Every shape serving may run; ``verify_tokens``: the most tokens a verify call holds
        (speculative decoding; 0: none)."""
        shapes = [("decode", b, s) for b in self.batch_sizes for s in self.spans]
        shapes += [("prefill", n, s) for n in self.prefill_sizes for s in self.spans if s >= n]
        if verify_tokens:
            top = bucket_for(min(verify_tokens, self.max_chunk), self.prefill_sizes)
            shapes += [("verify", n, s) for n in self.prefill_sizes if n <= top for s in self.spans if s >= n]
        return shapes + [("score", n) for n in self.prefill_sizes]
