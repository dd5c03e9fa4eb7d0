"""Wire types of OpenAI's Responses API (``POST /v1/responses``; see
https://platform.openai.com/docs/api-reference/responses) and their translation to the chat
path: a request becomes a ``ChatCompletionRequest`` over the stored conversation it continues.
Never imports jax.

Served: ``input`` (a string, or message, ``function_call``, ``function_call_output`` and
``reasoning`` items), ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``,
``top_logprobs``, function ``tools`` and ``tool_choice``, ``parallel_tool_calls``,
``text.format`` (json_schema, json_object), ``stream``, ``store``, ``previous_response_id``
and ``metadata`` (echoed back); extensions as on chat: ``seed``, ``stop``, ``top_k``,
``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``.
No-ops: ``reasoning`` (the model reasons as its template has it), ``text.verbosity``,
``user``, ``safety_identifier``, ``prompt_cache_key`` (the prefix cache needs no key),
``service_tier`` (auto/default), ``stream_options``, ``include`` of
``reasoning.encrypted_content`` (reasoning is returned in clear) and of
``message.output_text.logprobs`` (``top_logprobs`` turns logprobs on).
Refused with a 400 naming them: ``background``, ``conversation``, ``prompt``,
``max_tool_calls``, ``truncation: auto``, tools other than functions, files and images by file_id.
"""

from __future__ import annotations

import uuid
from typing import Any, Union

import msgspec

from service import protocol as p
from service.errors import InvalidRequest

_Req, _Resp = p._Req, p._Resp


class InputContent(_Req):
    """A content part: input_text, output_text (an earlier answer passed back), text, refusal,
    input_image (a user message's: ``image_url`` a data: or http(s) URL; ``detail`` a no-op)."""

    type: str
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputItem(_Req):
    """One item of ``input``: a message (``type`` "message" or left out), a ``function_call``
    an earlier answer made, its ``function_call_output``, or a ``reasoning`` item."""

    type: str = "message"
    role: str | None = None
    content: Union[str, list[InputContent], None] = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Union[str, list[InputContent], None] = None
    summary: list[Any] | None = None
    encrypted_content: str | None = None


class ResponsesTool(_Req):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments are always enforced by a grammar when constrained


class ToolChoiceFunction(_Req):
    type: str
    name: str | None = None


class TextFormat(_Req):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Req):
    format: TextFormat | None = None
    verbosity: str | None = None  # no-op


class ReasoningConfig(_Req):
    effort: str | None = None  # no-op
    summary: str | None = None  # no-op
    generate_summary: str | None = None  # no-op


INCLUDABLE = ("reasoning.encrypted_content", "message.output_text.logprobs")


