"""The Litestar app: OpenAI routes, LMDeploy's interactive route, ops endpoints.

The engine comes from the app's state (set by the lifespan or by the caller) and is injected
into handlers; errors are mapped to OpenAI's body by type in ``_error_handler``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Stream
from litestar.static_files import create_static_files_router

from model.chat_template import ChatTemplateError, render
from service import protocol as p
from service.engine import Engine, Output
from service.metrics import CONTENT_TYPE
from service.errors import InvalidRequest, ModelNotFound, NotReady, ServiceError, Unauthorized
from service.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    api_keys: tuple[str, ...] = ()
    chat_template: str | None = None  # overrides the checkpoint's
    meta_instruction: str | None = None  # default system prompt
    defaults: SamplingParams = SamplingParams()
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)


@dataclasses.dataclass
class State:
    """What handlers need; ``engine`` is None while the model loads."""

    settings: ServerSettings
    engine: Engine | None = None


Ctx = NamedDependency[State]  # injected into every handler as ``ctx``


# -- helpers -----------------------------------------------------------------------------------


def _engine(ctx: State) -> Engine:
    if ctx.engine is None:
        raise NotReady("the model is still loading; retry shortly")
    return ctx.engine


def _check_model(ctx: State, model: str | None) -> None:
    if model is not None and model != ctx.settings.model_name:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves "
                            f"'{ctx.settings.model_name}'")


def _message_text(m: p.ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.type != "text":
            raise InvalidRequest(f"content part type {part.type!r} is not supported (text only)",
                                 param="messages")
        parts.append(part.text or "")
    return "".join(parts)


def chat_prompt(ctx: State, engine: Engine, messages: list[p.ChatMessage]) -> str:
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    msgs = [{"role": m.role, "content": _message_text(m)} for m in messages]
    meta = ctx.settings.meta_instruction
    if meta and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": meta})
    tok = engine.tokenizer
    try:
        return render(ctx.settings.chat_template or tok.chat_template, msgs,
                      add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token)
    except ChatTemplateError as e:
        raise InvalidRequest(str(e), param="messages") from None


def _token_str(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(engine: Engine, out: Output) -> p.ChoiceLogprobs | None:
    if not out.logprobs:
        return None
    content = []
    for lp in out.logprobs:
        s = _token_str(engine, lp.token_id)
        content.append(p.TokenLogprobOut(
            token=s, logprob=lp.logprob, bytes=list(s.encode()),
            top_logprobs=[p.TopLogprob(token=_token_str(engine, i), logprob=v,
                                       bytes=list(_token_str(engine, i).encode())) for i, v in lp.top]))
    return p.ChoiceLogprobs(content=content)


def _usage(outs: list[Output]) -> p.Usage:
    prompt = outs[0].prompt_tokens if outs else 0
    completion = sum(o.completion_tokens for o in outs)
    cached = outs[0].cached_tokens if outs else 0
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


async def _merged(engine: Engine, prompt_ids: list[int], params: SamplingParams, n: int,
                  session_id: int | None = None) -> AsyncIterator[tuple[int, Output]]:
    """n generations of one prompt, interleaved as their outputs arrive."""
    if n == 1:
        async for out in engine.generate(prompt_ids, params, session_id=session_id):
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, seed_params: SamplingParams):
        try:
            async for out in engine.generate(prompt_ids, seed_params):
                await q.put((i, out))
        except BaseException as e:  # surfaced to the consumer
            await q.put((i, e))

    tasks = []
    for i in range(n):
        sp = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
        tasks.append(asyncio.create_task(pump(i, sp)))
    done = 0
    try:
        while done < n:
            i, item = await q.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                done += 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Disconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


async def _unless_disconnected(request: Request, coro) -> Any:
    """Await ``coro`` unless the client disconnects first; then cancel it, which closes the
    engine streams inside and aborts their requests (the slots free at the next step).

    The body is already read by now, so the next ASGI message is the disconnect."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _Disconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def _error_body(exc: ServiceError) -> p.ErrorResponse:
    return p.ErrorResponse(error=p.ErrorDetail(message=str(exc), type=exc.type, param=exc.param,
                                               code=exc.code))


