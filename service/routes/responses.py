"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``,
on the chat path (``chat_run``), with a bounded store of finished responses so that
``previous_response_id`` continues a conversation (its prompt then starts with the stored
one's tokens, which the prefix cache holds)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from litestar import Request, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody

from service import protocol as p
from service import protocol_responses as r
from service.engine import Engine, Output
from service.errors import InvalidRequest, ServiceError
from service.routes.chat_run import Piece, prepare_chat
from service.routes.common import Ctx, State
from service.routes.logprobs import chat_logprobs
from service.routes.store import ResponseStore


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """A response as its pieces arrive: the output items (reasoning, message, function calls,
    in the order the answer makes them) and, for a stream, the typed events that build them,
    each with its sequence number. The stream and the whole answer are made by the same calls,
    so they always agree."""

    def __init__(self, response: r.ResponseObject, engine: Engine, logprobs: bool):
        self.response, self.engine, self.logprobs = response, engine, logprobs
        self.open: Any = None  # the reasoning or message item text is going into
        self.seq = 0
        self.thought = ""

    def event(self, type_: str, **fields: Any) -> bytes:
        body = msgspec.json.encode({"type": type_, "sequence_number": self.seq, **fields})
        self.seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + body + b"\n\n"

    def start(self) -> list[bytes]:
        return [self.event("response.created", response=self.response),
                self.event("response.in_progress", response=self.response)]

    def _add(self, item: Any) -> list[bytes]:
        self.response.output.append(item)
        return [self.event("response.output_item.added", output_index=len(self.response.output) - 1, item=item)]

    def _where(self) -> dict:
        return {"item_id": self.open.id, "output_index": len(self.response.output) - 1, "content_index": 0}

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        part = item.content[0]
        where = {"item_id": item.id, "output_index": len(self.response.output) - 1, "content_index": 0}
        item.status = "completed"
        kind = "output_text" if isinstance(item, r.MessageItem) else "reasoning_text"
        done = {"logprobs": part.logprobs or []} if kind == "output_text" else {}
        return [self.event(f"response.{kind}.done", **where, text=part.text, **done),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _text(self, kind: type, text: str, logprobs: list | None = None) -> list[bytes]:
        events = []
        if not isinstance(self.open, kind):
            events += self._close()
            part = r.OutputText(text="", logprobs=[] if self.logprobs else None) if kind is r.MessageItem \
                else r.ReasoningText(text="")
            # Added with no parts, as OpenAI sends it: the part arrives with its own event, and a
            # client that accumulates both (the SDKs do) would hold it twice.
            self.open = kind(id=_id("msg" if kind is r.MessageItem else "rs"), content=[])
            events += self._add(self.open)
            self.open.content.append(part)
            events.append(self.event("response.content_part.added", **self._where(), part=part))
        part = self.open.content[0]
        part.text += text
        if kind is r.MessageItem:
            if logprobs:
                part.logprobs.extend(logprobs)
            events.append(self.event("response.output_text.delta", **self._where(), delta=text,
                                     logprobs=logprobs or []))
        else:
            events.append(self.event("response.reasoning_text.delta", **self._where(), delta=text))
        return events

    def feed(self, piece: Piece) -> list[bytes]:
        events = []
        if piece.thought:
            self.thought += piece.thought
            events += self._text(r.ReasoningItem, piece.thought)
        lps = [msgspec.to_builtins(x) for x in chat_logprobs(self.engine, piece.out).content] \
            if self.logprobs and piece.out.logprobs else None
        if piece.content or lps:
            events += self._text(r.MessageItem, piece.content, lps)
        for call in piece.calls:
            events += self._close()
            item = r.FunctionCallItem(id=_id("fc"), call_id=call.id, name=call.name, arguments="")
            events += self._add(item)
            at = {"item_id": item.id, "output_index": len(self.response.output) - 1}
            events.append(self.event("response.function_call_arguments.delta", **at, delta=call.arguments))
            item.arguments, item.status = call.arguments, "completed"
            events.append(self.event("response.function_call_arguments.done", **at, arguments=call.arguments,
                                     name=call.name))
            events.append(self.event("response.output_item.done", output_index=at["output_index"], item=item))
        if piece.final:
            events += self._finish(piece.out)
        return events

    def _finish(self, out: Output) -> list[bytes]:
        events = self._close()
        res = self.response
        if not res.output:  # an empty answer is still a message
            res.output.append(r.MessageItem(id=_id("msg"), content=[r.OutputText(text="")], status="completed"))
        reasoning = len(self.engine.tokenizer.encode(self.thought, add_special_tokens=False)) if self.thought else 0
        res.usage = r.ResponseUsage(
            input_tokens=out.prompt_tokens, output_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
            input_tokens_details=r.InputTokensDetails(cached_tokens=out.cached_tokens),
            output_tokens_details=r.OutputTokensDetails(reasoning_tokens=min(reasoning, out.completion_tokens)))
        if out.finish_reason in ("length", "abort"):
            res.status = "incomplete"
            res.incomplete_details = {"reason": "max_output_tokens" if out.finish_reason == "length" else "interrupted"}
            return events + [self.event("response.incomplete", response=res)]
        res.status = "completed"
        return events + [self.event("response.completed", response=res)]

    def fail(self, exc: ServiceError) -> bytes:
        self.response.status = "failed"
        self.response.error = {"code": exc.code or exc.type, "message": str(exc)}
        return self.event("response.failed", response=self.response)

    def conversation(self) -> list[p.ChatMessage]:
        """The answer as chat messages, to follow the request's own in the stored conversation."""
        text = "".join(c.text for i in self.response.output if isinstance(i, r.MessageItem) for c in i.content)
        calls = [p.ToolCallIn(id=i.call_id, function=p.FunctionCall(name=i.name, arguments=i.arguments))
                 for i in self.response.output if isinstance(i, r.FunctionCallItem)]
        return [p.ChatMessage(role="assistant", content=text if text or not calls else None,
                              tool_calls=calls or None, reasoning_content=self.thought or None)]


def _store(ctx: State) -> ResponseStore:
    return ctx.responses


@post("/v1/responses", summary="Create a model response (OpenAI Responses API)", status_code=200)
async def create_response(data: JSONBody[r.ResponsesRequest], ctx: Ctx, request: Request) -> Any:
    prior: list[p.ChatMessage] = []
    if data.previous_response_id is not None:
        prior = _store(ctx).get(data.previous_response_id, "previous_response_id").conversation
    chat = data.to_chat(prior)
    run = await prepare_chat(ctx, chat, "text.format")
    params = run.params
    response = r.ResponseObject(
        id=_id("resp"), created_at=int(time.time()), model=params.adapter or ctx.settings.model_name,
        instructions=data.instructions,
        max_output_tokens=data.max_output_tokens, previous_response_id=data.previous_response_id,
        parallel_tool_calls=data.parallel_tool_calls, tool_choice=msgspec.to_builtins(data.tool_choice or "auto"),
        tools=msgspec.to_builtins(data.tools or []), temperature=params.temperature, top_p=params.top_p,
        text=msgspec.to_builtins(data.text) if data.text is not None and data.text.format is not None
        else {"format": {"type": "text"}}, store=data.store, metadata=data.metadata or {}, user=data.user)
    builder = ResponseBuilder(response, run.engine, data.top_logprobs is not None)

    def keep() -> None:
        if data.store and response.status in ("completed", "incomplete"):
            # The conversation as the next turn sees it: the input without the instructions.
            _store(ctx).put(response, chat.messages[1 if data.instructions else 0:] + builder.conversation(),
                            data.input_items())

    if data.stream:
        return run.event_stream(builder.start(), builder.feed, builder.fail, done=keep)
    await run.gather(request, builder.feed)
    keep()
    return response


@get("/v1/responses/{response_id:str}", summary="Get a stored response (OpenAI Responses API)")
async def get_response(response_id: FromPath[str], ctx: Ctx) -> r.ResponseObject:
    return _store(ctx).get(response_id).response


@delete("/v1/responses/{response_id:str}", summary="Delete a stored response (OpenAI Responses API)",
        status_code=200)
async def delete_response(response_id: FromPath[str], ctx: Ctx) -> r.ResponseDeleted:
    _store(ctx).delete(response_id)
    return r.ResponseDeleted(id=response_id)


@get("/v1/responses/{response_id:str}/input_items", summary="List a stored response's input items (OpenAI "
     "Responses API)")
async def list_input_items(response_id: FromPath[str], ctx: Ctx, order: FromQuery[str] = "desc",
                           limit: FromQuery[int] = 20, after: FromQuery[str | None] = None,
                           include: FromQuery[list[str] | None] = None) -> r.InputItemList:
    """A page of the items the response was created from: ``order`` asc (as sent) or desc (the
    default, as OpenAI's), at most ``limit`` (1 to 100), those after the item ``after``.
    ``include`` is accepted and adds nothing (no item has more to include)."""
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be asc or desc, got {order!r}", param="order")
    if not 1 <= limit <= 100:
        raise InvalidRequest(f"limit must be in [1, 100], got {limit}", param="limit")
    items = list(_store(ctx).get(response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        at = next((i for i, item in enumerate(items) if item["id"] == after), None)
        if at is None:
            raise InvalidRequest(f"after: response {response_id!r} has no input item {after!r}", param="after")
        items = items[at + 1:]
    page = items[:limit]
    return r.InputItemList(data=page, first_id=page[0]["id"] if page else None,
                           last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)

