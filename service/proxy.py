"""``xlaserve serve proxy``: one address in front of several api_server replicas.

The routing is not ours. The gateway is SMG (Shepherd Model Gateway, the ``smg`` wheel: Rust,
no torch), run as a child process on a loopback port. It routes by model, balances with the
chosen policy (``cache_aware`` by default: a prefix tree over the request text, so a
conversation keeps landing on the replica that holds its KV), retries a request that failed
before its first byte on another replica, health-checks the replicas and reads their load from
``GET /v1/loads``.

In front of it sits a thin shim, the only thing listening on ``--server-port``. It
- answers LMDeploy's node API (``POST /nodes/add``, ``POST /nodes/remove``,
  ``GET /nodes/status``) from the gateway's worker API, so LMDeploy users' scripts and
  ``api_server --proxy-url`` keep working;
- checks ``--api-keys``;
- passes every other request through to the gateway byte for byte, streams included, and
  drops the upstream request when its client leaves (the gateway then aborts it on the
  replica).
It keeps no state of its own: the gateway's worker list is the one truth.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httpx

log = logging.getLogger("xlaserve.proxy")
gateway_log = logging.getLogger("xlaserve.gateway")

INSTALL_HINT = "pip install 'xlaserve[proxy]'"

# SMG's policies, and LMDeploy's proxy strategies mapped onto the nearest of them.
POLICIES = ("cache_aware", "round_robin", "random", "power_of_two", "least_load", "consistent_hashing",
            "prefix_hash")
LMDEPLOY_STRATEGIES = {"min_expected_latency": "least_load", "min_observed_latency": "power_of_two"}

# Small fleets (a few replicas, each a few dozen sequences) want a quick verdict on a dead
# replica and a quick return of a restarted one; the gateway's defaults are sized for large
# GPU fleets (a probe a minute, 10 failures to open a circuit, 60 s before retrying it).
# - A probe every 5 s, unhealthy after 2 misses: a dead replica leaves the rotation within about
#   10 s. Until then its requests fail to connect before any byte and are retried elsewhere, so
#   clients see no error. The 5 s timeout tolerates a replica that shares a busy CPU.
# - A circuit opens after 3 failed requests and is retried after 10 s.
# - Loads are read every 2 s: /v1/loads is a few counters, and balancing on 10 s old loads
#   sends a burst of requests to one replica.
# - A cache-aware match is abandoned for the least loaded replica when the matched one has
#   8 requests above the fleet's mean and 1.5x it: one replica runs 64 sequences per step
#   by default, so a smaller margin would give up prefix hits for balance that barely helps.
SMALL_FLEET = ["--health-check-interval-secs", "5", "--health-failure-threshold", "2",
               "--health-success-threshold", "1", "--health-check-timeout-secs", "5",
               "--cb-failure-threshold", "3", "--cb-timeout-duration-secs", "10",
               "--load-monitor-interval", "2", "--balance-abs-threshold", "8", "--balance-rel-threshold", "1.5",
               "--worker-startup-timeout-secs", "900", "--worker-startup-check-interval", "2"]

_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
               b"transfer-encoding", b"upgrade", b"host"}
_OWN_RESPONSE_HEADERS = {b"date", b"server"}  # the shim's server sets its own
_PUBLIC = {"/health", "/liveness", "/readiness"}


def gateway_binary() -> str | None:
    """The ``smg`` executable: beside this interpreter (a venv's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "smg")
    return beside if os.access(beside, os.X_OK) else shutil.which("smg")


def gateway_argv(binary: str, port: int, metrics_port: int, policy: str, log_level: str, worker_urls: list[str],
                 api_key: str | None, drain_timeout: float, extra: list[str]) -> list[str]:
    argv = [binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--log-level", {"WARNING": "warn"}.get(log_level, log_level.lower()),
            "--shutdown-grace-period-secs", str(int(drain_timeout)),
            # Its metrics on loopback, served at the proxy's /metrics (its default is 0.0.0.0:29000,
            # which a second proxy on the machine cannot bind).
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), *SMALL_FLEET]
    if worker_urls:
        argv += ["--worker-urls", *worker_urls]
    if api_key:  # the gateway's calls to the replicas carry it; so does every request the shim passes on
        argv += ["--api-key", api_key]
    return argv + extra


