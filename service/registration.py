"""``api_server --proxy-url``: a replica that registers itself with a proxy and leaves it first
on shutdown.

It speaks LMDeploy's node API (``POST /nodes/add``, ``GET /nodes/status``,
``POST /nodes/remove?node_url=``), which ``xlaserve serve proxy`` serves, so a replica can join
either proxy. It registers once the server answers ``/health``, then checks every few seconds
that the proxy still lists it, and registers again when the proxy restarted or dropped it
(after a failed health check, say). On SIGTERM it deregisters before it drains, so the proxy
sends it nothing new while its running requests finish.
"""

from __future__ import annotations

import logging
import socket
import threading
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("xlaserve")


def advertised_host(server_name: str, proxy_url: str) -> str:
    """The address the proxy can reach this server at: ``--server-name``, unless that is a
    wildcard; then the local address of the route towards the proxy."""
    if server_name not in ("0.0.0.0", "::", ""):
        return server_name
    proxy_host = urlsplit(proxy_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((proxy_host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class Registrar:
    def __init__(self, proxy_url: str, node_url: str, model: str, api_key: str | None = None,
                 interval: float = 5.0):
        self.proxy = proxy_url.rstrip("/")
        self.node = node_url.rstrip("/")  # the proxy's list is compared without the slash
        self.model = model
        self.interval = interval
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="xlaserve-register", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval)

    def check(self) -> bool:
        """One round: register unless the proxy lists this server. Returns whether the proxy
        answered as a proxy does. Any failure (unreachable, an error status, an answer that is
        not the node list) is logged once per outage and retried next round: the thread never
        ends before ``deregister``."""
        try:
            if not self._listed():
                self._add()
        except (httpx.HTTPError, ValueError, TypeError, AttributeError) as e:
            if not self._unreachable:  # once per outage, not every few seconds
                log.warning("cannot register with the proxy %s (%s); retrying every %.0f s", self.proxy,
                            e or type(e).__name__, self.interval)
            self._unreachable = True
            return False
        if self._unreachable:
            log.info("the proxy %s answers again", self.proxy)
        self._unreachable = False
        return True

    def _listed(self) -> bool:
        r = httpx.get(self.proxy + "/nodes/status", headers=self._headers, timeout=10)
        r.raise_for_status()
        nodes = r.json()  # ValueError when it is not JSON
        if not isinstance(nodes, (list, dict)):
            raise ValueError(f"/nodes/status answered {type(nodes).__name__}, not the node list")
        return any(str(url).rstrip("/") == self.node for url in nodes)

    def _add(self) -> None:
        r = httpx.post(self.proxy + "/nodes/add", json={"url": self.node, "status": {"models": [self.model]}},
                       headers=self._headers, timeout=60)
        if r.status_code == 409 or r.is_success:  # 409: the proxy has it already
            log.info("registered %s with the proxy %s", self.node, self.proxy)
        else:
            log.warning("the proxy %s refused %s: %s %s", self.proxy, self.node, r.status_code, r.text[:300])

    def deregister(self, timeout: float = 5.0) -> None:
        """Stop re-registering and leave the proxy (best effort: a proxy that is gone already
        routes nothing here anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            r = httpx.post(self.proxy + "/nodes/remove", params={"node_url": self.node}, headers=self._headers,
                           timeout=timeout)
            if r.is_success or r.status_code == 404:
                log.info("left the proxy %s", self.proxy)
            else:
                log.warning("the proxy %s did not remove %s: %s %s", self.proxy, self.node, r.status_code,
                            r.text[:300])
        except httpx.HTTPError as e:
            log.warning("could not leave the proxy %s: %s", self.proxy, e)
