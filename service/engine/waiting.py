"""Requests submitted and not yet in a slot: a FIFO the engine thread owns, and a count that
callers on any thread reserve against ``max_queue`` when they submit (so a full queue is a 503
before a stream starts)."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterator

from service.engine.request import Request
from service.errors import Overloaded


class WaitingQueue:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.count = 0  # reserved by submitters: queued here or in the engine's inbox
        self._lock = threading.Lock()
        self._requests: collections.deque[Request] = collections.deque()

    def check(self, n: int = 1) -> None:
        if self.count + n > self.max_queue:
            raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting); retry later")

    def reserve(self) -> None:
        """Any thread: hold a place for one request, or raise Overloaded."""
        with self._lock:
            self.check()
            self.count += 1

    def _release(self) -> None:
        with self._lock:
            self.count -= 1

    # -- the engine thread ---------------------------------------------------------------------

    def push(self, req: Request) -> None:
        self._requests.append(req)

    def pop(self) -> Request:
        req = self._requests.popleft()
        self._release()
        return req

    def remove(self, rid: str) -> Request | None:
        for req in self._requests:
            if req.id == rid:
                self._requests.remove(req)
                self._release()
                return req
        return None

    def ids(self, keep: Callable[[Request], bool] = lambda r: True) -> list[str]:
        return [r.id for r in self._requests if keep(r)]

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)
