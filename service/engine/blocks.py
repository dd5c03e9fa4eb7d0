"""The KV block manager: which blocks of the paged KV pool each sequence's table names,
shared by reference, with a prefix cache over full blocks. Plain host data, no device.

The pool holds ``num_blocks`` blocks of ``block_size`` positions per data replica (each
replica its own pool and block ids). A sequence's block table lists its blocks in position
order; position p lives at offset ``p % block_size`` of block ``table[p // block_size]``.

A full block is content-addressed by a hash chained over every token up to and including it,
so equal hashes mean equal prefixes and equal KV. A full block is registered under its hash
once its tokens are known and its KV computed (or planned by a step already queued: steps
run in order on the device, and one call writes every chunk's KV before any chunk attends).
A new sequence takes the cached blocks of its prefix by reference, without copying, even
while the sequence that wrote them still runs. Blocks whose reference count drops to zero
join the free list in LRU order; a cached one keeps its hash there until it is taken for
new KV, so a later prompt with the same prefix can still hit it. Blocks that hold nothing
reusable (never full, so never hashed) are taken first.

Only full blocks are shared: a sequence writes past its last shared block only, into blocks
it owns alone, so shared KV is never overwritten (no copy-on-write is needed).

A model with sliding-window layers has a second group of pools and tables for them (the
window group: ``window``, ``window_blocks``): its layers never read a position more than
``window - 1`` before their query, so a sequence's window blocks that lie wholly before the
window of its next query are given back as it advances (``slide``); its table entries there
are ``NO_BLOCK``. A sequence so holds at most its window and a block or two of window KV
(plus a prefill chunk while one runs), whatever its length; the full-attention layers keep
every position in the first group. Both groups' blocks of one table index hold the same
tokens and are registered under the same hash; a prefix hit takes the first group's blocks
of the prefix and the window group's blocks the next query's window covers, and is
shortened until the window group still holds those.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

NO_BLOCK = -1  # a table entry with no block: writes there are dropped, never read


def chain_hash(parent: bytes, tokens) -> bytes:
    """The hash of a full block: its tokens chained onto the hash of every block before it."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


@dataclasses.dataclass
class Held:
    """The blocks one table row (a slot) holds: ``blocks[i]`` keeps positions
    ``i * block_size ..``; the first ``len(hashes)`` are full and registered."""

    replica: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    # The window group's block per table index (as many as ``blocks``); ``NO_BLOCK`` before
    # ``front``, where the window has moved past.
    window: list[int] = dataclasses.field(default_factory=list)
    front: int = 0