# -- the gateway process -----------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LINE = re.compile(r"^\S+ \S+\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(.*)$")
_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "ERROR": logging.ERROR}


class Gateway:
    """The gateway as a child process; its log lines go to ours, at their own level."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # Its own process group: a terminal's Ctrl-C reaches us, and we pass it on once.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._relay, name="xlaserve-gateway-log", daemon=True).start()

    def _relay(self) -> None:
        for raw in self.proc.stdout:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            m = _LINE.match(line)
            if m:
                gateway_log.log(_LEVELS[m.group(1)], "%s", m.group(2))
            elif line:  # its banner, or a Python traceback from its launcher
                gateway_log.log(logging.WARNING if "rror" in line else logging.INFO, "%s", line)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float) -> int:
        """SIGTERM, then SIGKILL past ``timeout``: the exit status, as a shell reports it."""
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            log.warning("the gateway did not stop within %.0f s; killing it", timeout)
            self.proc.kill()
            code = self.proc.wait()
        return 128 - code if code < 0 else code


def wait_listening(url: str, gateway: Gateway, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {gateway.proc.returncode} before it listened")
        try:
            httpx.get(url + "/liveness", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the gateway did not listen at {url} within {timeout:.0f} s")


# -- the shim ----------------------------------------------------------------------------------


class ShimError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": None}}).encode()


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class Shim:
    """The ASGI app on the public port: the node API and auth here, all else to the gateway."""

    def __init__(self, upstream: str, metrics: str, api_keys: tuple[str, ...] = (), register_timeout: float = 30.0):
        self.upstream = upstream
        self.metrics = metrics
        self.api_keys = api_keys
        self.register_timeout = register_timeout
        self.client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self.client is None:  # made on the server's loop
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                            limits=httpx.Limits(max_connections=None,
                                                                max_keepalive_connections=64))
        return self.client

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            return await self._route(scope, receive, send, path, method)
        except _ClientLeft:  # before its request was read: nothing to answer
            return

    async def _route(self, scope, receive, send, path: str, method: str) -> None:
        try:
            if path not in _PUBLIC:
                self._authorize(scope)
            route = {("POST", "/nodes/add"): self.add_node, ("POST", "/nodes/remove"): self.remove_node,
                     ("GET", "/nodes/status"): self.node_status}.get((method, path))
            if route is None and path.startswith("/nodes/"):
                known = path in ("/nodes/add", "/nodes/remove", "/nodes/status")
                raise ShimError(405 if known else 404, f"no route {method} {path}")
            if route is None:
                base = self.metrics if (method, path) == ("GET", "/metrics") else self.upstream
                return await self._forward(scope, receive, send, base)
            body = await _read_body(receive)
            status, answer = await route(scope, body)
        except ShimError as e:
            return await _respond(send, e.status, _error_body(e.status, str(e), e.type, e.param))
        await _respond(send, status, json.dumps(answer).encode())

    def _authorize(self, scope) -> None:
        if not self.api_keys:
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
            raise ShimError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")

    # -- the node API (LMDeploy's), on the gateway's worker API --------------------------------

    async def _gateway(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return await self._http().request(method, self.upstream + path, headers=self._upstream_auth(), **kw)
        except httpx.HTTPError as e:
            raise ShimError(503, f"the gateway is not answering: {e}", "server_error") from None

    async def _workers(self) -> list[dict]:
        r = await self._gateway("GET", "/workers")
        if r.status_code != 200:
            raise ShimError(502, f"the gateway's worker list failed ({r.status_code}): {r.text[:200]}", "server_error")
        return r.json().get("workers", [])

    def _upstream_auth(self) -> dict:
        return {"authorization": f"Bearer {self.api_keys[0]}"} if self.api_keys else {}

    async def add_node(self, scope, body: bytes):
        try:
            node = json.loads(body or b"null")
        except ValueError:
            raise ShimError(400, "the body must be JSON: {\"url\": \"http://host:port\"}") from None
        url = node.get("url") if isinstance(node, dict) else None
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ShimError(400, "url: an http(s) URL of a running api_server is required", param="url")
        url = url.rstrip("/")
        status = node.get("status") or {}
        models = status.get("models") if isinstance(status, dict) else None
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise ShimError(400, "status.models: a list of model names", param="status.models")
        try:  # fail now, and in words, on an address the gateway could never reach
            r = await self._http().get(url + "/v1/models", headers=self._upstream_auth(), timeout=10)
            served = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else None
        except httpx.HTTPError as e:
            raise ShimError(400, f"cannot reach {url}: {e}", param="url") from None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is None:
            raise ShimError(400, f"{url}/v1/models answered {r.status_code} without a model list: is it an "
                                 "api_server?", param="url")
        models = models or served
        spec = {"url": url, "runtime_type": "generic", "models": [{"id": m} for m in models]}
        r = await self._gateway("POST", "/workers", json=spec)
        if r.status_code == 409 and await self._wait_removed(url):  # it was on its way out: add it again
            r = await self._gateway("POST", "/workers", json=spec)
        if r.status_code not in (200, 201, 202, 409):  # 409: it is registered already
            raise ShimError(r.status_code if 400 <= r.status_code < 500 else 502,
                            f"the gateway refused {url}: {r.text[:300]}", param="url")
        deadline = time.monotonic() + self.register_timeout
        while time.monotonic() < deadline:
            if any(_same_url(w["url"], url) and w.get("status") == "ready" for w in await self._workers()):
                log.info("node %s added (%s)", url, ", ".join(models))
                return 200, "Added successfully"
            await asyncio.sleep(0.2)
        return 202, "Accepted: the gateway is still checking the node"

    async def _wait_removed(self, url: str, timeout: float = 15.0) -> bool:
        """Whether ``url`` was a worker the gateway is draining, once it has gone."""
        draining = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [w.get("status") for w in await self._workers() if _same_url(w["url"], url)]
            if not states:
                return draining
            if "draining" not in states:
                return False
            draining = True
            await asyncio.sleep(0.2)
        return False

    async def remove_node(self, scope, body: bytes):
        url = (parse_qs(scope.get("query_string", b"").decode()).get("node_url") or [None])[0]
        if url is None and body:
            try:
                url = (json.loads(body) or {}).get("url")
            except (ValueError, AttributeError):
                url = None
        if not isinstance(url, str) or not url:
            raise ShimError(400, "node_url: give the node's URL (?node_url=http://host:port)", param="node_url")
        ids = [w["id"] for w in await self._workers() if _same_url(w["url"], url)]
        if not ids:
            raise ShimError(404, f"no node {url}", param="node_url")
        for worker_id in ids:
            r = await self._gateway("DELETE", f"/workers/{worker_id}")
            if r.status_code not in (200, 202, 204, 404):
                raise ShimError(502, f"the gateway did not remove {url}: {r.text[:300]}", "server_error")
        log.info("node %s removed", url)
        return 200, "Deleted successfully"

    async def node_status(self, scope, body: bytes):
        # A worker the gateway is draining takes no new requests: it has left, as far as
        # routing goes.
        return 200, {w["url"]: {"models": [m["id"] for m in w.get("models", [])], "unfinished": w.get("load", 0),
                                "latency": [], "speed": None, "healthy": w.get("is_healthy", False),
                                "status": w.get("status"), "worker_id": w["id"]}
                     for w in await self._workers() if w.get("status") != "draining"}

    # -- everything else: to the gateway ---------------------------------------------------------

    async def _forward(self, scope, receive, send, base: str) -> None:
        body = await _read_body(receive)
        target = base + scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP and k != b"content-length"]
        if self.api_keys:  # checked above; the gateway and the replicas know the fleet's first key
            headers = [(k, v) for k, v in headers if k != b"authorization"]
            headers.append((b"authorization", f"Bearer {self.api_keys[0]}".encode()))
        client = self._http()
        # Watched from the start: a client that leaves while the replica still computes a whole
        # (non-streamed) answer cancels the upstream request, which the gateway then aborts.
        left = asyncio.ensure_future(_client_left(receive))
        request = asyncio.ensure_future(client.send(client.build_request(scope["method"], target, headers=headers,
                                                                         content=body), stream=True))
        try:
            done, _ = await asyncio.wait({request, left}, return_when=asyncio.FIRST_COMPLETED)
            if request not in done:
                request.cancel()
                return
            try:
                upstream = request.result()
            except httpx.HTTPError as e:
                return await _respond(send, 503, _error_body(503, f"the gateway is not answering: {e}",
                                                             "server_error"))
            try:
                await self._relay(scope, send, upstream, left)
            finally:
                await upstream.aclose()
        finally:
            left.cancel()
            request.cancel()

    @staticmethod
    async def _relay(scope, send, upstream: httpx.Response, left: asyncio.Future) -> None:
        """Pass the upstream answer on until it ends or the client leaves; an event stream cut
        off upstream ends with an error event."""
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": [(k, v) for k, v in upstream.headers.raw
                                if k.lower() not in _HOP_BY_HOP and k.lower() not in _OWN_RESPONSE_HEADERS]})
        pump = asyncio.ensure_future(_pump(upstream, send))
        done, _ = await asyncio.wait({pump, left}, return_when=asyncio.FIRST_COMPLETED)
        if pump not in done:  # the client left: dropping the upstream request aborts it
            pump.cancel()
            return
        try:
            pump.result()
        except httpx.HTTPError as e:  # the replica died mid-answer (the gateway retries only before)
            log.warning("the answer to %s %s was cut off upstream: %s", scope["method"], scope["path"], e)
            if not _plain_event_stream(upstream):
                return  # unfinished: the server closes the connection, and the client sees a broken body
            # An event stream ends with an error event instead, which OpenAI's SDKs raise as an
            # APIError, and no [DONE].
            event = {"error": {"message": "the replica serving this stream failed; the answer is incomplete",
                               "type": "server_error", "param": None, "code": "upstream_failed"}}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _plain_event_stream(response: httpx.Response) -> bool:
    return (response.headers.get("content-type", "").startswith("text/event-stream")
            and "content-encoding" not in response.headers)


async def _pump(upstream: httpx.Response, send) -> None:
    async for chunk in upstream.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _client_left(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ClientLeft(Exception):
    pass


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# -- the command -------------------------------------------------------------------------------


def run(host: str, port: int, gateway: Gateway, upstream: str, metrics: str, api_keys: tuple[str, ...], log_level: str,
        drain_timeout: float) -> int:
    """Serve the shim until the gateway exits; SIGTERM and SIGINT go to the gateway, which drains
    its requests and exits, and its exit status is returned."""
    import uvicorn

    class Server(uvicorn.Server):
        signalled = False

        def handle_exit(self, sig, frame) -> None:
            if not self.signalled and gateway.proc.poll() is None:
                self.signalled = True
                log.info("signal %d: passed to the gateway, which finishes its requests (up to %.0f s)",
                         sig, drain_timeout)
                gateway.signal(sig)  # the shim stops once the gateway has exited
                return
            if gateway.proc.poll() is None:  # a second signal: stop now, as uvicorn does
                gateway.proc.kill()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(Shim(upstream, metrics, api_keys), host=host, port=port, log_level=log_level.lower(),
                            lifespan="on", timeout_graceful_shutdown=5)
    server = Server(config)

    def watch() -> None:
        code = gateway.wait()
        if not server.should_exit:
            (log.info if code == 0 else log.error)("the gateway exited with status %d", code)
        server.should_exit = True

    threading.Thread(target=watch, name="xlaserve-gateway-watch", daemon=True).start()
    try:
        server.run()
    finally:
        code = gateway.stop(drain_timeout + 10)
    return code if code else (0 if server.started else 1)