class ResponsesRequest(_Req):
    input: Union[str, list[InputItem]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Union[str, ToolChoiceFunction, None] = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # no-op (obfuscation padding is not sent)
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    # refused when set
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    # extensions, as on chat
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def input_items(self) -> list[dict[str, Any]]:
        """``input`` as OpenAI lists a response's input items: each item with an id, a message's
        text as content parts, fields not sent left out."""
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        out = []
        for item in items:
            d = {"type": item.type, **{k: v for k, v in msgspec.to_builtins(item).items() if v is not None}}
            if item.type == "message" and isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                d["content"] = [{"type": kind, "text": item.content}]
            prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                      "reasoning": "rs"}.get(item.type, "item")
            d.setdefault("id", f"{prefix}_{uuid.uuid4().hex}")
            out.append(d)
        return out

    def check_fields(self) -> None:
        for name, why in (("background", "background responses are not served; send the request and wait"),
                          ("conversation", "conversations are not stored; use previous_response_id"),
                          ("prompt", "stored prompt templates are not served; send input"),
                          ("max_tool_calls", "max_tool_calls is not served")):
            if getattr(self, name) not in (None, False):
                raise InvalidRequest(f"{name}: {why}", param=name)
        if self.truncation not in (None, "disabled"):
            raise InvalidRequest("truncation: only 'disabled' is served (the input is never cut)",
                                 param="truncation")
        for item in self.include or ():
            if item not in INCLUDABLE:
                raise InvalidRequest(f"include: {item!r} is not served ({', '.join(INCLUDABLE)})", param="include")
        if self.service_tier not in (None, "auto", "default"):
            raise InvalidRequest(f"service_tier {self.service_tier!r} is not served (auto or default)",
                                 param="service_tier")

    def to_chat(self, prior: list[p.ChatMessage]) -> p.ChatCompletionRequest:
        """The chat request this one asks for, continuing the conversation ``prior`` (a stored
        response's, without its instructions: as in OpenAI's API, they do not carry over)."""
        self.check_fields()
        messages = ([p.ChatMessage(role="system", content=self.instructions)] if self.instructions else [])
        messages += prior + input_messages(self.input)
        return p.ChatCompletionRequest(
            messages=messages, model=self.model, temperature=self.temperature, top_p=self.top_p,
            max_completion_tokens=self.max_output_tokens, logprobs=self.top_logprobs is not None,
            top_logprobs=self.top_logprobs, tools=self._tools(), tool_choice=self._tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls, response_format=self._format(), seed=self.seed,
            stop=self.stop, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias)

    def _tools(self) -> list[p.Tool] | None:
        if not self.tools:
            return None
        out = []
        for i, t in enumerate(self.tools):
            if t.type != "function":
                raise InvalidRequest(f"tools[{i}].type {t.type!r} is not served (function tools only)",
                                     param="tools")
            if not t.name:
                raise InvalidRequest(f"tools[{i}] needs a name", param="tools")
            out.append(p.Tool(type="function", function=p.FunctionDef(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)))
        return out

    def _tool_choice(self) -> Union[str, p.NamedToolChoice, None]:
        tc = self.tool_choice
        if tc is None or isinstance(tc, str):
            return tc
        if tc.type != "function" or not tc.name:
            raise InvalidRequest(f"tool_choice type {tc.type!r} is not served (none, auto, required or "
                                 "{\"type\": \"function\", \"name\": ...})", param="tool_choice")
        return p.NamedToolChoice(type="function", function=p.FunctionName(name=tc.name))

    def _format(self) -> p.ResponseFormat | None:
        f = self.text.format if self.text is not None else None
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return p.ResponseFormat(type="json_object")
        if f.type == "json_schema":
            if f.schema is None:
                raise InvalidRequest("text.format json_schema needs a schema", param="text.format")
            return p.ResponseFormat(type="json_schema", json_schema=p.JsonSchemaFormat(
                name=f.name or "response", schema=f.schema, description=f.description, strict=f.strict))
        raise InvalidRequest(f"text.format type {f.type!r} is not served (text, json_object, json_schema)",
                             param="text.format")


