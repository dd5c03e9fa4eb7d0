"""The scheduler: turns the running sequences into the plan of one step, without touching
the device. It updates the host's bookkeeping of what the plan will have computed (each
sequence's ``prefilled``, each slot's tokens), as the runner will once it executes the plan.

One token budget per step (``max_chunk``): prompt chunks, earliest-admitted first, and the
running sequences' decode rows. Several short prompts that arrive together are all prefilled
in one step, so the running batch reaches its full width sooner; a long prompt takes one chunk
per step and never stalls decoding for longer than that. After the first chunk of a step, a
prompt is taken only if all of it fits what is left, so no prompt is cut into a small tail
that costs a call of its own.

Chunks go to the device packed, several prompts per call where the backend can
(``prompts_per_call``): one pass over the weights for all of them. The decode rows ride along
in the step's first call, one token each, in room the prompts leave: they advance at no extra
pass over the weights while prompts are prefilled. Otherwise the step ends with a decode step
of its own, which, when the batch is the one in flight, is queued on the device fed by that
step's tokens before the host has read them.
"""

from __future__ import annotations

from typing import Callable

from service.engine.plan import Chunk, Copy, Decode, Prefill, StepPlan
from service.engine.request import Sequence
from service.engine.slots import SlotTable, common_prefix


class Scheduler:
    def __init__(self, table: SlotTable, max_chunk: int, session_len: int,
                 prompts_per_call: Callable[[int], int], can_chain: bool = True):
        self.table = table
        self.max_chunk = max_chunk
        self.session_len = session_len
        self.prompts_per_call = prompts_per_call
        self.can_chain = can_chain  # a process-spanning mesh replays every step: no chaining

    def decodable(self) -> list[Sequence]:
        return [s for s in self.table.running.values() if s.decodable]

    def _pending(self) -> list[Sequence]:
        return sorted((s for s in self.table.running.values() if s.prefilled < len(s.seq)),
                      key=lambda s: s.req.arrival)

    def chains_on(self, inflight: list[Sequence]) -> bool:
        """Whether the next step can be queued on the step in flight over ``inflight``, before
        its tokens reach the host: no prompt waits, the batch is the same and no row is under a
        grammar (whose mask for the next token needs this one). Otherwise the engine reads
        that step first, so the plan knows every row's input."""
        if not self.can_chain or self._pending():
            return False
        live = self.decodable()
        if any(s.constrained for s in live):
            return False
        return (len(live) == len(inflight) and all(a is b for a, b in zip(live, inflight))
                and max(s.length for s in live) < self.session_len)

    def schedule(self, inflight: list[Sequence] | None = None) -> StepPlan:
        """The next step's plan. ``inflight``: the rows of the decode step on the device whose
        tokens the host has not read (only when ``chains_on`` them)."""
        if inflight:
            return StepPlan(decode=Decode(
                tuple(s.slot for s in inflight), None, tuple(s.length for s in inflight),
                tuple(len(s.generated) + 1 for s in inflight), owners=tuple(inflight)))
        ops: list[Copy | Prefill] = []
        rode = self._plan_prefill(ops)
        live = [] if rode else self.decodable()
        decode = None
        if live:
            decode = Decode(tuple(s.slot for s in live), tuple(s.generated[-1] for s in live),
                            tuple(s.length - 1 for s in live), tuple(len(s.generated) for s in live),
                            owners=tuple(live))
        return StepPlan(tuple(ops), decode)

    def _plan_prefill(self, ops: list) -> bool:
        """Append the step's copies and prefill calls to ``ops``; True when the decode rows
        rode along."""
        budget, first, rode = self.max_chunk, True, False
        while budget > 0:
            decodable = self.decodable() if first else []
            want = len(decodable)
            pack = self._next_pack(budget, first, want, ops)
            if not pack:
                break
            used = sum(len(c.tokens) for c in pack)
            riders: list[Chunk] = []
            # Rows ride only in room the prompts leave: they never push a prompt out (a prompt
            # longer than the budget leaves them room in its first chunk).
            if want and used + want <= budget and len(pack) + want <= self.prompts_per_call(used + want):
                riders = [Chunk(s.slot, (s.generated[-1],), s.length - 1, True, len(s.generated), owner=s)
                          for s in decodable if s.length < self.session_len]
                rode = bool(riders)
            first = False
            budget -= used + len(riders)
            for c in pack:
                c.owner.prefilled += len(c.tokens)
                self.table.tokens[c.slot] = c.owner.seq[:c.owner.prefilled]
            ops.append(Prefill(tuple(pack + riders)))
        return rode

    def _next_pack(self, budget: int, first: bool, reserve: int, ops: list) -> list[Chunk]:
        """The prompt chunks of the next prefill call. A first chunk cut from a prompt longer
        than the budget leaves ``reserve`` tokens of it for decode rows to ride in."""
        pack: list[Chunk] = []
        total = 0
        for seq in self._pending():
            self._share_prefix(seq, ops)
            # A prompt that shares a prefix with one in this call waits for the next call,
            # which copies that prefix's KV instead of computing it twice.
            limit = len(seq.seq) - 1
            if any(min(common_prefix(c.owner.seq[:c.owner.prefilled + len(c.tokens)], seq.seq), limit)
                   > seq.prefilled for c in pack):
                break
            remaining = len(seq.seq) - seq.prefilled
            if (pack or not first) and remaining > budget - total:
                break
            n = min(remaining, budget - total)
            if first and not pack and remaining > budget and budget > 2 * reserve:
                n = budget - reserve
            if len(pack) + 1 > self.prompts_per_call(total + n):
                break
            start = seq.prefilled
            end = start + n
            pack.append(Chunk(seq.slot, tuple(seq.seq[start:end]), start, end == len(seq.seq),
                              score=seq.params.prompt_logprobs is not None,
                              next_token=seq.seq[end] if end < len(seq.seq) else 0, owner=seq))
            total += n
        return pack

    def _share_prefix(self, seq: Sequence, ops: list) -> None:
        """If another running sequence's slot already holds KV for a longer prefix of this
        prompt (n > 1 samples of one prompt, a shared system prompt), copy that KV instead of
        computing it again. The last prompt token is always computed: its logits pick the
        first new token with this request's own sampling settings. A prompt being scored is
        computed whole: its logprobs come from its own prefill."""
        if seq.params.prompt_logprobs is not None:
            return
        slot, n = self.table.longest_running_prefix(seq, len(seq.seq) - 1)
        if slot >= 0 and n > seq.prefilled:
            ops.append(Copy(slot, seq.slot))
            seq.cached += n - seq.prefilled
            seq.prefilled = n
            self.table.tokens[seq.slot] = seq.seq[:n]
