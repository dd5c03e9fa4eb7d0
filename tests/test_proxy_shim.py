"""The proxy's shim and a replica's registration, without a gateway: the upstream is an
``httpx.MockTransport`` and the proxy's node API a patched ``httpx``."""

import asyncio
import json
import logging
import time

import httpx
import pytest

from service.proxy import Shim
from service.registration import Registrar

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
         "query_string": b"", "headers": [(b"content-type", b"application/json")]}


def _run(shim: Shim, receive, timeout: float = 5.0) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def main():
        await asyncio.wait_for(shim(SCOPE, receive, send), timeout)

    asyncio.run(main())
    return sent


def _client(leaves_after: float):
    """An ASGI ``receive``: the request's body, then a disconnect ``leaves_after`` seconds later."""
    messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

    async def receive():
        try:
            return next(messages)
        except StopIteration:
            await asyncio.sleep(leaves_after)
            return {"type": "http.disconnect"}

    return receive


def test_a_client_that_leaves_before_the_answer_starts_cancels_the_upstream_request():
    state = {"started": False, "cancelled": False}

    async def slow_replica(request):  # a whole (non-streamed) answer that takes long to compute
        state["started"] = True
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return httpx.Response(200, json={})

    shim = Shim("http://gateway", "http://metrics")
    shim.client = httpx.AsyncClient(transport=httpx.MockTransport(slow_replica))
    t0 = time.monotonic()
    sent = _run(shim, _client(leaves_after=0.2))  # the client goes while the replica computes
    assert time.monotonic() - t0 < 5
    assert state == {"started": True, "cancelled": True}
    assert sent == []  # nothing answered to a client that is gone


class _CutStream(httpx.AsyncByteStream):
    async def __aiter__(self):
        yield b'data: {"choices": []}\n\n'
        raise httpx.ReadError("the replica died")


def test_a_stream_cut_off_upstream_ends_with_an_upstream_failed_event_and_no_done():
    def replica(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_CutStream())

    shim = Shim("http://gateway", "http://metrics")
    shim.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
    sent = _run(shim, _client(leaves_after=30))  # the client stays
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:])
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert events[0] == {"choices": []}
    assert events[-1]["error"]["code"] == "upstream_failed"
    assert b"[DONE]" not in body and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


class _Proxy:
    """The proxy's node API as ``httpx.get``/``httpx.post`` see it."""

    def __init__(self, status_body: bytes):
        self.status_body = status_body
        self.added: list[str] = []

    def get(self, url, **kw):
        assert url.endswith("/nodes/status")
        return httpx.Response(200, content=self.status_body, request=httpx.Request("GET", url))

    def post(self, url, json=None, **kw):
        assert url.endswith("/nodes/add")
        self.added.append(json["url"])
        return httpx.Response(200, request=httpx.Request("POST", url))


def test_a_proxy_answering_junk_is_retried_and_logged_once(monkeypatch, caplog):
    proxy = _Proxy(b"<html>not the node list</html>")
    monkeypatch.setattr(httpx, "get", proxy.get)
    monkeypatch.setattr(httpx, "post", proxy.post)
    reg = Registrar("http://proxy:8000/", "http://node:23333", "m")
    with caplog.at_level(logging.INFO, logger="xlaserve"):
        assert reg.check() is False and reg.check() is False
        assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1
        proxy.status_body = b"[]"  # the proxy comes back: the next round registers
        assert reg.check() is True
    assert proxy.added == ["http://node:23333"]
    assert "answers again" in caplog.records[-1].getMessage()


def test_a_node_url_with_a_trailing_slash_is_not_registered_again_and_again(monkeypatch):
    proxy = _Proxy(json.dumps(["http://node:23333"]).encode())
    monkeypatch.setattr(httpx, "get", proxy.get)
    monkeypatch.setattr(httpx, "post", proxy.post)
    reg = Registrar("http://proxy:8000", "http://node:23333/", "m")
    assert reg.check() and reg.check()
    assert proxy.added == []


def test_the_registration_thread_survives_a_junk_answer(monkeypatch):
    proxy = _Proxy(b"not json")
    monkeypatch.setattr(httpx, "get", proxy.get)
    monkeypatch.setattr(httpx, "post", proxy.post)
    reg = Registrar("http://proxy:8000", "http://node:23333", "m", interval=0.05)
    reg.start()
    try:
        time.sleep(0.2)
        assert reg._thread.is_alive()
        proxy.status_body = b"[]"
        deadline = time.monotonic() + 5
        while not proxy.added and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.added == ["http://node:23333"]
    finally:
        reg._stop.set()
        reg._thread.join(5)


@pytest.mark.parametrize("answer", [b"123", b"null"])
def test_a_node_list_of_the_wrong_type_is_a_failed_round(monkeypatch, answer):
    proxy = _Proxy(answer)
    monkeypatch.setattr(httpx, "get", proxy.get)
    monkeypatch.setattr(httpx, "post", proxy.post)
    assert Registrar("http://proxy:8000", "http://node:23333", "m").check() is False
    assert proxy.added == []
