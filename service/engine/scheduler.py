"""The scheduler: turns the running sequences into the plan of one step, without touching
the device. It updates the host's bookkeeping of what the plan will have computed (each
sequence's ``prefilled``, its blocks and their hashes), as the runner will once it executes
the plan.

Blocks first. Every sequence that decodes this step needs room for the KV of its input token;
they are served oldest first, and when the pool runs dry the most recently admitted sequence
is preempted (its blocks freed; it keeps its slot and is recomputed later from its prompt and
the tokens it generated, which therefore do not change). Idle sessions' blocks go back to the
pool before any running sequence is preempted. Prompt chunks take only blocks that are free.

One token budget per step (``max_chunk``): prompt chunks, earliest-admitted first, and the
running sequences' decode rows. Several short prompts that arrive together are all prefilled
in one step, so the running batch reaches its full width sooner; a long prompt takes one chunk
per step and never stalls decoding for longer than that. After the first chunk of a step, a
prompt is taken only if all of it fits what is left, so no prompt is cut into a small tail
that costs a call of its own. A prompt takes the blocks of its prefix that earlier prompts
registered (a shared system prompt, n > 1 samples of one prompt) when its next chunk is
planned, by reference, and computes only the rest: the earlier prompt's chunk comes first in
the same call or an earlier one.

Chunks go to the device packed, several prompts per call where the backend can
(``prompts_per_call``): one pass over the weights for all of them. The decode rows ride along
in the step's first call, one token each, in room the prompts leave: they advance at no extra
pass over the weights while prompts are prefilled. Otherwise the step ends with a decode step
of its own, which, when the batch is the one in flight, is queued on the device fed by that
step's tokens before the host has read them.
"""

from __future__ import annotations

from typing import Callable

from service.engine import images
from service.engine.plan import Chunk, Decode, Prefill, StepPlan
from service.engine.request import Sequence
from service.engine.slots import SlotTable
from service.engine.speculate import Speculation


