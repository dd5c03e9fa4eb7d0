"""A draft model for speculative decoding: a smaller (or quantized) model with the target's
tokenizer proposes each speculating row's next K tokens, greedily, before the step that
checks them.

Its runner has the target's slots, session length, block size and pool size, and reads and
writes its own KV pools through the target's block tables: a sequence's blocks hold its
target KV in the target's pools and its draft KV in the draft's. Draft KV is only trusted for
positions the draft computed for this very sequence (``Sequence.draft_prefilled``): a new
sequence (or one preempted meanwhile) catches up from position 0, even through blocks it
shares with others (the same tokens give the same draft KV, so writing them again changes
nothing). After proposing, a row's draft KV is trusted up to its last confirmed token; the
positions of its drafts are written again from there next time, whatever was accepted.
"""

from __future__ import annotations

import numpy as np

from service.engine.plan import Chunk, Decode, Prefill
from service.engine.request import Sequence
from service.params import SamplingParams


class DraftModel:
    def __init__(self, runner, name: str = "draft"):
        self.runner = runner
        self.name = name
        self.set_rows()

    def set_rows(self) -> None:
        """Every slot draws greedily (again after a sleep, which frees the sampling state)."""
        greedy = SamplingParams(temperature=0)
        for slot in range(self.runner.slots):
            self.runner.set_slot(slot, greedy, [], 0)

    def check(self, target) -> None:
        """Raise ValueError naming what makes this draft unusable with ``target`` (a runner)."""
        r = self.runner
        if r.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({r.cfg.vocab_size}) is not the target's "
                             f"({target.cfg.vocab_size}): it needs the same tokenizer")
        same = (r.slots, r.session_len, r.block_size, r.num_blocks, r.replicas)
        want = (target.slots, target.session_len, target.block_size, target.num_blocks, target.replicas)
        if same != want:
            raise ValueError(f"the draft runner's slots, session, block size, pool and replicas {same} "
                             f"must be the target's {want}")

    def propose(self, seqs: list[Sequence], limits: list[int], tables: np.ndarray) -> list[list[int]]:
        """Up to each sequence's limit of greedy draft tokens after its last one. Catches each
        one's draft KV up to its last confirmed position first. ``tables``: (1, slots, max
        blocks), the first KV group's, where the draft keeps every layer's KV."""
        r = self.runner
        for s in seqs:
            if s.draft_epoch != s.preempted:  # new blocks since: nothing of its draft KV is known
                s.draft_prefilled, s.draft_epoch = 0, s.preempted
            end = s.length - 1  # the last token is the first decode step's input
            tokens = s.tokens(s.draft_prefilled, end)
            for at in range(0, len(tokens), r.max_chunk):
                start = s.draft_prefilled + at
                r.run_prefill(Prefill((Chunk(slot=s.slot, tokens=tuple(tokens[at:at + r.max_chunk]), start=start,
                                             last=False),)), tables)
            s.draft_prefilled = end
        # Rows with the same limit draft together, each step fed on the device by the one
        # before (one host read per group); a row never decodes past its own limit, whose
        # positions may have no block.
        out: dict[int, list[int]] = {}
        for limit in sorted(set(limits)):
            group = [s for s, n in zip(seqs, limits) if n == limit]
            slots = tuple(s.slot for s in group)
            positions = [s.length - 1 for s in group]
            tokens, feed, handles = tuple(s.generated[-1] for s in group), None, []
            for i in range(limit):
                # The first step is fed the rows' last tokens; each later one the step before's.
                d = Decode(slots, tokens if feed is None else None, tuple(p + i for p in positions), (0,) * len(group))
                feed = r.dispatch_decode(d, tables, inflight=feed)
                handles.append(feed)
            steps = [r.fetch(h).tokens for h in handles]
            for j, s in enumerate(group):
                out[id(s)] = [int(steps[i][j]) for i in range(limit)]
                s.draft_prefilled = s.length  # the last token's draft KV, written by the first step
        return [out[id(s)] for s in seqs]
