"""The slot table: which sequence holds each decode slot, what KV each slot keeps, sessions.

Prefix reuse works at slot granularity: a free slot keeps the KV of the last sequence it held.
A new sequence is placed in the free slot sharing the longest prefix with its prompt and skips
prefilling that prefix (reported as ``cached_tokens``); otherwise the least recently used free
slot is taken, other sessions' slots last. Interactive sessions keep their token history on the
host and prefer their old slot, so a turn whose slot was not reused prefills only its new tokens.
"""

from __future__ import annotations

import time

from service.engine.request import Sequence


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    def __init__(self, slots: int):
        self.slots = slots
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # the KV each slot holds
        self.used: list[float] = [0.0] * slots
        self.sessions: dict[int, tuple[list[int], int]] = {}  # id -> (history tokens, slot)

    @property
    def has_free(self) -> bool:
        return len(self.running) < self.slots

    def choose(self, seq: Sequence) -> tuple[int, int]:
        """(slot, reusable prefix length) among free slots."""
        free = [s for s in range(self.slots) if s not in self.running]
        session_slots = {slot for _, slot in self.sessions.values()}
        best, best_len = -1, 0
        for s in free:
            n = common_prefix(self.tokens[s], seq.seq)
            if n > best_len:
                best, best_len = s, n
        if best < 0 or best_len == 0:
            best = min(free, key=lambda s: (s in session_slots, self.used[s]))
            best_len = 0
        # At least the last prompt token is recomputed: its logits pick the first new token.
        return best, min(best_len, len(seq.seq) - 1)

    def place(self, seq: Sequence, slot: int, reuse: int) -> None:
        seq.slot, seq.prefilled, seq.cached = slot, reuse, reuse
        self.tokens[slot] = seq.seq[:reuse]
        self.running[slot] = seq

    def longest_running_prefix(self, seq: Sequence, limit: int) -> tuple[int, int]:
        """(slot, length) of the running sequence whose slot holds the longest prefix of
        ``seq`` (at most ``limit``), or (-1, 0)."""
        best_slot, best = -1, 0
        for other in self.running.values():
            if other is not seq:
                n = min(common_prefix(self.tokens[other.slot], seq.seq), limit)
                if n > best:
                    best_slot, best = other.slot, n
        return best_slot, best

    def release(self, seq: Sequence, keep_session: bool) -> None:
        """Free the sequence's slot. The slot keeps the KV of everything written to it: the
        last sampled token never was."""
        self.running.pop(seq.slot, None)
        written = seq.prefilled + max(len(seq.generated) - 1, 0)
        self.tokens[seq.slot] = (seq.seq + seq.generated)[:written]
        self.used[seq.slot] = time.monotonic()
        if seq.req.session_id is not None and keep_session:
            self.sessions[seq.req.session_id] = (seq.seq + seq.generated, seq.slot)

    def forget(self, slot: int) -> None:
        """The slot's KV is not what the table says (a step failed): reuse none of it."""
        self.tokens[slot] = []

    def history(self, session_id: int | None) -> list[int]:
        entry = self.sessions.get(session_id) if session_id is not None else None
        return list(entry[0]) if entry else []

    def end_session(self, session_id: int) -> None:
        entry = self.sessions.pop(session_id, None)
        if entry:
            self.used[entry[1]] = 0.0  # first to be reused