class Scheduler:
    def __init__(self, table: SlotTable, max_chunk: int, max_length: int,
                 prompts_per_call: Callable[[int, int], int], can_chain: bool = True,
                 speculation: Speculation | None = None):
        self.table = table
        self.blocks = table.blocks
        self.max_chunk = max_chunk
        self.max_length = max_length  # the longest a sequence grows: a session, or the pool
        self.prompts_per_call = prompts_per_call
        self.can_chain = can_chain  # a process-spanning mesh replays every step: no chaining
        self.preemptions = 0
        self.speculation = speculation or Speculation.off()

    def decodable(self) -> list[Sequence]:  # oldest first, as every list of sequences here
        return sorted((s for s in self.table.running.values() if s.decodable), key=lambda s: s.admitted)

    def _pending(self) -> list[Sequence]:
        return sorted((s for s in self.table.running.values() if s.pending), key=lambda s: s.admitted)

    def chains_on(self, inflight: list[Sequence]) -> bool:
        """Whether the next step can be queued on the step in flight over ``inflight``, before
        its tokens reach the host: no prompt waits, the batch is the same, no row is under a
        grammar (whose mask for the next token needs this one) and every row has room for one
        more position without preempting. Otherwise the engine reads that step first, so the
        plan knows every row's input."""
        if not self.can_chain or self._pending():
            return False
        # Every running sequence is in that step (its input's KV planned one past its target).
        live = list(self.table.running.values())
        # Drafts for the next step need this step's tokens.
        if any(s.constrained or s.prefilled != s.target + 1 for s in live) or self._may_speculate(live):
            return False
        return (len(live) == len(inflight) and set(map(id, live)) == set(map(id, inflight))
                and max(s.length for s in live) < self.max_length
                and self.blocks.fits([(s.slot, s.length + 1) for s in live]))

    def _slide(self) -> None:
        """Window blocks no running sequence's next query reaches go back to the pool (every
        query planned from now on is at or past its sequence's ``prefilled``)."""
        if any(g.slides for g in self.blocks.groups):  # per step: skipped where no group slides
            for s in self.table.running.values():
                self.blocks.slide(s.slot, s.prefilled)

    def schedule(self, inflight: list[Sequence] | None = None) -> StepPlan:
        """The next step's plan. ``inflight``: the rows of the decode step on the device whose
        tokens the host has not read (only when ``chains_on`` them)."""
        self._slide()
        if inflight:
            for s in inflight:  # it writes the in-flight token's KV at position s.length
                if not self.blocks.allocate(s.slot, s.length + 1):
                    # ``chains_on`` checked that every row fits: a write with no block would be
                    # dropped and the row's next tokens computed without it.
                    raise RuntimeError(f"no KV block for the chained decode row of slot {s.slot} "
                                       f"at position {s.length}")
                s.prefilled += 1
            return StepPlan(decode=Decode(
                tuple(s.slot for s in inflight), None, tuple(s.length for s in inflight),
                tuple(len(s.generated) + 1 for s in inflight), owners=tuple(inflight)),
                tables=self.blocks.device_tables())
        live = self._reserve_decodes()
        ops: list[Prefill] = []
        verify = self._plan_verify(live) if self._may_speculate(live) else []
        rode = self._plan_prefill(ops, [] if verify else live)
        ops += verify
        decode = None
        if live and not rode and not verify:
            decode = Decode(tuple(s.slot for s in live), tuple(s.generated[-1] for s in live),
                            tuple(s.length - 1 for s in live), tuple(len(s.generated) for s in live),
                            owners=tuple(live))
            for s in live:
                self._advance(s, 1)
        if not ops and decode is None:
            self._unstick()
        return StepPlan(tuple(ops), decode, tables=self.blocks.device_tables())

    # -- blocks --------------------------------------------------------------------------------

    def _reserve_decodes(self) -> list[Sequence]:
        """The decode rows of this step, each with a block for its input token's KV, oldest
        first; newer sequences are preempted where the pool runs dry."""
        out: list[Sequence] = []
        for s in self.decodable():
            if not s.decodable or s.length >= self.max_length:  # preempted meanwhile; finishing
                continue
            if self._make_room(s, s.length, keep=out):
                out.append(s)
        return out

    def _make_room(self, seq: Sequence, tokens: int, keep: list[Sequence]) -> bool:
        """Grow ``seq``'s blocks to hold ``tokens`` positions, preempting the most recently
        admitted sequences of its replica (never those in ``keep``) while the pool lacks them.
        False when it cannot (then ``seq`` may itself have been preempted)."""
        replica = self.blocks.replica(seq.slot)
        while not self.blocks.allocate(seq.slot, tokens):
            if not self.table.evict_session(replica):
                victim = self._victim(replica, keep)
                if victim is None:
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False
        return True

    def _victim(self, replica: int, keep: list[Sequence]) -> Sequence | None:
        kept = set(map(id, keep))
        holding = [s for s in self.table.running.values()
                   if id(s) not in kept and self.blocks.held[s.slot].blocks
                   and self.blocks.replica(s.slot) == replica]
        return max(holding, key=lambda s: s.admitted, default=None)

    def _preempt(self, seq: Sequence) -> None:
        self.table.preempt(seq)
        seq.prompt_logprobs = None  # a scored prompt is scored again from its first token
        seq.pooled = None  # and an embedding pooled again
        self.preemptions += 1

    def _unstick(self) -> None:
        """Nothing could be planned: prompts wait for blocks that other waiting prompts hold
        (each partly prefilled). Preempt the most recently admitted of them that holds blocks,
        so the earlier ones can finish."""
        oldest = next(iter(self._pending()), None)
        replica = None if oldest is None else self.blocks.replica(oldest.slot)
        if oldest is not None and not self.table.evict_session(replica):
            victim = self._victim(replica, keep=[oldest])
            if victim is not None:
                self._preempt(victim)

    def _advance(self, seq: Sequence, n: int) -> None:
        """``n`` more positions of ``seq`` computed by the plan; register the blocks they fill
        (their tokens are known: a chained row's input is not, and it registers later)."""
        seq.prefilled += n
        known = min(seq.prefilled, seq.length)
        if known // self.blocks.block_size > len(self.blocks.held[seq.slot].hashes):
            self.blocks.commit(seq.slot, seq.hash_tokens(0, known), known)

    # -- speculative decoding ---------------------------------------------------------------

    def _may_speculate(self, live: list[Sequence]) -> bool:
        spec = self.speculation
        return 0 < len(live) <= spec.max_batch and any(spec.eligible(s) for s in live)

    def _plan_verify(self, live: list[Sequence]) -> list[Prefill]:
        """The decode rows as verify calls (as few as the backend packs them in), each row with
        the drafts proposed for it; none when no row has any (they decode as usual). Each row
        first gets blocks for its drafts' limit, only while a block per decode row stays free
        (drafts never cause a preemption); else as many drafts as its blocks already cover."""
        budget = self.max_chunk - len(live)  # the call's tokens stay within a prefill bucket
        limits = []
        for s in live:
            limit = min(self.speculation.limit(s, self.max_length - s.length), budget)
            if limit > 0 and self.blocks.covered(s.slot) < s.length + limit:
                if self.blocks.spare(s.slot, s.length + limit) < len(live):
                    limit = max(0, min(limit, self.blocks.covered(s.slot) - s.length))
                else:
                    self.blocks.allocate(s.slot, s.length + limit)
            budget -= limit
            limits.append(limit)
        if not any(limits):
            return []
        drafts = self.speculation.drafts(live, limits, self.blocks.device_tables()[:1])
        chunks = [decode_row(s, d) for s, d in zip(live, drafts)]
        if not any(c.drafts for c in chunks):
            return []
        for c in chunks:
            # Its registered blocks stay those of known tokens: ``_advance`` commits up to the
            # sequence's length, which the drafts are past.
            self._advance(c.owner, len(c.tokens))
        return verify_calls(chunks, self.prompts_per_call)

    # -- prefill -------------------------------------------------------------------------------

    def _plan_prefill(self, ops: list, decodable: list[Sequence]) -> bool:
        """Append the step's prefill calls to ``ops``; True when the decode rows rode along."""
        budget, first, rode = self.max_chunk, True, False
        while budget > 0:
            want = len(decodable) if first else 0
            pack = self._next_pack(budget, first, want)
            if not pack:
                break
            used = sum(len(c.tokens) for c in pack)
            riders: list[Chunk] = []
            # Rows ride only in room the prompts leave: they never push a prompt out (a prompt
            # longer than the budget leaves them room in its first chunk).
            if want and used + want <= budget and len(pack) + want <= self.prompts_per_call(
                    used + want, max([c.start for c in pack] + [s.length - 1 for s in decodable])):
                riders = [decode_row(s) for s in decodable]
                for s in decodable:
                    self._advance(s, 1)
                rode = True
            first = False
            budget -= used + len(riders)
            ops.append(Prefill(tuple(pack + riders)))
        return rode

    def _next_pack(self, budget: int, first: bool, reserve: int) -> list[Chunk]:
        """The prompt chunks of the next prefill call. A first chunk cut from a prompt longer
        than the budget leaves ``reserve`` tokens of it for decode rows to ride in."""
        pack: list[Chunk] = []
        total = 0
        pending = self._pending()
        for seq in pending:
            if budget - total <= 0:
                break
            if any(c.owner is seq for c in pack):
                continue
            self._take_cached(seq)
            if not seq.pending:
                continue
            remaining = seq.target - seq.prefilled
            if (pack or not first) and remaining > budget - total:
                break
            n = min(remaining, budget - total)
            if first and not pack and remaining > budget and budget > 2 * reserve:
                n = budget - reserve
            start = seq.prefilled
            room = self.blocks.room(seq.slot, start)
            n = min(n, room)
            if seq.req.images:  # an image's tokens are computed in one call (see engine.images)
                n = images.cut(seq.req.images, start, n, min(budget - total, room))
            if n <= 0:
                continue  # it waits for blocks (or for a call with room for its image)
            # The call's size and span (its chunks' furthest start) bound how many it packs.
            if len(pack) + 1 > self.prompts_per_call(total + n, max([c.start for c in pack] + [start])):
                break
            if not self.blocks.allocate(seq.slot, start + n):
                continue  # it waits for blocks
            end = start + n
            prompt = not seq.generated
            score = prompt and seq.params.prompt_logprobs is not None
            pack.append(Chunk(slot=seq.slot, tokens=tuple(seq.tokens(start, end)), start=start,
                              last=prompt and end == len(seq.seq), score=score,
                              next_token=seq.seq[end] if score and end < len(seq.seq) else 0,
                              embed=prompt and seq.params.embed is not None, owner=seq))
            self._advance(seq, n)
            total += n
        return pack

    def _take_cached(self, seq: Sequence) -> None:
        """Blocks of the sequence's next tokens that the prefix cache has now (registered since
        it was placed: another prompt computed them) join its table by reference."""
        if seq.params.computes_prompt and not seq.generated:
            return
        limit = seq.target - 1 if not seq.generated else seq.target
        if seq.prefilled % self.blocks.block_size or seq.prefilled + self.blocks.block_size > limit:
            return
        got = self.blocks.extend_prefix(seq.slot, seq.hash_tokens(0, limit), seq.prefilled, limit)
        if got > seq.prefilled:
            if not seq.preempted:
                seq.cached += got - seq.prefilled
            seq.prefilled = got


def decode_row(seq: Sequence, drafts=()) -> Chunk:
    """``seq``'s decode row as a chunk: its last sampled token at its position (and, in a
    verify call, the drafts proposed after it)."""
    return Chunk(slot=seq.slot, tokens=(seq.generated[-1], *drafts), start=seq.length - 1, last=True,
                 step=len(seq.generated), decode=True, drafts=len(drafts), owner=seq)


def verify_calls(chunks: list[Chunk], prompts_per_call: Callable[[int, int], int]) -> list[Prefill]:
    """Verify chunks packed into as few calls as the backend takes them, in order."""
    calls: list[list[Chunk]] = [[]]
    for c in chunks:
        call = calls[-1]
        size = sum(len(x.tokens) for x in call) + len(c.tokens)
        if call and len(call) + 1 > prompts_per_call(size, max(x.start for x in call + [c])):
            calls.append([])
        calls[-1].append(c)
    return [Prefill(tuple(call), verify=True) for call in calls]
