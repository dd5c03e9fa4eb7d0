"""The plain-data plan of one engine step: what the scheduler decides and the runner executes.

A plan is a list of prefill calls run in order, then at most one decode step, over the block
tables as the scheduler left them (``tables``: every slot's blocks, a copy). Decode rows may
instead ride along a prefill call as one-token chunks. ``owner`` fields point back at the
engine's sequences for output processing; they take no part in what the device does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chunk:
    """Tokens of one sequence at positions ``start..``; ``last``: they end its prompt (or it
    is a decode row), so the token sampled after them is its next; ``step``: tokens it has
    generated so far; ``decode``: a decode row (its last sampled token, riding along a prefill
    call or verified with drafts), not a piece of a prompt."""

    slot: int
    tokens: tuple[int, ...]
    start: int
    last: bool
    step: int = 0
    decode: bool = False
    # Score the chunk: each token's successor's logprob (``next_token`` follows the last one).
    score: bool = False
    next_token: int = 0
    # Pool the chunk's final hidden states into its sequence's embedding.
    embed: bool = False
    # A verify chunk (speculative decoding): a decode row's last token and this many proposed
    # ones after it; the call draws a token at every position (``service.engine.speculate``).
    drafts: int = 0
    owner: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One prefill call: chunks of distinct slots packed into one row of tokens."""

    chunks: tuple[Chunk, ...]
    # A verify call: decode rows only, each with its drafts (possibly none), drawing a token at
    # every position.
    verify: bool = False

    @property
    def scores(self) -> bool:
        return any(c.score for c in self.chunks)

    @property
    def embeds(self) -> bool:
        return any(c.embed for c in self.chunks)

    @property
    def riders(self) -> int:
        """Decode rows riding along (one-token chunks at the end)."""
        return sum(1 for c in self.chunks if c.decode)


@dataclasses.dataclass(frozen=True)
class Decode:
    """One decode step over ``slots``. ``tokens`` None: each row's input is the token the step
    in flight samples for it (queued before the host has read that step)."""

    slots: tuple[int, ...]
    tokens: tuple[int, ...] | None
    positions: tuple[int, ...]
    steps: tuple[int, ...]
    owners: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def chained(self) -> bool:
        return self.tokens is None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Prefill calls run in order (``ops``), then at most one decode step, over ``tables``
    ((groups, slots, max blocks): every KV group's tables as the plan leaves them)."""

    ops: tuple[Prefill, ...] = ()
    decode: Decode | None = None
    tables: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def sampling_rows(self) -> list:
        """The sequences (owners) that sample a token in this step: the chunks that end a prompt
        or are decode rows, then the decode step's rows."""
        rows = [c.owner for op in self.ops for c in op.chunks if c.last]
        return rows + list(self.decode.owners) if self.decode is not None else rows

    def __bool__(self) -> bool:
        return bool(self.ops) or self.decode is not None