async def _sse_stream(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Mid-stream failures become one error event, then [DONE]."""
    try:
        async for chunk in gen:
            yield chunk
    except ServiceError as e:
        yield _sse(_error_body(e))
    except Exception:
        log.exception("stream failed")
        yield _sse(_error_body(ServiceError("internal error while streaming")))
    yield b"data: [DONE]\n\n"


# -- routes ------------------------------------------------------------------------------------


@get("/v1/models", summary="List served models")
async def list_models(ctx: Ctx) -> p.ModelList:
    max_len = ctx.engine.session_len if ctx.engine else None
    return p.ModelList(data=[p.ModelCard(id=ctx.settings.model_name, root=ctx.settings.model_name,
                                         max_model_len=max_len)])


@post("/v1/chat/completions", summary="Chat completion (OpenAI)", status_code=200)
async def chat_completions(data: JSONBody[p.ChatCompletionRequest], ctx: Ctx, request: Request) -> Any:
    engine = _engine(ctx)
    _check_model(ctx, data.model)
    params = p.to_sampling_params(data, ctx.settings.defaults)
    prompt_ids = engine.tokenizer.encode(chat_prompt(ctx, engine, data.messages), add_special_tokens=False)
    engine.check_prompt(len(prompt_ids), params)
    engine.check_capacity(data.n)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.settings.model_name

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        async def chunks() -> AsyncIterator[bytes]:
            finals: dict[int, Output] = {}
            started: set[int] = set()
            async for i, out in _merged(engine, prompt_ids, params, data.n):
                if i not in started:
                    started.add(i)
                    yield _sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                        p.ChatChunkChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))]))
                if out.text or out.logprobs:
                    yield _sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                        p.ChatChunkChoice(index=i, delta=p.DeltaMessage(content=out.text),
                                          logprobs=_chat_logprobs(engine, out))]))
                if out.finish_reason is not None:
                    finals[i] = out
                    yield _sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                        p.ChatChunkChoice(index=i, delta=p.DeltaMessage(), finish_reason=out.finish_reason)]))
            if include_usage:
                yield _sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                 usage=_usage([finals[i] for i in sorted(finals)])))

        return Stream(_sse_stream(chunks()), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache"})

    texts = [""] * data.n
    lps: list[list] = [[] for _ in range(data.n)]
    finals: dict[int, Output] = {}

    async def gather() -> None:
        async for i, out in _merged(engine, prompt_ids, params, data.n):
            texts[i] += out.text
            if out.logprobs:
                lps[i].extend(_chat_logprobs(engine, out).content)
            if out.finish_reason is not None:
                finals[i] = out

    await _unless_disconnected(request, gather())
    choices = [p.ChatChoice(index=i, message=p.ResponseMessage(content=texts[i]),
                            logprobs=p.ChoiceLogprobs(content=lps[i]) if params.logprobs is not None else None,
                            finish_reason=finals[i].finish_reason) for i in range(data.n)]
    return p.ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                    usage=_usage([finals[i] for i in range(data.n)]))


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


def _completion_logprobs(engine: Engine, outs: list[Output], offset: int) -> p.CompletionLogprobs:
    lp = p.CompletionLogprobs()
    for out in outs:
        for t in out.logprobs:
            s = _token_str(engine, t.token_id)
            lp.tokens.append(s)
            lp.token_logprobs.append(t.logprob)
            lp.top_logprobs.append({_token_str(engine, i): v for i, v in t.top})
            lp.text_offset.append(offset)
            offset += len(s)
    return lp


@post("/v1/completions", summary="Text completion (OpenAI)", status_code=200)
async def completions(data: JSONBody[p.CompletionRequest], ctx: Ctx, request: Request) -> Any:
    engine = _engine(ctx)
    _check_model(ctx, data.model)
    if data.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if data.logprobs is not None and not 0 <= data.logprobs <= 5:
        raise InvalidRequest(f"logprobs must be in [0, 5], got {data.logprobs}", param="logprobs")
    params = p.to_sampling_params(data, ctx.settings.defaults)
    prompts = _completion_prompts(engine, data.prompt)
    vocab = engine.tokenizer.vocab_size
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        engine.check_prompt(len(ids), params)
    engine.check_capacity(len(prompts) * data.n)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), ctx.settings.model_name

    async def run_all():
        """Yields (choice index, prompt index, Output) for every prompt x n."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(pi: int, ids: list[int]):
            try:
                async for i, out in _merged(engine, ids, params, data.n):
                    await q.put((pi * data.n + i, pi, out))
            except BaseException as e:
                await q.put((-1, pi, e))

        tasks = [asyncio.create_task(pump(pi, ids)) for pi, ids in enumerate(prompts)]
        done, total = 0, len(prompts) * data.n
        try:
            while done < total:
                idx, pi, out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                done += out.finish_reason is not None
                yield idx, pi, out
        finally:
            for t in tasks:
                t.cancel()

    def echo_text(pi: int) -> str:
        return engine.tokenizer.decode(prompts[pi]) if data.echo else ""

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        async def chunks():
            finals, echoed = {}, set()
            async for idx, pi, out in run_all():
                text = out.text
                if idx not in echoed:
                    echoed.add(idx)
                    text = echo_text(pi) + text
                lp = _completion_logprobs(engine, [out], 0) if params.logprobs is not None else None
                if text or out.finish_reason is not None or lp:
                    yield _sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[
                        p.CompletionChoice(index=idx, text=text, logprobs=lp,
                                           finish_reason=out.finish_reason)]))
                if out.finish_reason is not None:
                    finals[idx] = out
            if include_usage:
                outs = [finals[i] for i in sorted(finals)]
                usage = p.Usage(prompt_tokens=sum(len(x) for x in prompts),
                                completion_tokens=sum(o.completion_tokens for o in outs))
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield _sse(p.CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage))

        return Stream(_sse_stream(chunks()), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache"})

    total = len(prompts) * data.n
    outs: list[list[Output]] = [[] for _ in range(total)]
    prompt_of = [0] * total

    async def gather() -> None:
        async for idx, pi, out in run_all():
            outs[idx].append(out)
            prompt_of[idx] = pi

    await _unless_disconnected(request, gather())
    choices = []
    for idx in range(total):
        echo = echo_text(prompt_of[idx])
        lp = _completion_logprobs(engine, outs[idx], len(echo)) if params.logprobs is not None else None
        choices.append(p.CompletionChoice(index=idx, text=echo + "".join(o.text for o in outs[idx]),
                                          logprobs=lp, finish_reason=outs[idx][-1].finish_reason))
    completion_tokens = sum(o[-1].completion_tokens for o in outs)
    prompt_tokens = sum(len(x) for x in prompts)
    cached = sum(o[-1].cached_tokens for o in outs[::data.n])
    return p.CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=p.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached)))


