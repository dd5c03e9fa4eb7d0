"""The HTTP server process: uvicorn with a graceful drain on SIGTERM and SIGINT.

The first signal starts the drain: a replica registered with a proxy (``--proxy-url``) leaves
it, the engine admits nothing new (new requests get 503 with
OpenAI's error body, ``/health`` answers 503 at once), the running requests finish, up to the
drain timeout, and past it are aborted (``finish_reason: "abort"``, then ``[DONE]``); then the
server stops. A second signal stops at once, as uvicorn does.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

log = logging.getLogger("xlaserve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.state = state  # service.routes.common.State: its engine is set once loaded
        self.drain_timeout = drain_timeout
        self._draining = False
        self.before_drain = None  # called first on the drain thread: leaving a proxy

    def handle_exit(self, sig, frame) -> None:
        engine = self.state.engine
        if self._draining or engine is None:  # a second signal, or nothing loaded to drain
            return super().handle_exit(sig, frame)
        self._draining = True
        engine.draining = True  # before this handler returns: /health fails from now on
        threading.Thread(target=self._drain, args=(engine,), name="xlaserve-drain", daemon=True).start()

    def _drain(self, engine) -> None:
        if self.before_drain is not None:
            self.before_drain()
        log.info("draining: %d running, %d waiting; up to %.0f s", engine.running_count,
                 engine.waiting.count, self.drain_timeout)
        if engine.drain(self.drain_timeout):
            log.info("drained: every request finished")
        else:
            log.warning("drain timeout: the requests still running were aborted")
        self.should_exit = True
