"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``."""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any, AsyncIterator

from litestar import Request, get, post
from litestar.params import FromPath, JSONBody

from service import protocol as p
from service import protocol_messages as m
from service.engine import Engine, Output
from service.chat import call_deltas, call_out
from service.errors import InvalidRequest, ModelNotFound
from service.routes.chat_run import check_grammar, prepare_chat
from service.routes.common import (Ctx, OwnTypeStream, State, check_model, fan_in, require_generation, sse,
                                   sse_stream, unless_disconnected, usage, with_adapter)
from service.routes.logprobs import chat_logprobs, completion_logprobs


def _stream(chunks: AsyncIterator[bytes]) -> OwnTypeStream:
    return OwnTypeStream(sse_stream(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _cards(ctx: State) -> list[p.ModelCard]:
    """The base model, then each loaded adapter (``parent`` the base, ``root`` its directory)."""
    max_len = ctx.engine.session_len if ctx.engine else None
    base = ctx.settings.model_name
    version = {"weight_version": ctx.engine.weight_version} if ctx.engine else {}
    cards = [p.ModelCard(id=base, created=ctx.settings.created, root=base, max_model_len=max_len, **version)]
    if ctx.engine is not None and ctx.engine.adapters is not None:
        cards += [p.ModelCard(id=a.name, created=ctx.settings.created, root=a.path, parent=base,
                              max_model_len=max_len) for a in ctx.engine.adapters.loaded()]
    return cards


def _anthropic(card: p.ModelCard) -> m.AnthropicModel:
    created = datetime.datetime.fromtimestamp(card.created, datetime.timezone.utc)
    return m.AnthropicModel(id=card.id, display_name=card.id, created_at=created.isoformat().replace("+00:00", "Z"))


@get("/v1/models", summary="List served models (OpenAI's shape; Anthropic's to a request with anthropic-version)")
async def list_models(ctx: Ctx, request: Request) -> Any:
    cards = _cards(ctx)
    if "anthropic-version" in request.headers:
        data = [_anthropic(c) for c in cards]
        return m.AnthropicModelList(data=data, first_id=data[0].id, last_id=data[-1].id)
    return p.ModelList(data=cards)


@get("/v1/models/{model:path}", summary="Retrieve a served model (OpenAI's shape; Anthropic's to a request "
     "with anthropic-version)")
async def retrieve_model(model: FromPath[str], ctx: Ctx, request: Request) -> Any:
    model = model.lstrip("/")  # a path parameter keeps its leading slash; a name may hold others
    card = next((c for c in _cards(ctx) if c.id == model), None)
    if card is None:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves '{ctx.settings.model_name}'")
    return _anthropic(card) if "anthropic-version" in request.headers else card


@post("/v1/chat/completions", summary="Chat completion (OpenAI)", status_code=200)
async def chat_completions(data: JSONBody[p.ChatCompletionRequest], ctx: Ctx, request: Request) -> Any:
    run = await prepare_chat(ctx, data)
    engine, params, answers = run.engine, run.params, run.answers
    rid, created, model = response_id(data, "chatcmpl"), int(time.time()), params.adapter or ctx.settings.model_name
    run.request_id = rid
    ids = data.return_token_ids

    def chunk(choices, **kw) -> bytes:
        return sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, **kw))

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        async def chunks() -> AsyncIterator[bytes]:
            finals: dict[int, Output] = {}
            started: set[int] = set()
            async for piece in run.pieces():
                i, out = piece.index, piece.out
                if i not in started:
                    started.add(i)
                    first = {"prompt_token_ids": run.prompt_ids} if ids and len(started) == 1 else {}
                    yield chunk([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))],
                                **first)
                if piece.thought or piece.content or out.logprobs or (ids and out.token_ids):
                    yield chunk([p.ChatChunkChoice(
                        index=i, delta=p.DeltaMessage(content=piece.content if piece.content or not piece.thought
                                                      else None, reasoning_content=piece.thought or None),
                        logprobs=chat_logprobs(engine, out), **token_ids(ids, out.token_ids))])
                before = len(answers[i].calls) - len(piece.calls)
                for k, call in enumerate(piece.calls):
                    for tool_delta in call_deltas(before + k, call):
                        yield chunk([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(tool_calls=[tool_delta]))])
                if piece.final:
                    finals[i] = out
                    yield chunk([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(),
                                                   finish_reason=answers[i].finish_reason(out.finish_reason),
                                                   **version(out))])
            if include_usage:
                yield chunk([], usage=usage([finals[i] for i in sorted(finals)]))

        return _stream(chunks())

    texts = [""] * data.n
    thoughts = [""] * data.n
    lps: list[list] = [[] for _ in range(data.n)]
    toks: list[list[int]] = [[] for _ in range(data.n)]
    finals: dict[int, Output] = {}

    def feed(piece) -> None:
        i, out = piece.index, piece.out
        texts[i] += piece.content
        thoughts[i] += piece.thought
        toks[i] += out.token_ids
        if out.logprobs:
            lps[i].extend(chat_logprobs(engine, out).content)
        if piece.final:
            finals[i] = out

    await run.gather(request, feed)
    choices = []
    for i in range(data.n):
        calls = answers[i].calls
        message = p.ResponseMessage(role="assistant", content=texts[i] if texts[i] or not calls else None,
                                    reasoning_content=thoughts[i] or None,
                                    tool_calls=[call_out(c) for c in calls] or None)
        choices.append(p.ChatChoice(
            index=i, message=message,
            logprobs=p.ChoiceLogprobs(content=lps[i]) if params.logprobs is not None else None,
            finish_reason=answers[i].finish_reason(finals[i].finish_reason), **token_ids(ids, toks[i]),
            **version(finals[i])))
    return p.ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                    usage=usage([finals[i] for i in range(data.n)]),
                                    **({"prompt_token_ids": run.prompt_ids} if ids else {}))


