"""The slot table: which sequence holds each decode slot (its sampling-state row and block-table
row), the KV blocks behind them (``BlockManager``), and interactive sessions.

A slot no longer owns KV: a placed sequence takes the cached blocks of its prompt's prefix by
reference (``cached_tokens``) and new blocks as it grows. A finished sequence's full blocks
stay cached (by hash) until the pool needs them. An interactive session keeps its blocks
between turns, so its next turn, in any free slot of the same data replica, prefills only its
new tokens; the pool takes them back (least recently used session first) before it preempts a
running sequence, and the session then recomputes its history on its next turn.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from service.engine.blocks import BlockManager, Held
from service.engine.request import Sequence


@dataclasses.dataclass
class Session:
    tokens: list[int]  # every token of its turns so far
    held: Held | None = None  # its blocks while between turns (None: running, or taken back)
    valid: int = 0  # positions of ``tokens`` whose KV the blocks hold
    used: float = 0.0
    adapter: str | None = None  # the LoRA adapter of its turns (a turn naming none keeps it)


class SlotTable:
    def __init__(self, slots: int, blocks: BlockManager):
        self.slots = slots
        self.blocks = blocks
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.sessions: dict[int, Session] = {}
        self._order = itertools.count()

    @property
    def has_free(self) -> bool:
        return len(self.running) < self.slots

    def choose(self, seq: Sequence) -> int:
        """A free slot: in the data replica holding the sequence's session blocks, else in the
        replica with the most free blocks."""
        free = [s for s in range(self.slots) if s not in self.running]
        session = self.sessions.get(seq.req.session_id) if seq.req.session_id is not None else None
        if session is not None and session.held is not None:
            mine = [s for s in free if self.blocks.held[s].replica == session.held.replica]
            if mine:
                return mine[0]
        return max(free, key=lambda s: (self.blocks.pools[self.blocks.replica(s)].num_free, -s))

    def place(self, seq: Sequence, slot: int) -> None:
        """Put ``seq`` in ``slot`` with the KV it can reuse: its session's blocks, or the cached
        blocks of its prompt's prefix. At least the last prompt token is computed: its logits
        pick the first new token. A prompt being scored or mean-pooled is computed whole."""
        seq.slot, seq.admitted = slot, next(self._order)
        limit = 0 if seq.params.computes_prompt else len(seq.seq) - 1
        session = self.sessions.get(seq.req.session_id) if seq.req.session_id is not None else None
        reuse = 0
        if session is not None and session.held is not None:
            # A session's blocks serve its next turn on the same adapter only.
            if session.held.replica == self.blocks.held[slot].replica and limit > 0 \
                    and session.held.root == seq.req.root:
                reuse = self.blocks.attach(slot, session.held, min(session.valid, limit))
            else:
                self.blocks.release(session.held)
            session.held = None
        if reuse == 0:
            reuse = self.blocks.match_prefix(slot, seq.hash_tokens(0, len(seq.seq)), limit, seq.req.root)
        seq.prefilled = seq.cached = reuse
        self.running[slot] = seq

    def release(self, seq: Sequence, keep_session: bool) -> None:
        """Free the sequence's slot. Its full blocks of known tokens stay cached; the last
        sampled token's KV was never written (or was, by a step queued ahead: not counted)."""
        self.running.pop(seq.slot, None)
        tokens = seq.seq + seq.generated
        valid = min(seq.prefilled, len(tokens))
        self.blocks.commit(seq.slot, seq.hash_tokens(0, len(tokens)), valid)
        sid = seq.req.session_id
        if sid is not None and keep_session:
            self.sessions[sid] = Session(tokens, self.blocks.detach(seq.slot), valid, time.monotonic(),
                                         seq.params.adapter)
        else:
            self.blocks.free(seq.slot)

    def preempt(self, seq: Sequence) -> None:
        """Take the sequence's blocks back; it keeps its slot and is recomputed from its tokens
        (its prompt and what it generated) when blocks are free again."""
        tokens = seq.hash_tokens(0, seq.length)
        self.blocks.commit(seq.slot, tokens, min(seq.prefilled, len(tokens)))
        self.blocks.free(seq.slot)
        seq.prefilled = 0
        seq.preempted += 1

    def evict_session(self, replica: int) -> bool:
        """Give the blocks of the least recently used idle session of ``replica`` back to the
        pool (its tokens are kept: its next turn recomputes them). False when none holds any."""
        idle = [s for s in self.sessions.values() if s.held is not None and s.held.replica == replica]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.used)
        self.blocks.release(oldest.held)
        oldest.held = None
        return True

    def forget(self, slot: int) -> None:
        """The slot's KV is not what the tables say (a step failed): free its blocks, and forget
        every cached prefix and session's KV (registered by the plans of that step)."""
        self.blocks.free(slot)
        self.forget_all()

    def forget_all(self) -> None:
        """No KV but the running sequences' is what its hashes say: forget every cached prefix
        and every session's blocks (their tokens stay: a session's next turn recomputes them)."""
        for session in self.sessions.values():
            if session.held is not None:
                self.blocks.release(session.held)
                session.held = None
        self.blocks.clear_cache()

    def session_adapter(self, session_id: int) -> str | None:
        entry = self.sessions.get(session_id)
        return entry.adapter if entry else None

    def history(self, session_id: int | None) -> list[int]:
        entry = self.sessions.get(session_id) if session_id is not None else None
        return list(entry.tokens) if entry else []

    def end_session(self, session_id: int) -> None:
        entry = self.sessions.pop(session_id, None)
        if entry and entry.held is not None:
            self.blocks.release(entry.held)
