"""LMDeploy's ``POST /v1/chat/interactive``: chat whose history stays on the server, keyed by
``session_id``, so a turn prefills only its own tokens."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from service import protocol as p
from service.chat import image_urls
from service.errors import InvalidRequest
from service.routes.common import (Ctx, OwnTypeStream, error_body, fan_in, guarded, require_generation,
                                   session_turn_ids, unless_disconnected, with_adapter)


@post("/v1/chat/interactive", summary="Interactive chat with server-side sessions (LMDeploy)",
      status_code=200)
async def chat_interactive(data: JSONBody[p.InteractiveRequest], ctx: Ctx, request: Request) -> Any:
    engine = require_generation(ctx)
    # LMDeploy's adapter_name picks a LoRA adapter; a session's later turns keep it when they
    # name none (see Engine.submit).
    adapter = None
    if data.adapter_name and data.adapter_name != ctx.settings.model_name:
        if engine.adapters is None or data.adapter_name not in engine.adapters:
            raise InvalidRequest(f"adapter_name {data.adapter_name!r}: no such adapter is loaded", param="adapter_name")
        adapter = data.adapter_name
    sid = data.session_id
    if data.cancel:
        if sid != -1:
            engine.abort_session(sid)
        return p.InteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=0,
                                     finish_reason="abort")
    if not data.interactive_mode and data.request_output_len == 0:
        # LMDeploy's end_session: free the session, generate nothing.
        if sid != -1:
            engine.end_session(sid)
        return p.InteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=0,
                                     finish_reason="stop")
    params = with_adapter(data.to_sampling_params(ctx.settings.defaults, ctx.settings.default_fields), adapter)
    messages = ([p.ChatMessage(role="user", content=data.prompt)] if isinstance(data.prompt, str)
                else data.prompt)
    if image_urls(messages):
        raise InvalidRequest("images are not supported on /v1/chat/interactive: send them to /v1/chat/completions",
                             param="prompt")
    history = engine.session_history(sid) if (sid != -1 and data.interactive_mode) else []
    if not data.interactive_mode and sid != -1:
        engine.end_session(sid)
    prompt_ids = session_turn_ids(ctx, engine, messages, history)
    session = sid if (sid != -1 and data.interactive_mode) else None
    engine.check_capacity()

    def response(text: str, out) -> p.InteractiveResponse:
        return p.InteractiveResponse(text=text, tokens=out.completion_tokens, input_tokens=len(prompt_ids),
                                     history_tokens=len(history), finish_reason=out.finish_reason)

    if data.stream:
        async def lines():
            async for _, out in fan_in(engine, [prompt_ids], params, session_id=session):
                yield msgspec.json.encode(response(out.text, out)) + b"\n"

        return OwnTypeStream(guarded(lines(), lambda e: msgspec.json.encode(error_body(e)) + b"\n"),
                             media_type="application/x-ndjson")
    text, last = "", None

    async def gather() -> None:
        nonlocal text, last
        async for _, out in fan_in(engine, [prompt_ids], params, session_id=session):
            text += out.text
            last = out

    await unless_disconnected(request, gather())
    return response(text, last)
