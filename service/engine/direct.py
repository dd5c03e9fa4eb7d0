"""A runner driven directly, outside an engine: tests and benchmarks run prompts and decode
steps over identity block tables (slot s owning its replica's blocks ``s' * M .. (s' + 1) * M
- 1``, s' its index there, as when every slot holds a whole session). Serving never uses
these: its tables come from the block manager."""

from __future__ import annotations

import numpy as np

from service.engine.plan import Chunk, Decode, Prefill
from service.engine.step_io import Sampled


def identity_tables(runner) -> np.ndarray:
    """(1, slots, max blocks) tables of every slot owning a session's worth of its replica's
    pool; an error where the pool is smaller or the model keeps a window group."""
    per = runner.slots // runner.replicas
    if runner.kv_groups > 1 or runner.num_blocks < per * runner.max_blocks:
        raise ValueError("this pool is smaller than a session per slot (or has a window group): "
                         "pass block tables")
    local = np.arange(runner.slots) % per
    return (local[:, None] * runner.max_blocks + np.arange(runner.max_blocks)[None, :]).astype(np.int32)[None]


def prefill(runner, slot: int, tokens, start: int, last: bool = True, tables=None) -> Sampled:
    """One chunk of a slot's sequence at ``start``: the token drawn after its last position."""
    op = Prefill((Chunk(slot=slot, tokens=tuple(tokens), start=start, last=last),))
    return runner.run_prefill(op, identity_tables(runner) if tables is None else tables).sampled


def prefill_chunks(runner, chunks: list[Chunk], tables=None):
    """Chunks of distinct slots in one call: its ``StepOutput``."""
    return runner.run_prefill(Prefill(tuple(chunks)), identity_tables(runner) if tables is None else tables)


def decode(runner, slots, tokens, positions, steps, tables=None) -> Sampled:
    """One decode step for ``slots`` (each with its last token, that token's position and its
    generated count): rows follow ``slots``."""
    d = Decode(tuple(slots), tuple(tokens), tuple(positions), tuple(steps))
    return runner.fetch(runner.dispatch_decode(d, identity_tables(runner) if tables is None else tables))