@post("/v1/chat/interactive", summary="Interactive chat with server-side sessions (LMDeploy)",
      status_code=200)
async def chat_interactive(data: JSONBody[p.InteractiveRequest], ctx: Ctx, request: Request) -> Any:
    engine = _engine(ctx)
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
    params = p.to_sampling_params(data, ctx.settings.defaults)
    messages = ([p.ChatMessage(role="user", content=data.prompt)] if isinstance(data.prompt, str)
                else data.prompt)
    tok = engine.tokenizer
    history = engine.session_history(sid) if (sid != -1 and data.interactive_mode) else []
    if not data.interactive_mode and sid != -1:
        engine.end_session(sid)
    if history:
        # Only the new turn's tokens are sent: render [user, assistant, this turn] and keep the
        # text after the assistant's content, i.e. how the template closes a reply and opens the
        # next user turn. The reply's closing EOS is already in the history when it stopped on it.
        marker = "\x00xlaserve-turn\x00"
        convo = [p.ChatMessage(role="user", content="x"), p.ChatMessage(role="assistant", content=marker),
                 *messages]
        turn = chat_prompt(ctx, engine, convo).split(marker, 1)[1]
        if history[-1] in tok.eos_ids and tok.eos_token and turn.startswith(tok.eos_token):
            turn = turn[len(tok.eos_token):]
        prompt_ids = tok.encode(turn, add_special_tokens=False)
    else:
        prompt_ids = tok.encode(chat_prompt(ctx, engine, messages), add_special_tokens=False)
    session = sid if (sid != -1 and data.interactive_mode) else None
    engine.check_capacity()

    async def results() -> AsyncIterator[Output]:
        async for _, out in _merged(engine, prompt_ids, params, 1, session_id=session):
            yield out

    if data.stream:
        async def lines():
            try:
                async for out in results():
                    yield msgspec.json.encode(p.InteractiveResponse(
                        text=out.text, tokens=out.completion_tokens, input_tokens=len(prompt_ids),
                        history_tokens=len(history), finish_reason=out.finish_reason)) + b"\n"
            except ServiceError as e:
                yield msgspec.json.encode(_error_body(e)) + b"\n"

        return Stream(lines(), media_type="application/x-ndjson")
    text, last = "", None

    async def gather() -> None:
        nonlocal text, last
        async for out in results():
            text += out.text
            last = out

    await _unless_disconnected(request, gather())
    return p.InteractiveResponse(text=text, tokens=last.completion_tokens, input_tokens=len(prompt_ids),
                                 history_tokens=len(history), finish_reason=last.finish_reason)


@post("/v1/tokenize", summary="Tokenize a prompt or chat messages", status_code=200)
async def tokenize(data: JSONBody[p.TokenizeRequest], ctx: Ctx) -> p.TokenizeResponse:
    engine = _engine(ctx)
    _check_model(ctx, data.model)
    if data.messages is not None:
        ids = engine.tokenizer.encode(chat_prompt(ctx, engine, data.messages), add_special_tokens=False)
    elif data.prompt is not None:
        ids = engine.tokenizer.encode(data.prompt, add_special_tokens=data.add_special_tokens)
    else:
        raise InvalidRequest("give prompt or messages", param="prompt")
    return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.session_len)