def response_id(data: p.ChatCompletionRequest | p.CompletionRequest, prefix: str) -> str:
    """The request's own ``request_id``, else a new ``prefix-<hex>``; ``/abort_request`` takes it."""
    return data.request_id or f"{prefix}-{uuid.uuid4().hex}"


def token_ids(asked: bool, ids: list[int]) -> dict[str, Any]:
    return {"token_ids": list(ids)} if asked else {}


def version(out: Output) -> dict[str, Any]:
    """The weights that computed a finished choice (an engine's Output always says)."""
    return {"weight_version": out.weight_version} if out.weight_version is not None else {}


def _completion_prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.tokenizer.encode(prompt)]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    if all(isinstance(x, str) for x in prompt):
        return [engine.tokenizer.encode(x) for x in prompt]
    if all(isinstance(x, list) and x for x in prompt):
        return [list(x) for x in prompt]
    raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids or a "
                         "list of lists of token ids", param="prompt")


@post("/v1/completions", summary="Text completion (OpenAI)", status_code=200)
async def completions(data: JSONBody[p.CompletionRequest], ctx: Ctx, request: Request) -> Any:
    engine = require_generation(ctx)
    adapter = check_model(ctx, data.model)
    if data.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if data.logprobs is not None and not 0 <= data.logprobs <= 5:
        raise InvalidRequest(f"logprobs must be in [0, 5], got {data.logprobs}", param="logprobs")
    params = with_adapter(data.to_sampling_params(ctx.settings.defaults), adapter)
    check_grammar(engine, params.grammar, "response_format")
    prompts = _completion_prompts(engine, data.prompt)
    engine.check_submit(prompts, params, data.n)  # every prompt checked before any is submitted
    rid, created, model = response_id(data, "cmpl"), int(time.time()), adapter or ctx.settings.model_name
    total = len(prompts) * data.n
    ids = data.return_token_ids

    def prompt_ids(idx: int) -> dict[str, Any]:
        return {"prompt_token_ids": prompts[idx // data.n]} if ids else {}

    def echo_text(idx: int) -> str:
        return engine.tokenizer.decode(prompts[idx // data.n]) if data.echo else ""

    def logprobs(idx: int, outs: list[Output], offset: int, first: bool = True):
        if params.logprobs is None:
            return None
        scored = params.prompt_logprobs is not None and first
        return completion_logprobs(engine, outs, offset, prompts[idx // data.n] if scored else None)

    if data.max_tokens == 0 and params.prompt_logprobs is None:  # echo only: nothing to run
        choices = [p.CompletionChoice(index=idx, text=echo_text(idx), finish_reason="length", **prompt_ids(idx),
                                      **token_ids(ids, [])) for idx in range(total)]
        finals = [Output(prompt_tokens=len(prompts[idx // data.n])) for idx in range(total)]
        if data.stream:
            async def echoes():
                for choice in choices:
                    yield sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
                if data.stream_options and data.stream_options.include_usage:
                    yield sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                                   usage=usage(finals, data.n)))
            return _stream(echoes())
        return p.CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                    usage=usage(finals, data.n))

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        async def chunks():
            finals, echoed = {}, set()
            async for idx, out in fan_in(engine, prompts, params, data.n, request_id=rid):
                text, first = out.text, idx not in echoed
                if first:
                    echoed.add(idx)
                    text = echo_text(idx) + text
                lp = logprobs(idx, [out], len(text) - len(out.text), first)
                if text or out.finish_reason is not None or lp or (ids and (first or out.token_ids)):
                    yield sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[
                        p.CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=out.finish_reason,
                                           **(prompt_ids(idx) if first else {}), **token_ids(ids, out.token_ids),
                                           **version(out))]))
                if out.finish_reason is not None:
                    finals[idx] = out
            if include_usage:
                yield sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                               usage=usage([finals[i] for i in sorted(finals)], data.n)))

        return _stream(chunks())

    outs: list[list[Output]] = [[] for _ in range(total)]

    async def gather() -> None:
        async for idx, out in fan_in(engine, prompts, params, data.n, request_id=rid):
            outs[idx].append(out)

    await unless_disconnected(request, gather())
    choices = []
    for idx in range(total):
        echo = echo_text(idx)
        lp = logprobs(idx, outs[idx], len(echo))
        choices.append(p.CompletionChoice(index=idx, text=echo + "".join(o.text for o in outs[idx]),
                                          logprobs=lp, finish_reason=outs[idx][-1].finish_reason, **prompt_ids(idx),
                                          **token_ids(ids, [t for o in outs[idx] for t in o.token_ids]),
                                          **version(outs[idx][-1])))
    return p.CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                usage=usage([o[-1] for o in outs], data.n))