def _text_of(content: Union[str, list[InputContent], None], where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type in ("input_text", "output_text", "text", "reasoning_text", "summary_text"):
            parts.append(part.text or "")
        elif part.type == "refusal":
            parts.append(part.refusal or part.text or "")
        else:
            raise InvalidRequest(f"{where}: content type {part.type!r} is not served (text only)", param="input")
    return "".join(parts)


def _with_images(content: list[InputContent], where: str) -> str | list[p.ContentPart]:
    """A user message's parts, its input_image items as chat image_url parts (text alone when
    it has none)."""
    if not any(part.type == "input_image" for part in content):
        return _text_of(content, where)
    parts = []
    for i, part in enumerate(content):
        if part.type == "input_image":
            if not part.image_url:
                raise InvalidRequest(f"{where}.content[{i}]: input_image needs image_url (file_id is not served)",
                                     param="input")
            parts.append(p.ContentPart(type="image_url", image_url=p.ImageURL(url=part.image_url, detail=part.detail)))
        else:
            parts.append(p.ContentPart(type="text", text=_text_of([part], where)))
    return parts


def input_messages(items: Union[str, list[InputItem]]) -> list[p.ChatMessage]:
    """``input`` as chat messages: consecutive function calls join one assistant message (with
    any text it began with), their outputs become tool messages, and a reasoning item's text
    goes with the assistant message that follows it."""
    if isinstance(items, str):
        return [p.ChatMessage(role="user", content=items)]
    if not items:
        raise InvalidRequest("input must not be empty", param="input")
    out: list[p.ChatMessage] = []
    thought: str | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}.role {item.role!r} is not one of user, system, developer, assistant",
                                     param="input")
            content = (_with_images(item.content, where) if item.role == "user" and isinstance(item.content, list)
                       else _text_of(item.content, where))
            out.append(p.ChatMessage(role=item.role, content=content,
                                     reasoning_content=thought if item.role == "assistant" else None))
            thought = None if item.role == "assistant" else thought
        elif item.type == "function_call":
            if not item.call_id or not item.name:
                raise InvalidRequest(f"{where}: a function_call needs call_id and name", param="input")
            call = p.ToolCallIn(id=item.call_id, function=p.FunctionCall(name=item.name,
                                                                         arguments=item.arguments or "{}"))
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and (last.tool_calls or not thought):
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(p.ChatMessage(role="assistant", content=None, tool_calls=[call],
                                         reasoning_content=thought))
                thought = None
        elif item.type == "function_call_output":
            if not item.call_id:
                raise InvalidRequest(f"{where}: a function_call_output needs call_id", param="input")
            out.append(p.ChatMessage(role="tool", tool_call_id=item.call_id, content=_text_of(item.output, where)))
        elif item.type == "reasoning":
            thought = (thought or "") + _text_of(item.content, where)
        else:
            raise InvalidRequest(f"{where}.type {item.type!r} is not served (message, function_call, "
                                 "function_call_output, reasoning)", param="input")
    return out


# -- responses ---------------------------------------------------------------------------------


class OutputText(_Resp):
    text: str
    type: str = "output_text"
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] | None = None


class ReasoningText(_Resp):
    text: str
    type: str = "reasoning_text"


class MessageItem(_Resp):
    id: str
    content: list[OutputText]
    type: str = "message"
    role: str = "assistant"
    status: str = "in_progress"


class ReasoningItem(_Resp):
    id: str
    content: list[ReasoningText]
    type: str = "reasoning"
    summary: list[Any] = msgspec.field(default_factory=list)
    status: str = "in_progress"


class FunctionCallItem(_Resp):
    id: str
    call_id: str
    name: str
    arguments: str
    type: str = "function_call"
    status: str = "in_progress"


class InputTokensDetails(_Resp):
    cached_tokens: int = 0
    # Tokens written to a paid prompt cache: none here (every computed block is cached as a
    # matter of course, at no extra cost), but the SDK's type requires the field.
    cache_write_tokens: int = 0


class OutputTokensDetails(_Resp):
    reasoning_tokens: int = 0


class ResponseUsage(_Resp):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseObject(_Resp):
    id: str
    created_at: int
    model: str
    object: str = "response"
    status: str = "in_progress"
    output: list[Any] = msgspec.field(default_factory=list)
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[Any] = msgspec.field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] = msgspec.field(default_factory=lambda: {"effort": None, "summary": None})
    truncation: str = "disabled"
    store: bool = True
    background: bool = False
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None

    def output_text(self) -> str:
        return "".join(c.text for item in self.output if isinstance(item, MessageItem) for c in item.content)


class InputItemList(_Resp):
    """A stored response's input items, a page of them (``GET /v1/responses/{id}/input_items``)."""

    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
    object: str = "list"


class ResponseDeleted(_Resp):
    id: str
    object: str = "response.deleted"
    deleted: bool = True
