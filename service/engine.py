"""The engine: one thread owns the device state and runs continuous batching over
``max_batch_size`` decode slots; asyncio callers talk to it through queues.

Each loop iteration: take new requests and aborts from the inbox, admit waiting requests into
free slots, prefill one chunk (so a long prompt never stalls the running batch for long), then
run one decode step for every running slot. Finished or aborted requests free their slot at once.

Prefix reuse works at slot granularity: a free slot keeps the KV of the last sequence it held.
A new request is placed in the free slot sharing the longest prefix with its prompt and skips
prefilling that prefix (reported as ``cached_tokens``); otherwise the least recently used free
slot is taken. Interactive sessions keep their token history on the host and prefer their old
slot, so a turn whose slot was not reused prefills only its new tokens.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import numpy as np

from model.tokenizer import IncrementalDetokenizer, Tokenizer
from service.errors import ContextLengthExceeded, InvalidRequest, Overloaded, ServiceError
from service.metrics import EngineMetrics
from service.runner import ModelRunner
from service.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Output:
    """One increment of a request's result."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    history_tokens: int = 0


class LoopQueue:
    """An emit callback that hands Outputs to an asyncio queue on its event loop. The engine
    batches them: a step's outputs for one loop cross threads in one wake-up, not one per
    token (each wake-up is a syscall and a switch to the loop's thread: 16 per step cost
    more host time than the step's own Python work)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def __call__(self, out: "Output") -> None:
        deliver(self.loop, [(self.queue, out)])


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)


def deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Put (queue, Output) pairs on their queues from another thread, in one wake-up."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the caller's loop has closed; its abort is on the way
        pass


@dataclasses.dataclass
class Request:
    id: str
    prompt_ids: list[int]  # the new tokens (for a session turn: this turn only)
    params: SamplingParams
    emit: Callable[[Output], None]
    session_id: int | None = None
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    # engine-thread state
    seq: list[int] = dataclasses.field(default_factory=list)  # full sequence in the slot
    slot: int = -1
    prefilled: int = 0  # tokens of seq already in the cache
    cached: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    max_tokens: int = 0
    detok: IncrementalDetokenizer | None = None
    pending_text: str = ""
    history: int = 0
    first_token_time: float | None = None


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


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_queue: int = 256):
        self.runner = runner
        self.tokenizer = tokenizer
        self.session_len = runner.session_len
        self.max_queue = max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._slot_tokens: list[list[int]] = [[] for _ in range(runner.slots)]  # KV kept per slot
        self._slot_used: list[float] = [0.0] * runner.slots
        self._sessions: dict[int, tuple[list[int], int]] = {}  # id -> (history tokens, slot)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self._inflight = None  # (requests, DecodeHandle) of the decode step on the device
        self._rode = False  # this iteration's decode rows rode along a prefill call
        self.stats = Stats()
        self.metrics = EngineMetrics()
        self._count_lock = threading.Lock()
        self.waiting_count = 0  # submitted, not yet in a slot (guarded by _count_lock)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="xlaserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)
        self.runner.stop_followers()

    @property
    def running_count(self) -> int:
        return len(self._running)

    def is_alive(self, stall_seconds: float = 120.0) -> bool:
        busy = bool(self._running or self._waiting)
        return bool(self._thread and self._thread.is_alive()) and not (
            busy and time.monotonic() - self.heartbeat > stall_seconds)

    # -- client API (any thread / asyncio) -----------------------------------------------------

    def check_prompt(self, n_prompt: int, params: SamplingParams, history: int = 0) -> None:
        total = history + n_prompt
        if total >= self.session_len:
            raise ContextLengthExceeded(total, self.session_len)
        if params.max_tokens is not None and total + params.max_tokens > self.session_len:
            raise ContextLengthExceeded(total, self.session_len, params.max_tokens)

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Output], None],
               session_id: int | None = None, request_id: str | None = None) -> str:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if session_id is None:
            self.check_prompt(len(prompt_ids), params)
        with self._count_lock:
            if self.waiting_count >= self.max_queue:
                raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting); retry later")
            self.waiting_count += 1
        rid = request_id or f"req-{next(self._ids)}"
        self._inbox.put(("add", Request(rid, list(prompt_ids), params, emit, session_id)))
        return rid

    def check_capacity(self, n: int = 1) -> None:
        """Raise Overloaded now if ``n`` more requests would not fit the queue (so a stream can
        be refused with a status code before it starts)."""
        if self.waiting_count + n > self.max_queue:
            raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting); retry later")

    def snapshot(self) -> dict[str, float]:
        """Counts for /metrics (read without locking: each value is a plain read)."""
        running = list(self._running.values())
        kv = sum(min(r.prefilled + len(r.generated), self.session_len) for r in running)
        return dict(running=len(running), waiting=self.waiting_count, kv_tokens=kv,
                    kv_capacity=self.runner.slots * self.session_len,
                    prompt_tokens=self.stats.prompt_tokens, cached_tokens=self.stats.cached_tokens)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def end_session(self, session_id: int) -> None:
        self._inbox.put(("end_session", session_id))

    def abort_session(self, session_id: int) -> None:
        self._inbox.put(("abort_session", session_id))

    def session_history(self, session_id: int) -> list[int]:
        entry = self._sessions.get(session_id)
        return list(entry[0]) if entry else []

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       session_id: int | None = None) -> AsyncIterator[Output]:
        """Submit and stream Outputs; closing the iterator early aborts the request."""
        q: asyncio.Queue[Output] = asyncio.Queue()
        rid = self.submit(prompt_ids, params, LoopQueue(asyncio.get_running_loop(), q), session_id=session_id)
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finish_reason is not None
                if out.finish_reason == "error":  # the details are in the server log
                    raise ServiceError("the engine failed while generating this request")
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    # -- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                idle = not (self._running or self._waiting or self._inflight)
                self._drain_inbox(block=idle)
                self._admit()
                self._prefill_step()
                self._decode_step()
                self.heartbeat = time.monotonic()
            except Exception:  # keep serving: fail the requests in flight, not the process
                log.exception("engine step failed; failing the requests in flight")
                self._inflight = None
                for req in list(self._running.values()):
                    try:
                        self._finish(req, "error")
                    except Exception:
                        log.exception("could not report the failure of %s", req.id)
                        self._running.pop(req.slot, None)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, arg = item
            if kind == "add":
                self._waiting.append(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "abort_session":
                for req in [*self._waiting, *self._running.values()]:
                    if req.session_id == arg:
                        self._abort(req.id)
            elif kind == "end_session":
                entry = self._sessions.pop(arg, None)
                if entry:
                    self._slot_used[entry[1]] = 0.0  # first to be reused
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    def _abort(self, rid: str) -> None:
        for req in self._waiting:
            if req.id == rid:
                self._waiting.remove(req)
                with self._count_lock:
                    self.waiting_count -= 1
                self.metrics.finished.labels("abort").inc()
                req.emit(Output(finish_reason="abort", prompt_tokens=len(req.seq or req.prompt_ids)))
                return
        for req in self._running.values():
            if req.id == rid:
                self._finish(req, "abort")
                return

    def _choose_slot(self, req: Request) -> tuple[int, int]:
        """(slot, reusable prefix length) among free slots."""
        free = [s for s in range(self.runner.slots) if s not in self._running]
        session_slots = {slot for _, slot in self._sessions.values()}
        best, best_len = -1, 0
        for s in free:
            n = _common_prefix(self._slot_tokens[s], req.seq)
            if n > best_len:
                best, best_len = s, n
        if best < 0 or best_len == 0:
            # least recently used; other sessions' slots last
            best = min(free, key=lambda s: (s in session_slots, self._slot_used[s]))
            best_len = 0
        # At least the last prompt token is recomputed: its logits pick the first new token.
        return best, min(best_len, len(req.seq) - 1)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.runner.slots:
            req = self._waiting.popleft()
            with self._count_lock:
                self.waiting_count -= 1
            history: list[int] = []
            if req.session_id is not None and req.session_id in self._sessions:
                history = self._sessions[req.session_id][0]
            req.history = len(history)
            req.seq = history + req.prompt_ids
            try:
                self.check_prompt(len(req.prompt_ids), req.params, len(history))
            except ContextLengthExceeded:
                # A full session ends with "length" and no text, as LMDeploy does.
                req.emit(Output(finish_reason="length", prompt_tokens=len(req.prompt_ids),
                                history_tokens=len(history)))
                continue
            slot, reuse = self._choose_slot(req)
            req.slot, req.prefilled, req.cached = slot, reuse, reuse
            req.max_tokens = self.session_len - len(req.seq)
            if req.params.max_tokens is not None:
                req.max_tokens = min(req.max_tokens, req.params.max_tokens)
            req.detok = IncrementalDetokenizer(self.tokenizer, req.params.skip_special_tokens,
                                               context=req.seq)
            seed = req.params.seed if req.params.seed is not None else int(np.random.randint(2**31))
            try:
                self.runner.set_slot(slot, req.params, req.seq, seed)
            except Exception:  # this request's settings cannot be run: fail it alone
                log.exception("request %s could not start", req.id)
                self.metrics.finished.labels("error").inc()
                req.emit(Output(finish_reason="error", prompt_tokens=len(req.seq)))
                continue
            self._slot_tokens[slot] = req.seq[:reuse]
            self._running[slot] = req

    def _prefill_step(self) -> None:
        """Prefill prompt chunks, earliest-admitted request first, up to one chunk's worth of
        tokens (``max_prefill_chunk``) per engine iteration. Several short prompts that arrive
        together are all prefilled before the next decode step instead of one per step, so
        the running batch reaches its full width sooner; a long prompt still takes one chunk
        per iteration and never stalls decoding for longer than that. After the first chunk
        of an iteration, a prompt is taken only if all of it fits what is left, so no prompt
        is cut into a small tail that costs a whole step of its own.

        The chunks go to the device packed, several prompts per call where the runner can
        (``prompts_per_call``): one pass over the weights for all of them, and one wait. The
        running requests' decode rows ride along in the iteration's first call, one token
        each, in place of that iteration's decode step: they advance at no extra pass over
        the weights while prompts are prefilled."""
        self._rode = False
        budget, first = self.runner.max_chunk, True
        while budget > 0:
            want = len(self._decodable()) if first else 0
            pack = self._next_pack(budget, first, want)
            if not pack:
                return
            used = sum(len(chunk) for _, chunk, _ in pack)
            riders: list[Request] = []
            # Rows ride only in room the prompts leave: they never push a prompt out (a
            # prompt longer than the budget leaves them room in its first chunk).
            if want and used + want <= budget and len(pack) + want <= self.runner.prompts_per_call(used + want):
                riders = self._riders()
            first = False
            budget -= used + len(riders)
            self._run_pack(pack, riders)

    def _riders(self) -> list[Request]:
        """The decodable requests, once the decode step in flight (if any) has been read: its
        tokens are their next inputs."""
        if self._inflight is not None:
            prev, handle = self._inflight
            self._inflight = None
            self._on_tokens(prev, *self.runner.fetch(handle))
        return [r for r in self._decodable() if len(r.seq) + len(r.generated) < self.session_len]

    def _next_pack(self, budget: int, first: bool, reserve: int = 0) -> list[tuple[Request, list[int], bool]]:
        """The prompt chunks of the next prefill call: (request, tokens, whether they end the
        prompt). A first chunk cut from a prompt longer than the budget leaves ``reserve``
        tokens of it for decode rows to ride in."""
        pending = sorted((r for r in self._running.values() if r.prefilled < len(r.seq)),
                         key=lambda r: r.arrival)
        pack: list[tuple[Request, list[int], bool]] = []
        total = 0
        for req in pending:
            self._share_prefix(req)
            # A prompt that shares a prefix with one in this call waits for the next call,
            # which copies that prefix's KV instead of computing it twice.
            limit = len(req.seq) - 1
            if any(min(_common_prefix(other.seq[:other.prefilled + len(chunk)], req.seq), limit)
                   > req.prefilled for other, chunk, _ in pack):
                break
            remaining = len(req.seq) - req.prefilled
            if (pack or not first) and remaining > budget - total:
                break
            n = min(remaining, budget - total)
            if first and not pack and remaining > budget and budget > 2 * reserve:
                n = budget - reserve
            if len(pack) + 1 > self.runner.prompts_per_call(total + n):
                break
            pack.append((req, req.seq[req.prefilled:req.prefilled + n], req.prefilled + n == len(req.seq)))
            total += n
        return pack

    def _run_pack(self, pack: list[tuple[Request, list[int], bool]], riders: list[Request]) -> None:
        self.stats.prefill_calls += 1
        chunks = [(req.slot, chunk, req.prefilled, last) for req, chunk, last in pack]
        if riders:
            self._rode = True
            self.stats.mixed_calls += 1
            chunks += [(r.slot, [r.generated[-1]], len(r.seq) + len(r.generated) - 1, True, len(r.generated))
                       for r in riders]
        token, lp, top_ids, top_lp = self.runner.prefill_packed(chunks)
        done = []
        for i, (req, chunk, last) in enumerate(pack):
            req.prefilled += len(chunk)
            self._slot_tokens[req.slot] = req.seq[:req.prefilled]
            if last:
                done.append(i)
                self.stats.prompt_tokens += len(req.seq) - req.cached
                self.stats.cached_tokens += req.cached
                self.metrics.prompt_tokens.inc(len(req.seq) - req.cached)
                self.metrics.cached_tokens.inc(req.cached)
        done += range(len(pack), len(pack) + len(riders))
        if done:
            pick = lambda x: None if x is None else np.asarray(x)[done]  # noqa: E731
            self._on_tokens([pack[i][0] for i in done[:len(done) - len(riders)]] + riders,
                            pick(token), pick(lp), pick(top_ids), pick(top_lp))

    def _share_prefix(self, req: Request) -> None:
        """If another running request's slot already holds KV for a longer prefix of this
        prompt (n > 1 samples of one prompt, a shared system prompt), copy that KV instead of
        computing it again. The last prompt token is always computed: its logits pick the
        first new token with this request's own sampling settings."""
        limit = len(req.seq) - 1
        best_slot, best = -1, req.prefilled
        for other in self._running.values():
            if other is not req:
                n = min(_common_prefix(self._slot_tokens[other.slot], req.seq), limit)
                if n > best:
                    best_slot, best = other.slot, n
        if best_slot >= 0:
            self.runner.copy_slot(best_slot, req.slot)
            req.cached += best - req.prefilled
            req.prefilled = best
            self._slot_tokens[req.slot] = req.seq[:best]

    def _decodable(self) -> list[Request]:
        return [r for r in self._running.values() if r.prefilled == len(r.seq) and r.generated]

    def _decode_step(self) -> None:
        """Keep one decode step in flight. When the batch is unchanged since the step in
        flight, queue the next step first, fed on the device by that step's own tokens, then
        read and handle the tokens of the step in flight while the device works on the next:
        the host's per-token work (detokenizing, stops, streaming) hides behind the device.
        A request that finishes meanwhile costs the one queued step a wasted row, nothing else."""
        if self._rode:  # this iteration's decode rows rode along a prefill call
            return
        live = self._decodable()
        if self._inflight is not None:
            prev, handle = self._inflight
            self._inflight = None
            chained = None
            positions = [len(r.seq) + len(r.generated) for r in live]
            same = len(live) == len(prev) and all(a is b for a, b in zip(live, prev))
            if same and max(positions) < self.session_len and self.runner.channel is None:
                chained = self.runner.dispatch_decode([r.slot for r in live], handle, positions,
                                                      [len(r.generated) + 1 for r in live])
            self._on_tokens(prev, *self.runner.fetch(handle))
            if chained is not None:
                self.stats.decode_steps += 1
                self.stats.chained_steps += 1
                self._inflight = (prev, chained)
                return
            live = self._decodable()
        if live:
            handle = self.runner.dispatch_decode(
                [r.slot for r in live], [r.generated[-1] for r in live],
                [len(r.seq) + len(r.generated) - 1 for r in live], [len(r.generated) for r in live])
            self.stats.decode_steps += 1
            self._inflight = (live, handle)

    def _on_tokens(self, reqs, toks, lps, top_ids, top_lps) -> None:
        batched: dict = {}  # event loop -> [(queue, Output)]: one wake-up per loop
        try:
            self._handle_tokens(reqs, toks, lps, top_ids, top_lps, batched)
        finally:
            for loop, items in batched.items():
                deliver(loop, items)

    def _handle_tokens(self, reqs, toks, lps, top_ids, top_lps, batched: dict) -> None:
        now = time.monotonic()
        for i, req in enumerate(reqs):
            if self._running.get(req.slot) is not req:  # finished or aborted meanwhile
                continue
            tok = int(toks[i])
            if req.first_token_time is None:
                req.first_token_time = now
                self.metrics.ttft.observe(now - req.arrival)
            req.generated.append(tok)
            self.stats.generation_tokens += 1
            self.metrics.generation_tokens.inc()
            p = req.params
            finish = None
            is_eos = tok in self.tokenizer.eos_ids and not p.ignore_eos
            if is_eos or tok in p.stop_token_ids:
                finish = "stop"
                text = ""
            else:
                text = req.detok.add(tok)
            if finish is None and (len(req.generated) >= req.max_tokens
                                   or len(req.seq) + len(req.generated) >= self.session_len):
                finish = "length"
                text += req.detok.flush()
            lp = None
            if p.logprobs is not None:
                top = [] if top_ids is None else [(int(a), float(b)) for a, b in
                                                  zip(top_ids[i][:p.logprobs], top_lps[i][:p.logprobs])]
                lp = TokenLogprob(tok, float(lps[i]), top)
            text, stopped = self._apply_stop_strings(req, text, final=finish is not None)
            if stopped:
                finish = "stop"
            out = Output(text=text, token_ids=[tok], logprobs=[lp] if lp else [],
                         finish_reason=finish)
            if finish:
                self._finish(req, finish, out)
            elif isinstance(req.emit, LoopQueue):
                batched.setdefault(req.emit.loop, []).append((req.emit.queue, out))
            else:
                req.emit(out)

    def _apply_stop_strings(self, req: Request, text: str, final: bool) -> tuple[str, bool]:
        """Match stop strings on decoded text; hold back a possible partial match."""
        stops = req.params.stop
        if not stops:
            return text, False
        buf = req.pending_text + text
        hit = min(((buf.find(s), s) for s in stops if s in buf), default=None)
        if hit is not None:
            idx, s = hit
            req.pending_text = ""
            return buf[:idx + (len(s) if req.params.include_stop_str_in_output else 0)], True
        if final:
            req.pending_text = ""
            return buf, False
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        req.pending_text = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def _finish(self, req: Request, reason: str, out: Output | None = None) -> None:
        out = out or Output()
        out.finish_reason = reason
        out.prompt_tokens = len(req.seq)
        out.completion_tokens = len(req.generated)
        out.cached_tokens = req.cached
        out.history_tokens = req.history
        self._running.pop(req.slot, None)
        # The slot keeps the KV of everything written to it: the last sampled token never was.
        written = req.prefilled + max(len(req.generated) - 1, 0)
        self._slot_tokens[req.slot] = (req.seq + req.generated)[:written]
        self._slot_used[req.slot] = time.monotonic()
        if req.session_id is not None:
            if reason in ("stop", "length") or req.generated:
                self._sessions[req.session_id] = (req.seq + req.generated, req.slot)
        self.stats.finished += 1
        now = time.monotonic()
        self.metrics.finished.labels(reason).inc()
        self.metrics.e2e.observe(now - req.arrival)
        if req.first_token_time is not None and len(req.generated) > 1:
            self.metrics.tpot.observe((now - req.first_token_time) / (len(req.generated) - 1))
        req.emit(out)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
