"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, on
the chat path (``chat_run``). Errors on these routes have Anthropic's body (``service.app``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from service import protocol_messages as m
from service.engine import Output
from service.chat import tool_plan
from service.routes.chat_run import Piece, prepare_chat
from service.routes.common import Ctx, chat_ids, chat_template, check_model, require_engine


class MessageBuilder:
    """A message as its pieces arrive: content blocks (thinking, text, tool_use, in the order
    the answer makes them) and, for a stream, Anthropic's events that build them. The stream
    and the whole answer are made by the same calls, so they always agree."""

    def __init__(self, message: m.MessageResponse, stop: tuple[str, ...], prompt_tokens: int):
        self.message, self.stop, self.prompt_tokens = message, stop, prompt_tokens
        self.started = False
        self.open: str | None = None  # the type of the block text is going into

    @staticmethod
    def event(type_: str, **fields: Any) -> bytes:
        return (b"event: " + type_.encode() + b"\ndata: " + msgspec.json.encode({"type": type_, **fields})
                + b"\n\n")

    def _start(self, out: Output) -> list[bytes]:
        """message_start, sent with the answer's first piece: by then the prompt's cache split
        is known (``input_tokens`` not read from the cache, as the final usage counts them)."""
        usage = m.AnthropicUsage(input_tokens=self.prompt_tokens - out.cached_tokens,
                                 cache_read_input_tokens=out.cached_tokens)
        return [self.event("message_start", message={**msgspec.to_builtins(self.message),
                                                     "usage": msgspec.to_builtins(usage)}),
                self.event("ping")]

    def _index(self) -> int:
        return len(self.message.content) - 1

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=self._index())]

    def _text(self, kind: str, text: str) -> list[bytes]:
        field = "thinking" if kind == "thinking" else "text"
        events = []
        if self.open != kind:
            events += self._close()
            block = {"type": kind, field: ""}
            if kind == "thinking":
                block["signature"] = ""  # nothing is signed; a client passing it back is accepted
            self.message.content.append(block)
            self.open = kind
            events.append(self.event("content_block_start", index=self._index(), content_block=dict(block)))
        self.message.content[-1][field] += text
        events.append(self.event("content_block_delta", index=self._index(),
                                 delta={"type": f"{kind}_delta" if kind == "thinking" else "text_delta", field: text}))
        return events

    def feed(self, piece: Piece) -> list[bytes]:
        events = [] if self.started else self._start(piece.out)
        self.started = True
        if piece.thought:
            events += self._text("thinking", piece.thought)
        if piece.content:
            events += self._text("text", piece.content)
        for call in piece.calls:
            events += self._close()
            block = {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
                     "input": {}}
            self.message.content.append(block)
            events.append(self.event("content_block_start", index=self._index(), content_block=dict(block)))
            events.append(self.event("content_block_delta", index=self._index(),
                                     delta={"type": "input_json_delta", "partial_json": call.arguments}))
            events.append(self.event("content_block_stop", index=self._index()))
            block["input"] = json.loads(call.arguments) if call.arguments.strip() else {}
        if piece.final:
            events += self._finish(piece.out, bool(piece.calls) or any(
                b["type"] == "tool_use" for b in self.message.content))
        return events

    def _finish(self, out: Output, called: bool) -> list[bytes]:
        events = self._close()
        msg = self.message
        if out.finish_reason == "length":
            msg.stop_reason = "max_tokens"
        elif called:
            msg.stop_reason = "tool_use"
        elif out.stop_string is not None:
            msg.stop_reason, msg.stop_sequence = "stop_sequence", out.stop_string
        else:
            msg.stop_reason = "end_turn"
        msg.usage = m.AnthropicUsage(input_tokens=out.prompt_tokens - out.cached_tokens,
                                     output_tokens=out.completion_tokens, cache_read_input_tokens=out.cached_tokens)
        return events + [
            self.event("message_delta", delta={"stop_reason": msg.stop_reason, "stop_sequence": msg.stop_sequence},
                       usage=msgspec.to_builtins(msg.usage)),
            self.event("message_stop")]


@post("/v1/messages", summary="Create a message (Anthropic Messages API)", status_code=200)
async def create_message(data: JSONBody[m.MessagesRequest], ctx: Ctx, request: Request) -> Any:
    run = await prepare_chat(ctx, data.to_chat(), "output_config.format")
    message = m.MessageResponse(id=f"msg_{uuid.uuid4().hex}", model=run.params.adapter or ctx.settings.model_name)
    builder = MessageBuilder(message, run.params.stop, len(run.prompt_ids))

    if data.stream:
        return run.event_stream([], builder.feed,
                                lambda e: builder.event("error", error=m.error_body(e.status, str(e))["error"]))
    await run.gather(request, builder.feed)
    return message


@post("/v1/messages/count_tokens", summary="Count a message's input tokens (Anthropic Messages API)",
      status_code=200)
async def count_tokens(data: JSONBody[m.MessagesRequest], ctx: Ctx) -> m.TokenCount:
    """The prompt's token count as the chat template renders it (tools included); the fields
    that only matter to generation are accepted and not used."""
    engine = require_engine(ctx)
    check_model(ctx, data.model)
    chat = data.to_chat(generate=False)
    plan = tool_plan(chat, chat_template(ctx, engine), ctx.settings.tool_call_parser)
    return m.TokenCount(input_tokens=len(chat_ids(ctx, engine, chat.messages, plan)))