class BlockPool:
    """One replica's blocks: reference counts, the free list (LRU first) and the prefix cache."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        # Free blocks, least recently used first. Every block starts here.
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        """A free block for new KV (the least recently used; its old hash is forgotten)."""
        block, _ = self.free.popitem(last=False)
        self._forget(block)
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reference to ``block`` (a prefix hit): off the free list if it was there."""
        self.free.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if block == NO_BLOCK:
            return
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None
            if self.hash_of[block] is None:  # nothing reusable: the first to be taken again
                self.free.move_to_end(block, last=False)

    def register(self, block: int, h: bytes) -> None:
        """``block`` is full and holds the prefix hashed ``h``. A prefix already cached under
        another block (computed twice, by two prompts of one step) keeps that one."""
        if h not in self.cached and self.hash_of[block] is None:
            self.cached[h] = block
            self.hash_of[block] = h

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def _forget(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            self.hash_of[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]

    def clear_cache(self) -> None:
        """Forget every hash (their KV may not be what they say: a step failed)."""
        for block in range(self.num_blocks):
            self._forget(block)

    @property
    def cached_free(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return sum(1 for b in self.free if self.hash_of[b] is not None)


class BlockManager:
    """Block tables of ``slots`` table rows over ``replicas`` pools of ``num_blocks`` blocks
    (and, with a ``window``, pools of ``window_blocks`` blocks for the sliding-window layers).

    Table row s (a decode slot) draws from the pool of replica ``s // (slots // replicas)``.
    ``tables`` is the (slots, max_blocks) int32 array of the first group, ``window_tables``
    the window group's; ``device_tables`` is what the device steps read.
    """

    def __init__(self, num_blocks: int, block_size: int, slots: int, max_blocks: int, replicas: int = 1,
                 window: int | None = None, window_blocks: int = 0):
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"a KV pool of {num_blocks} blocks of {block_size} positions holds nothing")
        if slots % replicas:
            raise ValueError(f"{slots} slots do not split over {replicas} replicas")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.slots = slots
        self.max_blocks = max_blocks
        self.replicas = replicas
        self.pools = [BlockPool(num_blocks) for _ in range(replicas)]
        self.tables = np.full((slots, max_blocks), NO_BLOCK, np.int32)
        self.held = [Held(replica=s // (slots // replicas)) for s in range(slots)]
        self.window = window if window and window_blocks else None
        self.window_blocks = window_blocks if self.window else 0
        self.window_pools = [BlockPool(window_blocks) for _ in range(replicas)] if self.window else []
        self.window_tables = np.full((slots, max_blocks) if self.window else (0, 0), NO_BLOCK, np.int32)
        # Prefix cache accounting: full prompt blocks looked up, and found.
        self.queries = 0
        self.hits = 0

    # -- sizes ---------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def window_front(self, at: int) -> int:
        """The first table index a query at position ``at`` (or later) reads in a window layer."""
        return max(0, at + 1 - self.window) // self.block_size if self.window else 0

    @property
    def capacity(self) -> int:
        """Positions one replica's pool holds: the longest sequence that can ever fit."""
        return self.num_blocks * self.block_size

    def pool(self, slot: int) -> BlockPool:
        return self.pools[self.held[slot].replica]

    def replica(self, slot: int) -> int:
        return self.held[slot].replica

    def num_free(self, slot: int) -> int:
        return self.pool(slot).num_free

    def used_blocks(self) -> int:
        """Blocks referenced by any table (or session), over every replica."""
        return sum(p.num_blocks - p.num_free for p in self.pools)

    def total_blocks(self) -> int:
        return self.num_blocks * self.replicas

    def window_used_blocks(self) -> int:
        return sum(p.num_blocks - p.num_free for p in self.window_pools)

    def device_tables(self) -> np.ndarray:
        """A copy of the tables a step runs over: (slots, max_blocks), or (2, slots,
        max_blocks) with the window group's second."""
        return np.stack([self.tables, self.window_tables]) if self.window else self.tables[None].copy()

    # -- a slot's table ------------------------------------------------------------------------

    def covered(self, slot: int) -> int:
        """Positions the slot's blocks can hold."""
        return len(self.held[slot].blocks) * self.block_size

    def _groups(self, replica: int) -> list[BlockPool]:
        """The replica's pool of each group in use (both grow by the same table entries)."""
        return [self.pools[replica], *self.window_pools[replica:replica + 1]]

    def _needs(self, slot: int, tokens: int) -> int:
        """New table entries (a block of each group) the slot needs to hold ``tokens`` positions."""
        return max(0, self.blocks_for(tokens) - len(self.held[slot].blocks))

    def can_allocate(self, slot: int, tokens: int) -> bool:
        """Whether the slot's table can grow to hold ``tokens`` positions now."""
        return self.fits([(slot, tokens)])

    def fits(self, wants: list[tuple[int, int]]) -> bool:
        """Whether every (slot, tokens) of ``wants`` (distinct slots) can grow at once."""
        need: dict[int, int] = {}
        for slot, tokens in wants:
            replica = self.held[slot].replica
            need[replica] = need.get(replica, 0) + self._needs(slot, tokens)
        return all(n <= self._least_free(r) for r, n in need.items())

    def _least_free(self, replica: int) -> int:
        return min(pool.num_free for pool in self._groups(replica))

    def spare(self, slot: int, tokens: int) -> int:
        """Blocks left free in the slot's pools (the lesser group) once it holds ``tokens``."""
        return self._least_free(self.held[slot].replica) - self._needs(slot, tokens)

    def room(self, slot: int, start: int) -> int:
        """Positions from ``start`` the slot can hold with its blocks and the free ones."""
        return self.covered(slot) + self._least_free(self.held[slot].replica) * self.block_size - start

    def allocate(self, slot: int, tokens: int) -> bool:
        """Grow the slot's table to hold ``tokens`` positions; False (nothing taken) when the
        pool lacks the blocks."""
        if not self.can_allocate(slot, tokens):
            return False
        held, pool = self.held[slot], self.pool(slot)
        while len(held.blocks) < self.blocks_for(tokens):
            block = pool.take()
            self.tables[slot, len(held.blocks)] = block
            held.blocks.append(block)
            if self.window:
                block = self.window_pools[held.replica].take()
                self.window_tables[slot, len(held.window)] = block
                held.window.append(block)
        return True

    def slide(self, slot: int, at: int) -> None:
        """The slot's next query is at position ``at`` or later: give back its window blocks
        that no window reaches any more (their hashes stay cached while they are free)."""
        if not self.window:
            return
        held = self.held[slot]
        front = min(self.window_front(at), len(held.window))
        if front > held.front:
            self._release_window(held.replica, held.window[held.front:front])
            held.window[held.front:front] = [NO_BLOCK] * (front - held.front)
            self.window_tables[slot, held.front:front] = NO_BLOCK
            held.front = front

    def trim(self, slot: int, tokens: int) -> None:
        """Release the slot's blocks past the first ``tokens`` positions' (what speculative
        decoding's rejected drafts took: never registered, their KV is dropped with them)."""
        held = self.held[slot]
        n = max(self.blocks_for(tokens), len(held.hashes))
        if len(held.blocks) > n:
            self._release(held.replica, held.blocks[n:])
            del held.blocks[n:]
            self.tables[slot, n:] = NO_BLOCK
        if len(held.window) > n:
            self._release_window(held.replica, held.window[n:])
            del held.window[n:]
            self.window_tables[slot, n:] = NO_BLOCK
            held.front = min(held.front, n)

    def may_append(self, slot: int, length: int) -> bool:
        """Whether a decode step can write position ``length - 1`` (a new block if needed)."""
        return self.can_allocate(slot, length)

    def _window_hits(self, held: Held, hashes: list[bytes], have: int) -> int:
        """The most of ``hashes`` (the first ``have`` of them the slot's own blocks already) a
        prefix hit may take: the window group must hold each block the next query's window
        reads (those it holds itself, or cached ones)."""
        if not self.window:
            return len(hashes)
        pool = self.window_pools[held.replica]
        present = [held.window[i] != NO_BLOCK if i < have else pool.lookup(h) is not None
                   for i, h in enumerate(hashes)]
        m = len(hashes)
        while m > have and not all(present[self.window_front(m * self.block_size):m]):
            m -= 1
        return m

    def _take(self, slot: int, hashes: list[bytes], start: int) -> None:
        """Share the cached blocks of ``hashes[start:]`` into the slot's table (of the window
        group only those from the next query's window on)."""
        held, pool = self.held[slot], self.pool(slot)
        front = self.window_front(len(hashes) * self.block_size)
        for i in range(start, len(hashes)):
            h = hashes[i]
            block = pool.lookup(h)
            pool.share(block)
            self.tables[slot, i] = block
            held.blocks.append(block)
            held.hashes.append(h)
            if self.window:
                block = NO_BLOCK
                if i >= front:
                    block = self.window_pools[held.replica].lookup(h)
                    self.window_pools[held.replica].share(block)
                held.window.append(block)
                self.window_tables[slot, i] = block
        # Blocks it held before are left for ``slide``: a chunk planned earlier in this step
        # may still read them.

    def _cached_run(self, pool: BlockPool, parent: bytes, tokens, first: int, end: int) -> list[bytes]:
        """Hashes of the cached blocks ``first ..`` of ``tokens`` (up to position ``end``),
        chained on ``parent``, until the first one the pool lacks."""
        out = []
        for i in range(first, end // self.block_size):
            h = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            if pool.lookup(h) is None:
                break
            out.append(h)
            parent = h
        return out

    def match_prefix(self, slot: int, tokens, limit: int) -> int:
        """Give an empty table row the cached blocks of the longest prefix of ``tokens``
        (at most ``limit`` positions, whole blocks) by reference. Returns the positions hit."""
        held, pool = self.held[slot], self.pool(slot)
        if held.blocks:
            raise ValueError(f"slot {slot} already holds blocks")
        end = min(limit, len(tokens))
        self.queries += end // self.block_size
        run = self._cached_run(pool, b"", tokens, 0, end)
        run = run[:self._window_hits(held, run, 0)]
        self._take(slot, run, 0)
        self.hits += len(run)
        return len(held.blocks) * self.block_size

    def extend_prefix(self, slot: int, tokens, start: int, limit: int) -> int:
        """A sequence with ``start`` positions computed (a multiple of the block size, all its
        blocks registered) takes cached blocks for what follows, up to ``limit`` positions.
        Returns the new computed count."""
        held, pool = self.held[slot], self.pool(slot)
        size = self.block_size
        # Only from a block boundary, every block before it registered and none past it.
        if start % size or len(held.hashes) * size != start or len(held.blocks) * size > start:
            return start
        have = start // size
        run = self._cached_run(pool, held.hashes[-1] if held.hashes else b"", tokens, have, min(limit, len(tokens)))
        self.queries += len(run) + (have + len(run) < min(limit, len(tokens)) // size)
        hashes = held.hashes + run
        m = self._window_hits(held, hashes, have)
        self.hits += m - have
        self._take(slot, hashes[:m], have)
        return m * size

    def commit(self, slot: int, tokens, computed: int) -> None:
        """Register the slot's blocks that ``computed`` positions of ``tokens`` fill."""
        held, pool = self.held[slot], self.pool(slot)
        full = min(computed, len(tokens), len(held.blocks) * self.block_size) // self.block_size
        parent = held.hashes[-1] if held.hashes else b""
        for i in range(len(held.hashes), full):
            parent = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            held.hashes.append(parent)
            pool.register(held.blocks[i], parent)
            if self.window and held.window[i] != NO_BLOCK:
                self.window_pools[held.replica].register(held.window[i], parent)

    def free(self, slot: int) -> None:
        """Release every block of the slot's table (last first, so a prefix's tail is evicted
        before its head) and clear the row."""
        self.release(self.detach(slot))

    # -- blocks kept by a session between turns ------------------------------------------------

    def detach(self, slot: int) -> Held:
        """Take the slot's blocks out of its row, references kept (an interactive session
        holds them until its next turn or its end)."""
        held = self.held[slot]
        self.held[slot] = Held(replica=held.replica)
        self.tables[slot] = NO_BLOCK
        if self.window:
            self.window_tables[slot] = NO_BLOCK
        return held

    def attach(self, slot: int, held: Held, keep: int) -> int:
        """Put a session's blocks into an empty row of the same replica, the first ``keep``
        positions' worth (the rest released). Returns the positions kept: 0 (all released)
        when the window group no longer holds what a query at ``keep`` reads."""
        row = self.held[slot]
        if row.blocks or row.replica != held.replica:
            raise ValueError(f"slot {slot} cannot take these blocks")
        n = self.blocks_for(keep)
        if self.window and NO_BLOCK in held.window[self.window_front(keep):n]:
            self.release(held)
            return 0
        self._release(held.replica, held.blocks[n:])
        row.blocks = held.blocks[:n]
        row.hashes = held.hashes[:min(n, keep // self.block_size)]
        self.tables[slot, :n] = row.blocks
        if self.window:
            self._release_window(held.replica, held.window[n:])
            row.window, row.front = held.window[:n], min(held.front, n)
            self.window_tables[slot, :n] = row.window
        return keep

    def release(self, held: Held) -> None:
        """Drop a detached set of blocks (a session ended)."""
        self._release(held.replica, held.blocks)
        self._release_window(held.replica, held.window)

    def _release(self, replica: int, blocks: list[int]) -> None:
        self._give_back(self.pools[replica], blocks)

    def _release_window(self, replica: int, blocks: list[int]) -> None:
        if self.window:
            self._give_back(self.window_pools[replica], blocks)

    @staticmethod
    def _give_back(pool: BlockPool, blocks: list[int]) -> None:
        for block in reversed(blocks):  # last first: a prefix's tail is evicted before its head
            pool.release(block)

    def clear_cache(self) -> None:
        for pool in self.pools + self.window_pools:
            pool.clear_cache()
