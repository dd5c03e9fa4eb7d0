"""KV groups: the pools of blocks one kind of layer keeps its KV in, and the block tables
that address them. Plain host data, no device.

A group has a pool of blocks per data replica (each replica its own block ids) and a table
row per slot; position p of a sequence lives at offset ``p % block_size`` of block
``tables[slot, p // block_size]`` of every group. The groups differ only in what a query at
position ``at`` can still read (``front``): a full-attention layer reads every position before
it, so its group keeps them all; a sliding-window layer reads the last ``window`` positions, so
its group gives back the blocks wholly before that. Adding a kind of layer is one subclass
here, and ``ModelConfig.kv_group`` naming the layers that use it.

A block's content is named by a hash chained over every token up to and including it (equal
hashes: equal prefixes, equal KV). Free blocks sit on an LRU list keeping their hash until
they are taken for new KV, so a later prompt with the same prefix can still hit them.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

NO_BLOCK = -1  # a table entry with no block: writes there are dropped, never read


def chain_hash(parent: bytes, tokens) -> bytes:
    """The hash of a full block: its tokens chained onto the hash of every block before it."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class BlockPool:
    """One replica's blocks of one group: reference counts, the free list (LRU first) and the
    prefix cache."""

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

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

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

    def give_back(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # last first: a prefix's tail is evicted before its head
            self.release(block)

    def register(self, block: int, h: bytes) -> None:
        """``block`` is full and holds the prefix hashed ``h``. A prefix already cached under
        another block (computed twice, by two prompts of one step) keeps that one."""
        if block != NO_BLOCK and h not in self.cached and self.hash_of[block] is None:
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


class KVGroup:
    """Full attention: a query reads every position before it, so a sequence keeps every
    block. ``num_blocks`` per replica, a table row of ``max_blocks`` entries per slot."""

    slides = False  # whether ``front`` ever moves (blocks a query no longer reads go back)

    def __init__(self, num_blocks: int, slots: int, max_blocks: int, replicas: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pools = [BlockPool(num_blocks) for _ in range(replicas)]
        self.tables = np.full((slots, max_blocks), NO_BLOCK, np.int32)

    def front(self, at: int) -> int:
        """The first table index a query at position ``at`` (or later) reads."""
        return 0

    def used(self) -> int:
        """Blocks referenced by any table (or session), over every replica."""
        return sum(p.used for p in self.pools)


class WindowGroup(KVGroup):
    """Sliding-window attention: a query at ``at`` reads positions ``at - window + 1 .. at``, so
    the blocks wholly before that go back to the pool as a sequence advances."""

    slides = True

    def __init__(self, num_blocks: int, slots: int, max_blocks: int, replicas: int, block_size: int,
                 window: int):
        super().__init__(num_blocks, slots, max_blocks, replicas, block_size)
        self.window = window

    def front(self, at: int) -> int:
        return max(0, at + 1 - self.window) // self.block_size
