"""Output processing: sampled tokens into text, stop decisions, finishes and metrics.

Runs on the engine thread after each executed step. A step's outputs for one event loop cross
threads in one wake-up (``deliver``), not one per token.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from model.tokenizer import Tokenizer
from service.engine.bridge import LoopQueue, deliver
from service.engine.request import Output, Sequence, TokenLogprob
from service.engine.slots import SlotTable
from service.engine.speculate import adapt
from service.engine.step_io import Sampled, StepOutput
from service.metrics import EngineMetrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    finished: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    mixed_calls: int = 0  # prefill calls that decode rows rode along
    chained_steps: int = 0  # queued before the previous step's tokens reached the host
    spec_drafted: int = 0  # speculative decoding: draft tokens proposed
    spec_accepted: int = 0  # of which accepted
    spec_rows: int = 0  # decode rows checked in verify calls


def apply_stop_strings(seq: Sequence, text: str, final: bool) -> tuple[str, bool]:
    """Match stop strings on decoded text; hold back a possible partial match. Returns the
    text to emit and whether a stop string was hit."""
    stops = seq.params.stop
    if not stops:
        return text, False
    buf = seq.pending_text + text
    hit = min(((buf.find(s), s) for s in stops if s in buf), default=None)
    if hit is not None:
        idx, s = hit
        seq.pending_text = ""
        seq.stop_hit = s
        return buf[:idx + (len(s) if seq.params.include_stop_str_in_output else 0)], True
    if final:
        seq.pending_text = ""
        return buf, False
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), 0, -1):
            if buf.endswith(s[:k]):
                hold = max(hold, k)
                break
    seq.pending_text = buf[len(buf) - hold:] if hold else ""
    return buf[:len(buf) - hold], False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, table: SlotTable, session_len: int,
                 metrics: EngineMetrics, stats: Stats):
        self.tokenizer = tokenizer
        self.table = table
        self.session_len = session_len
        self.metrics = metrics
        self.stats = stats

    def on_prefilled(self, plan, results: list[StepOutput]) -> None:
        """The outputs of a plan's prefill calls (``ModelRunner.execute``): prompt scores,
        prompts finished, and the tokens sampled where a chunk ends its prompt or is a decode
        row."""
        for call, out in zip(plan.ops, results):
            self.stats.prefill_calls += 1
            if call.verify:
                self.verified(call, out.sampled)
                continue
            self.stats.mixed_calls += call.riders > 0
            if out.scores is not None:
                self.prompt_scores(call.chunks, out.scores)
            if out.hidden is not None:
                self.pool(call.chunks, out.hidden)
            done = [i for i, c in enumerate(call.chunks) if c.last]
            for i in done:
                if not call.chunks[i].decode:
                    self.prompt_done(call.chunks[i].owner)
            if done:
                self.on_tokens([call.chunks[i].owner for i in done], out.sampled.take(done))

    def verified(self, call, sampled: Sampled) -> None:
        """A verify call's tokens (a row per position): each row's drafts are accepted while
        each equals the token drawn before it, and the tokens drawn up to the first mismatch
        are its output, processed one by one (a stop among them ends it there). Its KV is then
        known up to its newest token; blocks only rejected drafts took go back."""
        toks = sampled.tokens
        seqs, rows, at = [], [], 0
        for c in call.chunks:
            n = 1
            while n <= c.drafts and int(toks[at + n - 1]) == c.tokens[n]:
                n += 1
            seqs += [c.owner] * n
            rows += range(at, at + n)
            self.stats.spec_drafted += c.drafts
            self.stats.spec_accepted += n - 1
            adapt(c.owner, c.drafts, n - 1)
            if c.owner.params.prediction:
                c.owner.predicted[0] += n - 1
                c.owner.predicted[1] += c.drafts - (n - 1)
            self.metrics.spec_drafted.inc(c.drafts)
            self.metrics.spec_accepted.inc(n - 1)
            at += len(c.tokens)
        self.stats.spec_rows += len(call.chunks)
        self.metrics.spec_rows.inc(len(call.chunks))
        self.metrics.spec_length.set((self.stats.spec_accepted + self.stats.spec_rows) / self.stats.spec_rows)
        self.on_tokens(seqs, sampled.take(rows))
        for c in call.chunks:
            seq = c.owner
            if self.table.running.get(seq.slot) is seq:
                seq.prefilled = seq.target
                self.table.blocks.trim(seq.slot, seq.prefilled + 1)

    def prompt_done(self, seq: Sequence) -> None:
        """Account a prompt whose last chunk was prefilled."""
        self.stats.prompt_tokens += len(seq.seq) - seq.cached
        self.stats.cached_tokens += seq.cached
        self.metrics.prompt_tokens.inc(len(seq.seq) - seq.cached)
        self.metrics.cached_tokens.inc(seq.cached)

    def prompt_scores(self, chunks, scores: Sampled) -> None:
        """Keep the scored chunks' rows of a prefill call: the logprob of each prompt token
        after the chunk's first position, given the tokens before it."""
        lps, top_ids, top_lps = scores.logprobs, scores.top_ids, scores.top_logprobs
        at = 0
        for c in chunks:
            seq, k = c.owner, len(c.tokens)
            if c.score:
                n = seq.params.prompt_logprobs
                scores = seq.prompt_logprobs if seq.prompt_logprobs is not None else []
                # Position i scores the token after it; the prompt's last position has none.
                for i in range(min(k, len(seq.seq) - 1 - c.start)):
                    top = [(int(a), float(b)) for a, b in zip(top_ids[at + i][:n], top_lps[at + i][:n])]
                    nxt = c.tokens[i + 1] if i + 1 < k else c.next_token
                    scores.append(TokenLogprob(nxt, float(lps[at + i]), top))
                seq.prompt_logprobs = scores
            at += k

    def pool(self, chunks, hidden: np.ndarray) -> None:
        """Pool the embedding chunks' rows of a prefill call's final hidden states (T, D) into
        their sequences' embeddings: the sum of every position (mean), the last position's
        row (last) or the first's (cls)."""
        at = 0
        for c in chunks:
            seq, k = c.owner, len(c.tokens)
            if c.embed:
                rows = hidden[at:at + k].astype(np.float64)
                how = seq.params.embed
                if how == "mean":
                    seq.pooled = rows.sum(axis=0) + (0 if seq.pooled is None else seq.pooled)
                elif how == "last" and c.last:
                    seq.pooled = rows[-1]
                elif how == "cls" and c.start == 0:
                    seq.pooled = rows[0]
            at += k

    def on_tokens(self, seqs, sampled: Sampled) -> None:
        """One sampled token for each of ``seqs`` (the rows of ``sampled``)."""
        batched: dict = {}  # event loop -> [(queue, Output)]: one wake-up per loop
        try:
            self._handle(seqs, sampled, batched)
        finally:
            for loop, items in batched.items():
                deliver(loop, items)

    def _handle(self, seqs, sampled: Sampled, batched: dict) -> None:
        toks, lps, top_ids, top_lps = sampled.tokens, sampled.logprobs, sampled.top_ids, sampled.top_logprobs
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if self.table.running.get(seq.slot) is not seq:  # finished or aborted meanwhile
                continue
            if seq.max_tokens == 0:  # the prompt was only scored
                self.finish(seq, "length")
                continue
            tok = int(toks[i])
            first = seq.first_token_time is None
            if first:
                seq.first_token_time = now
                self.metrics.ttft.observe(now - seq.req.arrival)
            seq.generated.append(tok)
            self.stats.generation_tokens += 1
            self.metrics.generation_tokens.inc()
            p = seq.params
            finish = None
            is_eos = tok in self.tokenizer.eos_ids and not p.ignore_eos
            if is_eos or tok in p.stop_token_ids:
                finish = "stop"
                text = ""
            else:
                text = seq.detok.add(tok)
                if seq.matcher is not None:
                    finish = self._advance(seq, tok)
                    if finish is not None:
                        text += seq.detok.flush()
            if finish is None and (len(seq.generated) >= seq.max_tokens or seq.length >= self.session_len):
                finish = "length"
                text += seq.detok.flush()
            lp = None
            if p.logprobs is not None:
                # Alternatives a grammar forbids (logprob -inf) are not alternatives.
                top = [] if top_ids is None else [(int(a), float(b)) for a, b in
                                                  zip(top_ids[i][:p.logprobs], top_lps[i][:p.logprobs])
                                                  if b > -np.inf]
                lp = TokenLogprob(tok, float(lps[i]), top)
            text, stopped = apply_stop_strings(seq, text, final=finish is not None)
            if stopped:
                finish = "stop"
            # The first token's Output says how much of the prompt came from the cache (a stream
            # reports it before the answer: Anthropic's message_start).
            out = Output(text=text, token_ids=[tok], logprobs=[lp] if lp else [], finish_reason=finish,
                         prompt_logprobs=seq.prompt_logprobs, stop_string=seq.stop_hit if stopped else None,
                         cached_tokens=seq.cached if first else 0)
            seq.prompt_logprobs = None
            if finish:
                self.finish(seq, finish, out, batched)
            elif isinstance(seq.req.emit, LoopQueue):
                batched.setdefault(seq.req.emit.loop, []).append((seq.req.emit.queue, out))
            else:
                seq.req.emit(out)

    def _advance(self, seq: Sequence, tok: int) -> str | None:
        """Move a constrained sequence's matcher past ``tok``; "stop" when the grammar is
        complete (only EOS could follow), "error" if the token broke it (the mask forbids that)."""
        if seq.grammar_wait is not None:  # the grammar starts after this text (reasoning's end)
            seq.raw_tail = (seq.raw_tail + self.tokenizer.decode([tok], skip_special_tokens=False))[-64:]
            if seq.grammar_wait in seq.raw_tail:
                seq.grammar_wait = None
            return None
        if not seq.matcher.consume_token(tok):
            log.error("request %s: token %d broke its grammar: %s", seq.id, tok, seq.matcher.get_error())
            return "error"
        return "stop" if seq.matcher.is_stopped() else None

    def fail_running(self) -> None:
        """A step failed: end every running sequence with "error" and forget every KV the plans
        counted (the step may not have written it)."""
        for seq in list(self.table.running.values()):
            try:
                self.finish(seq, "error")
            except Exception:  # a caller's emit raised: drop the sequence all the same
                log.exception("could not report the failure of %s", seq.id)
                self.table.running.pop(seq.slot, None)
            self.table.forget(seq.slot)

    def finish(self, seq: Sequence, reason: str, out: Output | None = None, batched: dict | None = None) -> None:
        """End ``seq`` with ``reason`` (``out``: its last token's Output). ``batched``: the
        step's outputs waiting for one wake-up per event loop; the finish joins them, after
        the sequence's earlier tokens of the same step (a verify call gives several)."""
        out = out or Output(prompt_logprobs=seq.prompt_logprobs)
        seq.prompt_logprobs = None
        out.finish_reason = reason
        out.prompt_tokens = len(seq.seq)
        out.completion_tokens = len(seq.generated)
        out.cached_tokens = seq.cached
        out.history_tokens = seq.history
        out.weight_version = seq.weight_version
        if seq.params.prediction:
            out.prediction_tokens = tuple(seq.predicted)
        if seq.params.embed is not None and seq.pooled is not None:
            mean = seq.params.embed == "mean"
            out.embedding = (seq.pooled / len(seq.seq) if mean else seq.pooled).astype(np.float32)
        self.table.release(seq, keep_session=reason in ("stop", "length") or bool(seq.generated))
        self.stats.finished += 1
        now = time.monotonic()
        self.metrics.finished.labels(reason).inc()
        self.metrics.e2e.observe(now - seq.req.arrival)
        if seq.first_token_time is not None and len(seq.generated) > 1:
            self.metrics.tpot.observe((now - seq.first_token_time) / (len(seq.generated) - 1))
        if batched is not None and isinstance(seq.req.emit, LoopQueue):
            batched.setdefault(seq.req.emit.loop, []).append((seq.req.emit.queue, out))
        else:
            seq.req.emit(out)
