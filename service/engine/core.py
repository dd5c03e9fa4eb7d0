"""The engine: one thread owns the device state and runs continuous batching over
``max_batch_size`` decode slots and a paged KV cache; asyncio callers talk to it through queues.

Each iteration: take new requests and aborts from the inbox, admit waiting requests into free
slots (``SlotTable``, which gives them their cached prefix's blocks), read the decode step in
flight unless the next step can be queued on it, plan the step (``Scheduler``: blocks, chunks,
preemption), execute the plan (``ModelRunner.execute``), then process the outputs
(``OutputProcessor``). Finished or aborted requests free their slot and blocks at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

import numpy as np

from model.backends import trim_freed_memory
from model.tokenizer import IncrementalDetokenizer, Tokenizer
from service.engine.adapters import AdapterRegistry
from service.engine.blocks import BlockManager
from service.engine.images import EncoderCache
from service.engine.images import place as place_images
from service.engine.bridge import stream
from service.engine.output import OutputProcessor, Stats
from service.engine.request import Output, Request, Sequence
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler
from service.engine.slots import SlotTable
from service.engine.speculate import Speculation
from service.engine.waiting import WaitingQueue
from service.engine.limits import Limits
from service.errors import ContextLengthExceeded, Draining, EngineFailed, InvalidRequest, ModelNotFound, Sleeping
from service.metrics import EngineMetrics, snapshot
from service.params import SamplingParams
from service.structured import Grammars

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_queue: int = 256,
                 speculation: Speculation | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.session_len = runner.session_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, runner.slots, runner.max_blocks,
                                   runner.replicas, runner.window, runner.window_blocks)
        # The longest sequence: a session, or all of one replica's pool where that is less.
        self.max_length = min(runner.session_len, self.blocks.capacity)
        self.limits = Limits(runner.session_len, self.max_length, runner.cfg.vocab_size)
        self.table = SlotTable(runner.slots, self.blocks)
        # Off (no method), only requests that send a prediction speculate.
        self.speculation = speculation or Speculation.off()
        self.scheduler = Scheduler(self.table, runner.max_chunk, self.max_length, runner.shapes.prompts_per_call,
                                   can_chain=runner.channel is None, speculation=self.speculation)
        if self.speculation.on:
            log.info(self.speculation.describe())
        self.stats = Stats()
        self.metrics = EngineMetrics()
        self.grammars = Grammars(tokenizer, runner.cfg.vocab_size)
        self.outputs = OutputProcessor(tokenizer, self.table, self.max_length, self.metrics, self.stats)
        self.waiting = WaitingQueue(max_queue)  # submitted, not yet in a slot
        self._inbox, self._ids, self._stop = queue.Queue(), itertools.count(), threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self._inflight = None  # (sequences, DecodeHandle) of the decode step on the device
        self.draining = False  # shutting down: admit nothing new, let what runs finish
        self.failed: str | None = None  # why the engine stopped serving, once it has
        # The LoRA adapters served by name (None: the runner has no adapter slots).
        self.adapters = AdapterRegistry(runner.adapters, runner.resident) if runner.adapters is not None else None
        self.encoder_cache = EncoderCache()  # the vision tower's outputs by image (a vision-language model)
        self.image_processor = None  # Pillow image -> the tower's pixels (model.vision.Preprocessor; build_engine)
        # Training loops (``pause``, ``sleep``, ``update_weights``): while paused or asleep nothing
        # is admitted; the weights change only while no sequence runs, so every request's tokens
        # come from one ``weight_version``.
        self.paused = False
        self.sleep_level = 0  # 0 awake; 1 or 2 as ``sleep`` was asked (until ``wake_up`` restores all)
        self.weight_version = "0"
        self._updates = 0
        self.checkpoint = None  # the served checkpoint's directory: where weights reload from after level 2
        self._control = threading.Lock()  # one pause, sleep, wake or update at a time

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
    def running_count(self) -> int:  # sequences in slots
        return len(self.table.running)

    @property
    def busy(self) -> bool:  # requests submitted and not finished (the count covers the inbox too)
        return bool(self.table.running or self.waiting.count)

    def drain(self, timeout: float) -> bool:
        """Stop admitting (new requests get ``Draining``), wait up to ``timeout`` seconds for
        the submitted ones to finish, then abort what is left (``finish_reason: "abort"``).
        Returns whether everything finished in time."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline and self._thread_alive():
            time.sleep(0.02)
        if not self.busy:
            return True
        self._inbox.put(("abort_all", None))
        deadline = time.monotonic() + 10
        while self.busy and time.monotonic() < deadline and self._thread_alive():
            time.sleep(0.02)
        return False

    def _thread_alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def is_alive(self, stall_seconds: float = 120.0) -> bool:
        """The engine thread runs, and made progress within ``stall_seconds`` when it has work
        (submitted requests it has not taken in yet count)."""
        return (self.failed is None and self._thread_alive()
                and not (self.busy and time.monotonic() - self.heartbeat > stall_seconds))

    # -- client API (any thread / asyncio) -----------------------------------------------------

    def _check_serving(self) -> None:
        if self.failed is not None:
            raise EngineFailed(self.failed + "; restart the server")
        if self.draining:
            raise Draining("the server is shutting down; send the request to another replica")
        if self.sleep_level:
            raise Sleeping("the server is asleep (POST /sleep) and serves no requests until POST /wakeup")

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Output], None],
               session_id: int | None = None, request_id: str | None = None, images: list = ()) -> str:
        """Queue a request (``request_id``: its id, else the engine's own; ``images``: its
        prompt's, ``service.engine.images.Image``s in order); returns its id."""
        self._check_serving()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        placed = self.place_images(prompt_ids, images, session_id)
        self.limits.token_ids(prompt_ids, params)
        if session_id is None:
            self.limits.prompt(len(prompt_ids), params)
        elif params.adapter is None and (kept := self.table.session_adapter(session_id)) is not None:
            params = dataclasses.replace(params, adapter=kept)  # a session keeps its adapter
        adapter, root = self.adapter_of(params)
        self.waiting.reserve()
        rid = request_id or f"req-{next(self._ids)}"
        self._inbox.put(("add", Request(rid, list(prompt_ids), params, emit, session_id, adapter=adapter, root=root,
                                        images=placed)))
        if params.adapter is not None:
            self.metrics.adapter_requests.labels(params.adapter).inc()
        return rid

    def adapter_of(self, params: SamplingParams) -> tuple[int, bytes]:
        """The adapter slot and identity a request's ``adapter`` names ((-1, b"") for none);
        ModelNotFound when no adapter of that name is loaded."""
        if params.adapter is None:
            return -1, b""
        if self.adapters is None:
            raise ModelNotFound(f"The model '{params.adapter}' does not exist")
        return self.adapters.resolve(params.adapter)

    def on_engine_thread(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps; its result (or error) in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def load_adapter(self, adapter) -> concurrent.futures.Future:
        """Put a read adapter (``model.lora.Adapter``) into a free adapter slot, between steps."""
        def install():
            busy = {s.req.adapter for s in self.table.running.values()} | {r.adapter for r in self.waiting}
            return self.adapters.install(adapter, busy, self.runner.load_adapter)
        return self.on_engine_thread(install)

    def place_images(self, prompt_ids, images, session_id: int | None = None) -> tuple:
        """The images placed at the prompt's image tokens (``images.place``); refused where
        the model takes no images, in a session, or where they do not match the prompt."""
        vision = self.runner.vision
        if images and vision is None:
            raise InvalidRequest("this model takes no images (text only)", param="messages")
        if images and session_id is not None:
            raise InvalidRequest("images are not supported in interactive sessions", param="messages")
        if vision is None:
            return ()
        vc = vision[0]
        # Without images the prompt's own tokens are at fault (image tokens typed or sent as ids).
        return place_images(prompt_ids, list(images), vc.image_token_id, vc.tokens_per_image,
                            "messages" if images else "prompt")

    def check_submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, images: list = ()) -> None:
        """Every check a request's prompts (``n`` generations each) must pass before any is
        submitted, so a bad one is refused with its status before anything streams: token ids
        in the vocabulary, images where the prompt places them, lengths within the session and
        the pool, room in the queue."""
        self.adapter_of(params)
        for ids in prompts:
            self.place_images(ids, images)
            self.limits.token_ids(ids, params)
            self.limits.prompt(len(ids), params)
        self.check_capacity(len(prompts) * n)

    def check_capacity(self, n: int = 1) -> None:
        """Raise Overloaded now if ``n`` more requests would not fit the queue (so a stream can
        be refused with a status code before it starts)."""
        self._check_serving()
        self.waiting.check(n)

    def snapshot(self) -> dict[str, float]:
        return snapshot(self)

    def abort(self, request_id: str) -> None:
        """Abort a request by its id, with the generations of it (ids ``request_id/k``)."""
        self._inbox.put(("abort", request_id))

    def abort_request(self, request_id: str | None) -> concurrent.futures.Future:
        """``abort`` (None: every submitted request), between steps; the future has how many
        requests ended."""
        kind = "abort" if request_id is not None else "abort_all"
        return self.on_engine_thread(lambda: self._abort_matching(kind, request_id))

    def _abort_matching(self, kind: str, arg) -> int:
        """Engine thread: abort the waiting and running requests ``_picker`` picks; how many."""
        pick = self._picker(kind, arg)
        rids = self.waiting.ids(pick) + [s.id for s in self.table.running.values() if pick(s.req)]
        for rid in rids:
            self._abort(rid)
        return len(rids)

    @staticmethod
    def _picker(kind: str, arg) -> Callable[[Request], bool]:
        if kind == "abort":  # a request, and the generations fanned out of it
            return lambda r: r.id == arg or r.id.startswith(arg + "/")
        if kind == "abort_session":
            return lambda r: r.session_id == arg
        return lambda r: True

    def end_session(self, session_id: int) -> None:
        self._inbox.put(("end_session", session_id))

    def abort_session(self, session_id: int) -> None:
        self._inbox.put(("abort_session", session_id))

    def session_history(self, session_id: int) -> list[int]:
        return self.table.history(session_id)

    def generate(self, prompt_ids: list[int], params: SamplingParams, session_id: int | None = None,
                 request_id: str | None = None, images: list = ()) -> AsyncIterator[Output]:
        """Submit and stream Outputs on the caller's event loop; closing the iterator early
        aborts the request."""
        return stream(self, prompt_ids, params, session_id, request_id, images)

    # -- training loops: pause, sleep, new weights (any thread but the engine's; they block) ----

    def pause(self, mode: str = "wait", timeout: float | None = None) -> int:
        """Stop admitting: requests submitted from now on wait in the queue (none is refused or
        lost), and those running finish (``mode`` "wait"; past ``timeout`` seconds the rest are
        aborted) or are aborted now ("abort": ``finish_reason`` "abort"). Returns how many were
        aborted. ``resume`` admits again."""
        if mode not in ("wait", "abort"):
            raise InvalidRequest(f"mode must be 'wait' or 'abort', got {mode!r}", param="mode")
        with self._control:
            self.paused = True
            return self._quiesce(mode, timeout)

    def resume(self) -> None:
        self.paused = False
        self.on_engine_thread(lambda: None)  # wake the thread: the waiting are admitted now

    def _quiesce(self, mode: str, timeout: float | None) -> int:
        """Wait (admission stopped) until no sequence runs, aborting them as ``pause`` says."""
        aborted = 0
        if mode == "abort" and self.table.running:
            aborted = len(self.table.running)
            self._inbox.put(("abort_running", None))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread_alive():
            # Asked on the engine thread too: a request it was placing when admission stopped
            # is running by the time it answers, and nothing is admitted after.
            if not self.table.running and not self._ask(lambda: bool(self.table.running)):
                break
            if deadline is not None and time.monotonic() > deadline:
                aborted += len(self.table.running)
                self._inbox.put(("abort_running", None))
                deadline = None
            time.sleep(0.01)
        return aborted

    def _ask(self, fn: Callable[[], Any]) -> Any:
        """``fn``'s answer from the engine thread (None if the thread died meanwhile)."""
        future = self.on_engine_thread(fn)
        while self._thread_alive():
            try:
                return future.result(timeout=1)
            except concurrent.futures.TimeoutError:
                continue
        return None

    def _between(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread once no sequence runs (admission is stopped), the
        decode step in flight read first; its result, or its error raised here."""
        def settled():
            if self._inflight is not None:
                seqs, handle = self._inflight
                self._inflight = None
                self.outputs.on_tokens(seqs, self.runner.fetch(handle))
            if self.table.running:  # not reached: admission stops before this is asked
                raise RuntimeError("sequences still run")
            return fn()
        result = self._ask(settled)
        if not self._thread_alive():
            raise EngineFailed("the engine thread stopped; restart the server")
        return result

    def _runners(self) -> list[ModelRunner]:
        draft = self.speculation.draft
        return [self.runner] + ([draft.runner] if draft is not None else [])

    @property
    def is_sleeping(self) -> bool:
        return bool(self.sleep_level)

    def sleep(self, level: int = 1, mode: str = "wait", timeout: float | None = None) -> int:
        """Give the device memory back between rollouts: admission stops, the running requests
        finish or are aborted (``mode``, ``timeout``: as ``pause``), then the KV cache is freed
        (every cached prefix and session's blocks forgotten) and the weights go to host memory
        (``level`` 1) or are dropped (2: ``update_weights`` or ``wake_up`` reloads them). New
        requests get 503 until ``wake_up``; those already waiting run after it. Returns how
        many requests were aborted."""
        if level not in (1, 2):
            raise InvalidRequest(f"level must be 1 or 2, got {level}", param="level")
        if mode not in ("wait", "abort"):
            raise InvalidRequest(f"mode must be 'wait' or 'abort', got {mode!r}", param="mode")
        with self._control:
            paused, self.paused = self.paused, True
            try:
                aborted = self._quiesce(mode, timeout)

                def sleep():
                    self.table.forget_all()
                    for runner in self._runners():
                        runner.sleep(level)
                    self.sleep_level = max(self.sleep_level, level)
                self._between(sleep)
                trim_freed_memory()
            finally:
                self.paused = paused
            return aborted

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Undo ``sleep`` for ``tags``: "weights" (back from host memory; after level 2 reloaded
        from the served checkpoint unless ``update_weights`` gave new ones) and "kv_cache" (a new,
        empty one). Serving resumes once both are back."""
        unknown = sorted(set(tags) - {"weights", "kv_cache"})
        if unknown:
            raise InvalidRequest(f"tags: unknown tag {unknown[0]!r}; weights or kv_cache", param="tags")
        with self._control:
            if not self.sleep_level:
                return
            reload = None
            if "weights" in tags and self.runner.weights_dropped:
                if self.checkpoint is None:
                    raise InvalidRequest("the weights were dropped by sleep level 2 and this engine has no "
                                         "checkpoint to reload them from; update the weights first", param="tags")
                from model.checkpoint import load_params
                reload = self.runner.prepare_params(
                    load_params(self.checkpoint, self.runner.cfg, self.runner.param_shardings()), copy=False)
            self._between(lambda: self._wake(tags, reload))
            self.on_engine_thread(lambda: None)

    def _wake(self, tags, reload) -> None:
        if reload is not None:
            self.runner.swap_params(reload)
        for runner in self._runners():
            runner.wake(weights="weights" in tags, kv_cache="kv_cache" in tags)
        draft = self.speculation.draft
        if draft is not None and "kv_cache" in tags:
            draft.set_rows()
        if all(r.has_weights and r.has_cache for r in self._runners()):
            self.sleep_level = 0

    def update_weights(self, params: Any, version: str | None = None, mode: str = "wait",
                       prepared: bool = False) -> str:
        """Serve new weights: ``params`` (the checkpoint's tree of arrays, any placement; a JAX
        trainer's own, moved device to device) are checked and prepared beside the served ones
        while serving goes on, then swapped in between steps once the running requests have
        finished (``mode`` "abort": are aborted; admission paused meanwhile; the waiting run on
        the new weights). Every cached
        prefix and session's KV is forgotten. Asleep, the weights go on the device and the KV
        cache stays freed until ``wake_up``. Returns the new ``weight_version``: ``version``,
        or a counter. Raises ``model.weights.WeightsError`` (a ValueError naming the tensor)
        with the served weights untouched."""
        if mode not in ("wait", "abort"):
            raise InvalidRequest(f"mode must be 'wait' or 'abort', got {mode!r}", param="mode")
        self._check_updatable()
        new = params if prepared else self.runner.prepare_params(params)
        with self._control:
            paused, self.paused = self.paused, True
            try:
                self._quiesce(mode, None)
                current = self._between(lambda: self._swap(new, version))
                trim_freed_memory()  # the old weights
                return current
            finally:
                self.paused = paused
                self.on_engine_thread(lambda: None)

    def update_weights_from_path(self, path: str, load_format: str = "auto", version: str | None = None,
                                 mode: str = "wait") -> str:
        """``update_weights`` from files: a converted checkpoint, a Hugging Face directory or a
        GGUF file of the served architecture (``model.convert.load_for_update``)."""
        from model.convert.update import load_for_update

        self._check_updatable()
        params = load_for_update(path, load_format, self.runner.cfg, self.runner.param_shardings())
        return self.update_weights(self.runner.prepare_params(params, copy=False), version, mode, prepared=True)

    def _check_updatable(self) -> None:
        if self.failed is not None:
            raise EngineFailed(self.failed + "; restart the server")
        if self.draining:
            raise Draining("the server is shutting down")

    def _swap(self, prepared, version: str | None) -> str:
        self.runner.swap_params(prepared)
        self.table.forget_all()  # KV the old weights computed is never read again
        self._updates += 1
        self.weight_version = version if version is not None else str(self._updates)
        if self.sleep_level and self.runner.has_cache:
            self.sleep_level = 0
        log.info("weights updated: version %s", self.weight_version)
        return self.weight_version

    # -- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                idle = not (self.table.running or (self.waiting and self.admitting) or self._inflight)
                self._drain_inbox(block=idle)
                self._admit()
                self._step()
                self.heartbeat = time.monotonic()
            # Any error a step raises (an XLA runtime error, a kernel's FFI error, a bug in the
            # plan) is caught: the engine thread serves every request, so it fails the ones in
            # flight and keeps going; the log has the traceback.
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self._recover()

    def _recover(self) -> None:
        """After a failed step: fail its requests, forget every KV the plans counted (the step
        may not have written it), and make the device state anew if the step consumed it. If
        even that fails, the engine is marked failed: ``/health`` then answers 503."""
        self._inflight = None
        self.outputs.fail_running()
        try:
            if not self.runner.recover():
                self.table.forget_all()  # a new cache holds no session's or prefix's KV
        except Exception as e:
            log.exception("the engine cannot recover from the failed step")
            self.failed = f"the engine failed and could not recover: {e}"
            self._stop.set()

    def _step(self) -> None:
        inflight = None
        if self._inflight is not None:
            seqs, handle = self._inflight
            self._inflight = None
            if self.scheduler.chains_on(seqs):
                inflight = (seqs, handle)
            else:
                self.outputs.on_tokens(seqs, self.runner.fetch(handle))
        plan = self.scheduler.schedule(inflight[0] if inflight else None)
        if not plan:
            return
        constrained = [(s.matcher, s.slot) for s in plan.sampling_rows() if s.masked]
        # Rows under a grammar never chain, so their matchers have seen every token by now.
        masks = self.grammars.masks(constrained) if constrained else None
        results, handle = self.runner.execute(plan, inflight[1] if inflight else None, masks)
        if plan.decode is not None:
            self.stats.decode_steps += 1
            self.stats.chained_steps += plan.decode.chained
            self._inflight = (list(plan.decode.owners), handle)
        if inflight:  # read while the device runs the step queued on it
            self.outputs.on_tokens(inflight[0], self.runner.fetch(inflight[1]))
        self.outputs.on_prefilled(plan, results)

    def _drain_inbox(self, block: bool) -> None:
        get = (lambda: self._inbox.get(timeout=0.5)) if block else self._inbox.get_nowait
        try:
            while (item := get()) is not None:  # None: stop
                get = self._inbox.get_nowait
                kind, arg = item
                if kind == "add":
                    self.waiting.push(arg)
                elif kind == "call":
                    fn, future = arg
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller's to report
                        future.set_exception(e)
                elif kind == "abort_running":  # what runs; the waiting stay
                    for rid in [s.id for s in self.table.running.values()]:
                        self._abort(rid)
                elif kind == "end_session":
                    self.table.end_session(arg)
                else:  # "abort" (one request), "abort_session" (a session's), "abort_all"
                    self._abort_matching(kind, arg)
        except queue.Empty:
            pass

    def _abort(self, rid: str) -> None:
        req = self.waiting.remove(rid)
        if req is not None:
            self.metrics.finished.labels("abort").inc()
            req.emit(Output(finish_reason="abort", prompt_tokens=len(req.prompt_ids)))
            return
        for seq in self.table.running.values():
            if seq.id == rid:
                self.outputs.finish(seq, "abort")
                return

    @property
    def admitting(self) -> bool:
        return not (self.paused or self.sleep_level)

    def _admit(self) -> None:
        with_images: list[Sequence] = []
        while self.waiting and self.table.has_free and self.admitting:
            req = self.waiting.pop()
            history = self.table.history(req.session_id)
            seq = Sequence(req, seq=history + list(req.prompt_ids), history=len(history))
            try:
                self.limits.prompt(len(req.prompt_ids), req.params, len(history))
            except ContextLengthExceeded:
                # A full session ends with "length" and no text, as LMDeploy does.
                req.emit(Output(finish_reason="length", prompt_tokens=len(req.prompt_ids),
                                history_tokens=len(history)))
                continue
            slot = self.table.choose(seq)
            seq.weight_version = self.weight_version
            seq.max_tokens = self.max_length - len(seq.seq)
            if req.params.max_tokens is not None:
                seq.max_tokens = min(seq.max_tokens, req.params.max_tokens)
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.skip_special_tokens, context=seq.seq)
            seed = req.params.seed if req.params.seed is not None else int(np.random.randint(2**31))
            try:
                if req.params.grammar is not None:
                    seq.matcher = self.grammars.matcher(req.params.grammar)
                    seq.grammar_wait = req.params.grammar_after
                self.runner.set_slot(slot, req.params, seq.seq, seed, req.adapter)
            # This request's settings cannot be run (its grammar's matcher, its sampling row):
            # whatever the error, fail it alone and admit the others.
            except Exception:
                log.exception("request %s could not start", req.id)
                self.metrics.finished.labels("error").inc()
                req.emit(Output(finish_reason="error", prompt_tokens=len(seq.seq)))
                continue
            self.table.place(seq, slot)
            if req.images:
                with_images.append(seq)
        if with_images:
            self._encode_images(with_images)

    def _encode_images(self, seqs: list[Sequence]) -> None:
        """The admitted sequences' image features, before any of their chunks is planned: from
        the encoder cache, else from the vision tower, every image not cached in one batched
        call. A failure fails these sequences alone."""
        features: dict[bytes, Any] = {}
        pixels = {}
        for s in seqs:
            for im in s.req.images:
                if im.key not in features:
                    features[im.key], pixels[im.key] = self.encoder_cache.get(im.key), im.pixels
        todo = [k for k, f in features.items() if f is None]
        try:
            if todo:
                for key, f in zip(todo, self.runner.encode_images([pixels[k] for k in todo])):
                    features[key] = f
                    self.encoder_cache.put(key, f)
                self.metrics.images_encoded.inc(len(todo))
        except Exception:
            log.exception("the vision tower failed")
            for s in seqs:
                self.outputs.finish(s, "error")
            return
        for s in seqs:
            s.image_features = [features[im.key] for im in s.req.images]
