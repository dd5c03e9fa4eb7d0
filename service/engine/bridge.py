"""The bridge between the engine thread and asyncio callers: outputs go to a per-request
``asyncio.Queue`` through ``loop.call_soon_threadsafe``, a step's outputs for one loop in one
wake-up (each wake-up is a syscall and a switch to the loop's thread)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from service.errors import ServiceError


class LoopQueue:
    """An emit callback that hands Outputs to an asyncio queue on its event loop. The engine
    batches the ones it recognises as this type (``deliver``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def __call__(self, out) -> None:
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


async def stream(engine, prompt_ids: list[int], params, session_id: int | None = None,
                 request_id: str | None = None, images: list = ()) -> AsyncIterator:
    """``Engine.generate``: submit on the running loop and yield the request's Outputs; leaving
    early aborts it."""
    q: asyncio.Queue = asyncio.Queue()
    rid = engine.submit(prompt_ids, params, LoopQueue(asyncio.get_running_loop(), q), session_id=session_id,
                        request_id=request_id, images=images)
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
            engine.abort(rid)
