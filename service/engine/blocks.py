"""The KV block manager: which blocks of each KV group (``service.engine.kv``) every table row
names, shared by reference, with a prefix cache over full blocks. Plain host data, no device.

Every group grows by the same table entries: table index i of each group holds the same
tokens and is registered under the same chained hash. A group whose layers no longer read a
sequence's early blocks (a sliding window) gives them back as the sequence advances
(``slide``); its table entries there are ``NO_BLOCK``. So a sequence holds at most its window
and a block or two of window KV (plus a prefill chunk while one runs), whatever its length.

A full block is registered under its hash once its tokens are known and its KV computed (or
planned by a step already queued: steps run in order on the device, and one call writes every
chunk's KV before any chunk attends). A new sequence takes the cached blocks of its prefix by
reference, without copying, even while the sequence that wrote them still runs: of each
group, the blocks from its next query's ``front`` on, and the hit is shortened until every
group still holds those. Blocks whose reference count drops to zero join the free list in LRU
order, keeping their hash until taken. Only full blocks are shared: a sequence writes past its
last shared block only, into blocks it owns alone, so shared KV is never overwritten (no
copy-on-write is needed).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from service.engine.kv import NO_BLOCK, BlockPool, KVGroup, WindowGroup, chain_hash

__all__ = ["NO_BLOCK", "BlockManager", "Held", "chain_hash"]


@dataclasses.dataclass
class Held:
    """The blocks one table row (a slot) holds: ``ids[g][i]`` is group g's block for positions
    ``i * block_size ..`` (``NO_BLOCK`` before ``fronts[g]``, where the group gave them back);
    the first ``len(hashes)`` table entries are full and registered, their chain started from
    ``root`` (the sequence's adapter's identity: KV of different adapters never matches)."""

    replica: int
    ids: list[list[int]]
    fronts: list[int]
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    root: bytes = b""

    @property
    def last_hash(self) -> bytes:
        return self.hashes[-1] if self.hashes else self.root

    @classmethod
    def empty(cls, replica: int, groups: int, root: bytes = b"") -> "Held":
        return cls(replica, [[] for _ in range(groups)], [0] * groups, root=root)

    @property
    def blocks(self) -> list[int]:
        """The first group's blocks (it holds every position: their count is the row's)."""
        return self.ids[0]


class BlockManager:
    """Block tables of ``slots`` table rows over ``replicas`` pools of ``num_blocks`` blocks (the
    full-attention group), and with a ``window`` a second group of ``window_blocks`` blocks per
    replica for the sliding-window layers. Table row s draws from replica ``s // (slots //
    replicas)``. ``device_tables()`` is what the device steps read."""

    def __init__(self, num_blocks: int, block_size: int, slots: int, max_blocks: int, replicas: int = 1,
                 window: int | None = None, window_blocks: int = 0):
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"a KV pool of {num_blocks} blocks of {block_size} positions holds nothing")
        if slots % replicas:
            raise ValueError(f"{slots} slots do not split over {replicas} replicas")
        self.block_size, self.num_blocks, self.slots = block_size, num_blocks, slots
        self.max_blocks, self.replicas = max_blocks, replicas
        self.groups: list[KVGroup] = [KVGroup(num_blocks, slots, max_blocks, replicas, block_size)]
        self.window = window if window and window_blocks else None
        self.window_blocks = window_blocks if self.window else 0
        if self.window:
            self.groups.append(WindowGroup(window_blocks, slots, max_blocks, replicas, block_size, self.window))
        self.held = [Held.empty(s // (slots // replicas), len(self.groups)) for s in range(slots)]
        self.queries = self.hits = 0  # prefix cache accounting: full prompt blocks looked up, and found

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def tables(self) -> np.ndarray:
        """The first group's (slots, max blocks) tables."""
        return self.groups[0].tables

    @property
    def pools(self) -> list[BlockPool]:
        """The first group's pool of each replica."""
        return self.groups[0].pools

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def capacity(self) -> int:  # positions one replica's pool holds: the longest sequence that fits
        return self.num_blocks * self.block_size

    def replica(self, slot: int) -> int:
        return self.held[slot].replica

    def used_blocks(self) -> int:
        """The first group's blocks referenced by any table (or session), over every replica."""
        return self.groups[0].used()

    def total_blocks(self) -> int:
        return self.num_blocks * self.replicas

    def device_tables(self) -> np.ndarray:
        """A copy of the tables a step runs over: (groups, slots, max blocks)."""
        return np.stack([g.tables for g in self.groups])

    # -- a slot's table ------------------------------------------------------------------------

    def covered(self, slot: int) -> int:  # positions the slot's blocks can hold
        return len(self.held[slot].blocks) * self.block_size

    def _needs(self, slot: int, tokens: int) -> int:
        """New table entries (a block of each group) the slot needs to hold ``tokens`` positions."""
        return max(0, self.blocks_for(tokens) - len(self.held[slot].blocks))

    def _least_free(self, replica: int) -> int:
        return min(g.pools[replica].num_free for g in self.groups)

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

    def spare(self, slot: int, tokens: int) -> int:
        """Blocks left free in the slot's pools (the least free group's) once it holds ``tokens``."""
        return self._least_free(self.held[slot].replica) - self._needs(slot, tokens)

    def room(self, slot: int, start: int) -> int:
        """Positions from ``start`` the slot can hold with its blocks and the free ones."""
        return self.covered(slot) + self._least_free(self.held[slot].replica) * self.block_size - start

    def allocate(self, slot: int, tokens: int) -> bool:
        """Grow the slot's table to hold ``tokens`` positions; False (nothing taken) when a
        group's pool lacks the blocks."""
        if not self.can_allocate(slot, tokens):
            return False
        held = self.held[slot]
        while len(held.blocks) < self.blocks_for(tokens):
            i = len(held.blocks)
            for g, group in enumerate(self.groups):
                block = group.pools[held.replica].take()
                group.tables[slot, i] = block
                held.ids[g].append(block)
        return True

    def slide(self, slot: int, at: int) -> None:
        """The slot's next query is at position ``at`` or later: each group gives back the
        blocks no query of its layers reaches any more (their hashes stay cached while free)."""
        held = self.held[slot]
        for g, group in enumerate(self.groups):
            front = min(group.front(at), len(held.ids[g]))
            if front > held.fronts[g]:
                group.pools[held.replica].give_back(held.ids[g][held.fronts[g]:front])
                held.ids[g][held.fronts[g]:front] = [NO_BLOCK] * (front - held.fronts[g])
                group.tables[slot, held.fronts[g]:front] = NO_BLOCK
                held.fronts[g] = front

    def trim(self, slot: int, tokens: int) -> None:
        """Release the slot's blocks past the first ``tokens`` positions' (what speculative
        decoding's rejected drafts took: never registered, their KV is dropped with them)."""
        held = self.held[slot]
        n = max(self.blocks_for(tokens), len(held.hashes))
        for g, group in enumerate(self.groups):
            if len(held.ids[g]) > n:
                group.pools[held.replica].give_back(held.ids[g][n:])
                del held.ids[g][n:]
                group.tables[slot, n:] = NO_BLOCK
                held.fronts[g] = min(held.fronts[g], n)

    # -- the prefix cache ----------------------------------------------------------------------

    def _hits(self, held: Held, hashes: list[bytes], have: int) -> int:
        """The most of ``hashes`` (the first ``have`` of them the slot's own blocks already) a
        prefix hit may take: every group must hold each block the next query reads (those it
        holds itself, or cached ones)."""
        m = len(hashes)
        for g, group in enumerate(self.groups[1:], 1):
            pool = group.pools[held.replica]
            present = [held.ids[g][i] != NO_BLOCK if i < have else pool.lookup(h) is not None
                       for i, h in enumerate(hashes)]
            while m > have and not all(present[group.front(m * self.block_size):m]):
                m -= 1
        return m

    def _take(self, slot: int, hashes: list[bytes], start: int) -> None:
        """Share the cached blocks of ``hashes[start:]`` into the slot's table (of each group
        those from the next query's front on). Blocks it held before are left for ``slide``:
        a chunk planned earlier in this step may still read them."""
        held = self.held[slot]
        for g, group in enumerate(self.groups):
            pool, front = group.pools[held.replica], group.front(len(hashes) * self.block_size)
            for i in range(start, len(hashes)):
                block = pool.lookup(hashes[i]) if i >= front else NO_BLOCK
                if block != NO_BLOCK:
                    pool.share(block)
                group.tables[slot, i] = block
                held.ids[g].append(block)
        held.hashes += hashes[start:]

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

    def match_prefix(self, slot: int, tokens, limit: int, root: bytes = b"") -> int:
        """Give an empty table row the cached blocks of the longest prefix of ``tokens``
        (at most ``limit`` positions, whole blocks) by reference, its hash chain starting from
        ``root``. Returns the positions hit."""
        held = self.held[slot]
        if held.blocks:
            raise ValueError(f"slot {slot} already holds blocks")
        held.root = root
        end = min(limit, len(tokens))
        self.queries += end // self.block_size
        run = self._cached_run(self.pools[held.replica], root, tokens, 0, end)
        run = run[:self._hits(held, run, 0)]
        self._take(slot, run, 0)
        self.hits += len(run)
        return len(held.blocks) * self.block_size

    def extend_prefix(self, slot: int, tokens, start: int, limit: int) -> int:
        """A sequence with ``start`` positions computed (a multiple of the block size, all its
        blocks registered) takes cached blocks for what follows, up to ``limit`` positions.
        Returns the new computed count."""
        held, size = self.held[slot], self.block_size
        # Only from a block boundary, every block before it registered and none past it.
        if start % size or len(held.hashes) * size != start or len(held.blocks) * size > start:
            return start
        have = start // size
        run = self._cached_run(self.pools[held.replica], held.last_hash, tokens, have,
                               min(limit, len(tokens)))
        self.queries += len(run) + (have + len(run) < min(limit, len(tokens)) // size)
        hashes = held.hashes + run
        m = self._hits(held, hashes, have)
        self.hits += m - have
        self._take(slot, hashes[:m], have)
        return m * size

    def commit(self, slot: int, tokens, computed: int) -> None:
        """Register the slot's blocks that ``computed`` positions of ``tokens`` fill."""
        held = self.held[slot]
        full = min(computed, len(tokens), len(held.blocks) * self.block_size) // self.block_size
        parent = held.last_hash
        for i in range(len(held.hashes), full):
            parent = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            held.hashes.append(parent)
            for g, group in enumerate(self.groups):
                group.pools[held.replica].register(held.ids[g][i], parent)

    def free(self, slot: int) -> None:
        """Release every block of the slot's table (last first: a prefix's tail goes first)."""
        self.release(self.detach(slot))

    # -- blocks kept by a session between turns ------------------------------------------------

    def detach(self, slot: int) -> Held:
        """Take the slot's blocks out of its row, references kept (an interactive session
        holds them until its next turn or its end)."""
        held = self.held[slot]
        # The row keeps its chain's root: a preempted sequence extends its recompute from it.
        self.held[slot] = Held.empty(held.replica, len(self.groups), held.root)
        for group in self.groups:
            group.tables[slot] = NO_BLOCK
        return held

    def attach(self, slot: int, held: Held, keep: int) -> int:
        """Put a session's blocks into an empty row of the same replica, the first ``keep``
        positions' worth (the rest released). Returns the positions kept: 0 (all released)
        when a group no longer holds what a query at ``keep`` reads."""
        if self.held[slot].blocks or self.held[slot].replica != held.replica:
            raise ValueError(f"slot {slot} cannot take these blocks")
        n = self.blocks_for(keep)
        if any(NO_BLOCK in held.ids[g][group.front(keep):n] for g, group in enumerate(self.groups)):
            self.release(held)
            return 0
        row = self.held[slot] = Held(held.replica, [ids[:n] for ids in held.ids],
                                     [min(f, n) for f in held.fronts], held.hashes[:min(n, keep // self.block_size)],
                                     held.root)
        for g, group in enumerate(self.groups):
            group.pools[held.replica].give_back(held.ids[g][n:])
            group.tables[slot, :n] = row.ids[g]
        return keep

    def release(self, held: Held) -> None:
        """Drop a detached set of blocks (a session ended)."""
        for g, group in enumerate(self.groups):
            group.pools[held.replica].give_back(held.ids[g])

    def clear_cache(self) -> None:
        for pool in (p for group in self.groups for p in group.pools):
            pool.clear_cache()
