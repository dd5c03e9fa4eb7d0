"""A chat page for any running OpenAI-compatible api_server (``xlaserve serve gradio URL``).

The page talks to this small server only; this server talks to the api_server only through
its public HTTP API (``/v1/models``, ``/v1/chat/completions`` streamed), so the browser needs
no CORS grant and the API key never reaches it. Stopping a reply in the page closes the
upstream stream, which aborts the request on the api_server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import msgspec
from litestar import Litestar, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream
from litestar.static_files import create_static_files_router

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("webui.html")
STATIC = Path(__file__).with_name("static")  # the page's script and its vendored libraries
# The page runs only its own scripts: a model's answer is rendered as sanitized markdown, and
# even a sanitizer's miss could not run inline script or event handlers under this policy.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class ChatTurn(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]]  # text, or OpenAI content parts (text and image_url)


class ChatRequest(msgspec.Struct):
    messages: list[ChatTurn]
    system: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256


def _line(**kw: Any) -> bytes:
    return json.dumps(kw).encode() + b"\n"


def _upstream_error(status: int, body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"the api_server answered {status}"


def create_ui_app(api_server_url: str, api_key: str | None = None) -> Litestar:
    base = api_server_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @get("/", media_type="text/html", include_in_schema=False)
    async def index() -> Response:
        return Response(PAGE.read_text(encoding="utf-8"), media_type="text/html",
                        headers={"Content-Security-Policy": CSP})

    @get("/api/info")
    async def info() -> dict[str, Any]:
        """The served model, or a readable reason why the api_server cannot be used."""
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(base + "/v1/models", headers=headers)
        except httpx.HTTPError as e:
            return {"error": f"cannot reach the api_server at {base} ({type(e).__name__})"}
        if r.status_code != 200:
            return {"error": _upstream_error(r.status_code, r.content)}
        models = [m["id"] for m in r.json().get("data", [])]
        return {"models": models, "api_server": base}

    @post("/api/chat", status_code=200)
    async def chat(data: ChatRequest, state: State) -> Stream:
        """Stream the reply as newline-delimited JSON: {"reasoning"}, {"delta"} (the answer's text)
        and {"tool_call"} (fragments: index, name, arguments) lines, then {"done"} or {"error"}."""
        messages = [{"role": "system", "content": data.system}] if data.system.strip() else []
        messages += [{"role": m.role, "content": m.content} for m in data.messages]

        async def lines() -> AsyncIterator[bytes]:
            try:
                async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
                    models = (await client.get(base + "/v1/models", headers=headers)).json()
                    model = models["data"][0]["id"]
                    body = {"model": model, "messages": messages, "stream": True,
                            "temperature": data.temperature, "top_p": data.top_p,
                            "max_tokens": data.max_tokens}
                    async with client.stream("POST", base + "/v1/chat/completions", json=body,
                                             headers=headers) as r:
                        if r.status_code != 200:
                            yield _line(error=_upstream_error(r.status_code, await r.aread()))
                            return
                        finish = None
                        async for raw in r.aiter_lines():
                            if not raw.startswith("data:"):
                                continue
                            payload = raw[5:].strip()
                            if payload == "[DONE]":
                                break
                            chunk = json.loads(payload)
                            if "error" in chunk:
                                yield _line(error=chunk["error"].get("message", "server error"))
                                return
                            for choice in chunk.get("choices", []):
                                delta = choice.get("delta", {})
                                if delta.get("reasoning_content"):
                                    yield _line(reasoning=delta["reasoning_content"])
                                if delta.get("content"):
                                    yield _line(delta=delta["content"])
                                for call in delta.get("tool_calls") or ():
                                    fn = call.get("function") or {}
                                    yield _line(tool_call={"index": call.get("index", 0), "name": fn.get("name"),
                                                           "arguments": fn.get("arguments")})
                                finish = choice.get("finish_reason") or finish
                        yield _line(done=finish or "stop")
            except httpx.HTTPError as e:
                yield _line(error=f"cannot reach the api_server at {base} ({type(e).__name__})")
            except (ValueError, KeyError, IndexError):
                yield _line(error="the api_server sent an answer this page does not understand")

        return Stream(lines(), media_type="application/x-ndjson")

    static = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)
    return Litestar(route_handlers=[index, info, chat, static], openapi_config=None)


def serve(api_server_url: str, server_name: str, server_port: int, api_key: str | None = None,
          log_level: str = "warning") -> None:
    import uvicorn

    app = create_ui_app(api_server_url, api_key)
    print(f"xlaserve: chat page for {api_server_url} at http://{server_name}:{server_port}", flush=True)
    uvicorn.run(app, host=server_name, port=server_port, log_level=log_level.lower())
