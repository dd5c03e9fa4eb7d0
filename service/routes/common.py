"""What the route modules share: the injected state, prompt building, the fan-in of several
generations into one stream, the usage builder, SSE framing and disconnect handling."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable

import msgspec
from litestar import Request
from litestar.di import NamedDependency
from litestar.response import Stream

from model.chat_template import ChatTemplateError, render
from service import protocol as p
from service.chat import conversation
from service.engine import Engine, Output
from service.errors import InvalidRequest, ModelNotFound, NotReady, ServiceError
from service.media import MediaSettings
from service.params import SamplingParams
from service.routes.store import ResponseStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    api_keys: tuple[str, ...] = ()
    chat_template: str | None = None  # overrides the checkpoint's
    meta_instruction: str | None = None  # default system prompt
    defaults: SamplingParams = SamplingParams()
    default_fields: frozenset[str] = frozenset()  # the fields of ``defaults`` the configuration set
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    stall_timeout: float = 120.0  # /health fails when pending work made no progress this long
    tool_call_parser: str | None = None  # None: the format the chat template teaches
    reasoning_parser: str | None = None  # "qwen3" | "deepseek-r1": <think> goes to reasoning_content
    responses_store: int = 1024  # finished Responses kept for previous_response_id (LRU)
    # (pooling, normalize) when the server was started for embeddings (--task embed, or an
    # embedding checkpoint); the generation routes are then refused.
    embedding: tuple[str, bool] | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # /v1/models' "created"
    runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter are served
    sleep_mode: bool = False  # /sleep, /wakeup, /is_sleeping are served
    weight_updates: bool = False  # /update_weights, /pause, /resume, /abort_request are served
    media: MediaSettings = MediaSettings()  # where images may come from, and how many


@dataclasses.dataclass
class State:
    """What handlers need; ``engine`` is None while the model loads."""

    settings: ServerSettings
    engine: Engine | None = None
    responses: ResponseStore | None = None  # made from the settings

    def __post_init__(self):
        if self.responses is None:
            self.responses = ResponseStore(self.settings.responses_store)


Ctx = NamedDependency[State]  # injected into every handler as ``ctx``


class OwnTypeStream(Stream):
    """A stream that keeps its own media type. Litestar 2 gives a streamed response its route's
    media type (JSON by default) over the one the response names, so without this an event
    stream went out as ``application/json``, which a gateway or browser then does not treat as
    server-sent events."""

    def to_asgi_response(self, *args, **kwargs):
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def require_engine(ctx: State) -> Engine:
    if ctx.engine is None:
        raise NotReady("the model is still loading; retry shortly")
    return ctx.engine


def require_generation(ctx: State) -> Engine:
    """The engine, unless this server was started for embeddings only."""
    if ctx.settings.embedding is not None:
        raise InvalidRequest(f"this server serves embeddings (--task embed): {ctx.settings.model_name} is not "
                             "served for generation here; use /v1/embeddings, or start a server with --task generate",
                             param="model")
    return require_engine(ctx)


def check_model(ctx: State, model: str | None) -> str | None:
    """The LoRA adapter a request's ``model`` names (None: the base model); ModelNotFound when
    it names neither the base model nor a loaded adapter."""
    if model is None or model == ctx.settings.model_name:
        return None
    adapters = ctx.engine.adapters if ctx.engine is not None else None
    if adapters is not None and model in adapters:
        return model
    raise ModelNotFound(f"The model '{model}' does not exist; this server serves '{ctx.settings.model_name}'"
                        + (f" and the adapters {', '.join(repr(a.name) for a in adapters.loaded())}"
                           if adapters is not None and adapters.loaded() else ""))


def with_adapter(params: SamplingParams, adapter: str | None) -> SamplingParams:
    return params if adapter is None else dataclasses.replace(params, adapter=adapter)


# -- prompts -----------------------------------------------------------------------------------


def chat_prompt(ctx: State, engine: Engine, messages: list[p.ChatMessage], tools: Any = None,
                template_kwargs: dict | None = None) -> str:
    """The rendered prompt of a conversation (``tools``: the request's ``chat.ToolPlan``)."""
    msgs, extra = conversation(messages, tools)
    meta = ctx.settings.meta_instruction
    if meta and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": meta})
    tok = engine.tokenizer
    kwargs = {**(template_kwargs or {}), **extra}
    for reserved in ("messages", "add_generation_prompt", "bos_token", "eos_token"):
        if reserved in kwargs:
            raise InvalidRequest(f"chat_template_kwargs may not set {reserved!r}", param="chat_template_kwargs")
    try:
        return render(chat_template(ctx, engine), msgs, add_generation_prompt=True, bos_token=tok.bos_token,
                      eos_token=tok.eos_token, **kwargs)
    except ChatTemplateError as e:
        raise InvalidRequest(str(e), param="messages") from None


def chat_template(ctx: State, engine: Engine) -> str | None:
    return ctx.settings.chat_template or engine.tokenizer.chat_template


def chat_ids(ctx: State, engine: Engine, messages: list[p.ChatMessage], tools: Any = None,
             template_kwargs: dict | None = None) -> list[int]:
    return engine.tokenizer.encode(chat_prompt(ctx, engine, messages, tools, template_kwargs),
                                   add_special_tokens=False)


def session_turn_ids(ctx: State, engine: Engine, messages: list[p.ChatMessage], history: list[int]) -> list[int]:
    """The tokens of a session's next turn, to follow ``history`` in the cache.

    Only the new turn's tokens are sent: render [user, assistant, this turn] and keep the text
    after the assistant's content, i.e. how the template closes a reply and opens the next
    user turn. The reply's closing EOS is already in the history when it stopped on it."""
    if not history:
        return chat_ids(ctx, engine, messages)
    tok = engine.tokenizer
    marker = "\x00xlaserve-turn\x00"
    convo = [p.ChatMessage(role="user", content="x"), p.ChatMessage(role="assistant", content=marker), *messages]
    rendered = chat_prompt(ctx, engine, convo)
    if marker not in rendered:
        raise InvalidRequest("this model's chat template leaves earlier assistant replies out of the prompt, so "
                             "a session's history cannot be continued token for token; send the whole "
                             "conversation to /v1/chat/completions, or interactive_mode: false",
                             param="interactive_mode")
    turn = rendered.split(marker, 1)[1]
    if history[-1] in tok.eos_ids and tok.eos_token and turn.startswith(tok.eos_token):
        turn = turn[len(tok.eos_token):]
    return tok.encode(turn, add_special_tokens=False)


# -- results -----------------------------------------------------------------------------------


def usage(finals: list[Output], n: int = 1) -> p.Usage:
    """Usage of choices ``finals`` (their last Outputs, in choice order), ``n`` choices per
    prompt: each prompt's tokens count once."""
    per_prompt = finals[::n]
    prompt = sum(o.prompt_tokens for o in per_prompt)
    completion = sum(o.completion_tokens for o in finals)
    out = p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                  prompt_tokens_details=p.PromptTokensDetails(cached_tokens=sum(o.cached_tokens for o in per_prompt)))
    predicted = [o.prediction_tokens for o in finals if o.prediction_tokens is not None]
    if predicted:
        out.completion_tokens_details = p.CompletionTokensDetails(
            accepted_prediction_tokens=sum(a for a, _ in predicted), rejected_prediction_tokens=sum(r for _, r in predicted))
    return out