@post("/v1/detokenize", summary="Detokenize token ids", status_code=200)
async def detokenize(data: JSONBody[p.DetokenizeRequest], ctx: Ctx) -> p.DetokenizeResponse:
    engine = _engine(ctx)
    _check_model(ctx, data.model)
    vocab = engine.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in data.tokens):
        raise InvalidRequest(f"token ids must be in [0, {vocab})", param="tokens")
    return p.DetokenizeResponse(prompt=engine.tokenizer.decode(data.tokens, skip_special_tokens=False))


@post("/v1/encode", summary="Encode text to token ids (LMDeploy)", status_code=200)
async def encode(data: JSONBody[p.EncodeRequest], ctx: Ctx) -> p.EncodeResponse:
    engine = _engine(ctx)

    def one(text: str) -> list[int]:
        if data.do_preprocess:
            text = chat_prompt(ctx, engine, [p.ChatMessage(role="user", content=text)])
            return engine.tokenizer.encode(text, add_special_tokens=False)
        return engine.tokenizer.encode(text, add_special_tokens=data.add_bos)

    if isinstance(data.input, str):
        ids = one(data.input)
        return p.EncodeResponse(input_ids=ids, length=len(ids))
    all_ids = [one(t) for t in data.input]
    return p.EncodeResponse(input_ids=all_ids, length=[len(x) for x in all_ids])


@get("/health", summary="Readiness", opt={"public": True})
async def health(ctx: Ctx) -> Response:
    if ctx.engine is None:
        return Response({"status": "loading"}, status_code=503)
    if not ctx.engine.is_alive():
        return Response({"status": "engine stalled"}, status_code=503)
    return Response({"status": "ok"}, status_code=200)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: Ctx) -> Response:
    engine = _engine(ctx)
    return Response(engine.metrics.render(engine), media_type=CONTENT_TYPE)


# -- errors, auth, app -------------------------------------------------------------------------


def _error_response(status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> Response:
    body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=type_, param=param, code=code))
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


def _error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, _Disconnected):  # nobody is listening; the log says what happened
        log.info("client left before the answer to %s was ready; request aborted", request.url.path)
        return _error_response(499, "client closed the request", "invalid_request_error")
    if isinstance(exc, ServiceError):
        return _error_response(exc.status, str(exc), exc.type, exc.param, exc.code)
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        detail = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in extra)
        param = None
        for e in extra:
            if isinstance(e, dict) and e.get("key"):
                param = str(e["key"]).removeprefix("$.")
                break
        msg = f"{exc.detail}: {detail}" if detail else str(exc.detail)
        return _error_response(400, msg, "invalid_request_error", param)
    if isinstance(exc, NotFoundException):
        return _error_response(404, f"no route {request.method} {request.url.path}", "invalid_request_error")
    if isinstance(exc, HTTPException):
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(500, "internal server error", "internal_error")


def _auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    settings: ServerSettings = connection.app.state.xla.settings
    if not settings.api_keys or handler.opt.get("public"):
        return
    header = connection.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in settings.api_keys):
        raise Unauthorized("invalid or missing API key (send 'Authorization: Bearer <key>')")


def _swagger_static():
    import swagger_ui_bundle

    return create_static_files_router(path="/static/swagger",
                                      directories=[Path(swagger_ui_bundle.swagger_ui_path)],
                                      opt={"public": True}, include_in_schema=False)


def create_app(ctx: State, lifespan: list | None = None) -> Litestar:
    settings = ctx.settings
    cors = None
    if settings.allow_origins:
        cors = CORSConfig(allow_origins=list(settings.allow_origins),
                          allow_credentials=settings.allow_credentials,
                          allow_methods=list(settings.allow_methods),
                          allow_headers=list(settings.allow_headers))
    openapi = OpenAPIConfig(
        title="xlaserve", version="0.1.0", path="/",
        render_plugins=[SwaggerRenderPlugin(path="/", js_url="/static/swagger/swagger-ui-bundle.js",
                                            css_url="/static/swagger/swagger-ui.css",
                                            standalone_preset_js_url="/static/swagger/swagger-ui-standalone-preset.js",
                                            favicon="<link rel='icon' type='image/png' "
                                                    "href='/static/swagger/favicon-32x32.png'>")],
    )
    app = Litestar(
        route_handlers=[list_models, chat_completions, completions, chat_interactive, tokenize,
                        detokenize, encode, health, metrics, _swagger_static()],
        dependencies={"ctx": Provide(lambda: app.state.xla, sync_to_thread=False)},
        exception_handlers={Exception: _error_handler, HTTPException: _error_handler,
                            NotFoundException: _error_handler, 404: _error_handler, 405: _error_handler},
        guards=[_auth_guard],
        cors_config=cors,
        openapi_config=openapi,
        lifespan=lifespan or [],
        request_max_body_size=8 * 1024 * 1024,
    )
    app.state.xla = ctx
    return app
