"""One chat generation, shared by every route that speaks chat (chat completions, Responses,
Anthropic's Messages): the request checked and rendered into a prompt with its grammar, then
its answers as typed pieces (reasoning, content, tool calls) as they stream. Each route only
translates its wire format to a ``ChatCompletionRequest`` and these pieces back to its own."""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Callable

from litestar import Request

from service import protocol as p
from service import structured
from model.vision import expand_prompt
from service import media
from service.chat import Answer, ToolPlan, image_urls, tool_plan
from service.engine import Engine, Output
from service.errors import InvalidRequest, ServiceError
from service.params import SamplingParams
from service.parsers import ReasoningParser, ToolCall
from service.routes.common import (OwnTypeStream, State, chat_prompt, chat_template, check_model, fan_in, guarded,
                                   require_generation, unless_disconnected, with_adapter)
from service.structured import GrammarError


def check_grammar(engine: Engine, grammar: str | None, param: str) -> None:
    """Compile a request's grammar now (cached by its text), so a bad one is a 400 here."""
    if grammar is None:
        return
    try:
        engine.grammars.check(grammar)
    except GrammarError as e:
        raise InvalidRequest(f"{param}: {e}", param=param) from None


@dataclasses.dataclass
class Piece:
    """The next part of answer ``index``: its new reasoning and content text, the tool calls
    completed by it, and the engine's Output it came from (finish, usage, logprobs)."""

    index: int
    thought: str
    content: str
    calls: list[ToolCall]
    out: Output

    @property
    def final(self) -> bool:
        return self.out.finish_reason is not None


@dataclasses.dataclass
class ChatRun:
    engine: Engine
    prompt_ids: list[int]
    params: SamplingParams
    plan: ToolPlan
    answers: list[Answer]
    request_id: str | None = None  # the engine's id of it (``Engine.abort`` ends every answer)
    images: list = dataclasses.field(default_factory=list)  # its prompt's (service.engine.images.Image)

    async def pieces(self) -> AsyncIterator[Piece]:
        async for i, out in fan_in(self.engine, [self.prompt_ids], self.params, len(self.answers),
                                   request_id=self.request_id, images=self.images):
            thought, content, calls = self.answers[i].feed(out.text, final=out.finish_reason is not None)
            yield Piece(i, thought, content, calls, out)

    def event_stream(self, start: list[bytes], feed: Callable[[Piece], list[bytes]],
                     fail: Callable[[ServiceError], bytes], done: Callable[[], None] = lambda: None) -> OwnTypeStream:
        """A typed event stream (Responses', Messages'): the ``start`` events, then what ``feed``
        makes of each piece; a failure once it has begun ends it with ``fail``'s event."""
        async def events() -> AsyncIterator[bytes]:
            for e in start:
                yield e
            async for piece in self.pieces():
                for e in feed(piece):
                    yield e

        return OwnTypeStream(guarded(events(), fail, done), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

    async def gather(self, request: Request, feed: Callable[[Piece], Any]) -> None:
        """Feed every piece of a whole (not streamed) answer, aborted if the client leaves."""
        async def run() -> None:
            async for piece in self.pieces():
                feed(piece)

        await unless_disconnected(request, run())


async def prepare_chat(ctx: State, data: p.ChatCompletionRequest, format_param: str = "response_format") -> ChatRun:
    """Everything a chat request needs before it runs, every check done (so a bad request is a
    400 before anything streams): sampling settings, tools, its images read, the prompt, its
    grammar. ``format_param``: the route's own name of the response format (errors name it)."""
    images = await load_images(ctx, data.messages)
    try:
        return _prepare_chat(ctx, data, images)
    except InvalidRequest as e:
        if e.param != "response_format" or format_param == "response_format":
            raise
        raise InvalidRequest(str(e).replace("response_format", format_param), param=format_param) from None


async def load_images(ctx: State, messages: list[p.ChatMessage]) -> list:
    """The conversation's images, read and preprocessed for the model's vision tower; refused
    when the model takes none."""
    urls = image_urls(messages)
    if not urls:
        return []
    engine = require_generation(ctx)
    if engine.runner.vision is None or engine.image_processor is None:
        raise InvalidRequest("this model takes no images (text only)", param="messages")
    return await media.load(urls, ctx.settings.media, engine.image_processor)


def _prepare_chat(ctx: State, data: p.ChatCompletionRequest, images: list) -> ChatRun:
    engine = require_generation(ctx)
    adapter = check_model(ctx, data.model)
    params = with_adapter(data.to_sampling_params(ctx.settings.defaults), adapter)
    template = chat_template(ctx, engine)
    plan = tool_plan(data, template, ctx.settings.tool_call_parser)
    if data.prompt_token_ids is not None:  # rendered by the caller: the tokens are the prompt
        if data.messages:
            raise InvalidRequest("give messages or prompt_token_ids, not both", param="prompt_token_ids")
        if engine.runner.vision is not None and engine.runner.vision[0].image_token_id in data.prompt_token_ids:
            raise InvalidRequest("prompt_token_ids may not hold image tokens: send images in messages",
                                 param="prompt_token_ids")
        prompt_ids = list(data.prompt_token_ids)
        prompt = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    else:
        prompt = chat_prompt(ctx, engine, data.messages, plan, data.chat_template_kwargs)
        if images:
            prompt = expand_prompt(prompt, engine.runner.vision[0],
                                   lambda i: engine.tokenizer.decode([i], skip_special_tokens=False))
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    for t in plan.tools:  # a tool whose parameters schema does not compile is refused
        try:
            check_grammar(engine, structured.json_schema_grammar(t["parameters"]), "tools")
        except GrammarError as e:
            raise InvalidRequest(f"tools: function {t['name']!r}: {e}", param="tools") from None
    tool_grammar = plan.grammar()
    grammar = tool_grammar or params.grammar
    check_grammar(engine, grammar, "tools" if tool_grammar else "response_format")
    think = ctx.settings.reasoning_parser

    def reasoning():
        return ReasoningParser.named(think, prompt) if think else None

    if grammar is not None:
        # A grammar starts after the reasoning block, unless the prompt already closed it.
        r = reasoning()
        params = dataclasses.replace(params, grammar=grammar,
                                     grammar_after=ReasoningParser.end if r is not None and not r.done else None)
    if data.prediction is not None:
        params = dataclasses.replace(params, prediction=tuple(
            engine.tokenizer.encode(data.prediction.text(), add_special_tokens=False)))
    engine.check_submit([prompt_ids], params, data.n, images)
    return ChatRun(engine, prompt_ids, params, plan, [Answer(plan, reasoning()) for _ in range(data.n)],
                   images=images)