async def fan_in(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 session_id: int | None = None, request_id: str | None = None,
                 images: list = ()) -> AsyncIterator[tuple[int, Output]]:
    """``n`` generations of each prompt, interleaved as their outputs arrive, as (choice index,
    Output); choice ``k * n + i`` is prompt k's sample i (seeded ``seed + i``). ``request_id``:
    the engine's id of a single generation, or ``request_id/index`` of each (``Engine.abort``
    of ``request_id`` ends them all). ``images``: a single prompt's."""
    if len(prompts) == 1 and n == 1:
        async for out in engine.generate(prompts[0], params, session_id=session_id, request_id=request_id,
                                         images=images):
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], sample_params: SamplingParams):
        try:
            rid = None if request_id is None else f"{request_id}/{index}"
            async for out in engine.generate(ids, sample_params, request_id=rid, images=images):
                await q.put((index, out))
        except asyncio.CancelledError:  # the consumer is done with us
            raise
        # Expected: a ServiceError (refused, overloaded, the engine failed). Anything else is a
        # bug, and must still reach the consumer (it re-raises, the app answers 500 and logs
        # it): a pump that died on its own would leave the consumer waiting forever.
        except Exception as e:
            await q.put((index, e))

    tasks = []
    for k, ids in enumerate(prompts):
        for i in range(n):
            sp = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            tasks.append(asyncio.create_task(pump(k * n + i, ids, sp)))
    done = 0
    try:
        while done < len(tasks):
            index, item = await q.get()
            if isinstance(item, BaseException):
                raise item
            done += item.finish_reason is not None
            yield index, item
    finally:
        for t in tasks:
            t.cancel()


class Disconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


async def unless_disconnected(request: Request, coro) -> Any:
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
        raise Disconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def error_body(exc: ServiceError) -> p.ErrorResponse:
    return p.ErrorResponse(error=p.ErrorDetail(message=str(exc), type=exc.type, param=exc.param, code=exc.code))


async def guarded(gen: AsyncIterator[bytes], fail: Callable[[ServiceError], bytes],
                  done: Callable[[], None] = lambda: None) -> AsyncIterator[bytes]:
    """Every route's stream-error policy: once a stream has begun, an in-band event is all a
    client can get, so a ``ServiceError`` becomes the route's error event (``fail``), and
    anything else (a bug) is logged with its traceback and becomes the same event with a
    generic message. ``done`` runs when the stream ended without one."""
    try:
        async for chunk in gen:
            yield chunk
    except ServiceError as e:
        yield fail(e)
        return
    except Exception:
        log.exception("stream failed")
        yield fail(ServiceError("internal error while streaming"))
        return
    done()


async def sse_stream(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An OpenAI event stream: a failure becomes one error event; [DONE] ends it either way."""
    async for chunk in guarded(gen, lambda e: sse(error_body(e))):
        yield chunk
    yield b"data: [DONE]\n\n"
