"""Wire types of Anthropic's Messages API (``POST /v1/messages``; see
https://docs.anthropic.com/en/api/messages) and their translation to the chat path. Never
imports jax.

Served: ``system`` (a string or text blocks), ``messages`` with text, ``tool_use``,
``tool_result`` and ``thinking`` blocks, ``max_tokens`` (required), ``stop_sequences``,
``temperature``, ``top_p``, ``top_k``, ``stream``, ``tools`` (``input_schema``),
``tool_choice`` (auto, any, tool, none; ``disable_parallel_tool_use``) and
``output_config.format`` (a JSON schema the answer must match); ``seed`` as an extension.
No-ops: ``metadata``, ``cache_control`` (the prefix cache works without breakpoints),
``thinking`` and ``output_config.effort`` (a model with a ``--reasoning-parser`` returns
thinking blocks; their length is the model's own), ``service_tier``, ``speed``,
``inference_geo``, ``user_profile_id``, ``workspace_id``. Image blocks in user messages (``base64``
and ``url`` sources) go to a model that takes images. Refused with a 400 naming them:
documents, server tools, ``container`` and ``mcp_servers``.
"""

from __future__ import annotations

import json
from typing import Any, Union

import msgspec

from service import protocol as p
from service.errors import InvalidRequest

_Req, _Resp = p._Req, p._Resp


class Block(_Req):
    """A content block of a message: text, image (a user's), tool_use, tool_result, thinking
    (or, refused, document)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: Union[str, list["Block"], None] = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking
    source: Any = None
    citations: Any = None
    cache_control: Any = None  # no-op


class MessageParam(_Req):
    role: str
    content: Union[str, list[Block]]


class AnthropicTool(_Req):
    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None  # "custom" or left out; server tools are refused
    cache_control: Any = None  # no-op


class AnthropicToolChoice(_Req):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(_Req):
    type: str
    schema: dict[str, Any] | None = None


class OutputConfig(_Req):
    format: OutputFormat | None = None  # structured output: enforced by a grammar
    effort: str | None = None  # no-op


class MessagesRequest(_Req):
    messages: list[MessageParam]
    model: str | None = None
    max_tokens: int | None = None  # required on /v1/messages, not on count_tokens
    system: Union[str, list[Block], None] = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None  # no-op
    thinking: dict[str, Any] | None = None  # no-op
    service_tier: str | None = None  # no-op
    output_config: OutputConfig | None = None
    cache_control: Any = None  # no-op
    speed: str | None = None  # no-op
    inference_geo: str | None = None  # no-op
    user_profile_id: str | None = None  # no-op
    workspace_id: str | None = None  # no-op
    container: Any = None  # refused
    mcp_servers: Any = None  # refused
    seed: int | None = None  # extension

    def to_chat(self, generate: bool = True) -> p.ChatCompletionRequest:
        """The chat request this one asks for (``generate`` False: only its prompt is needed,
        as for count_tokens)."""
        for name in ("container", "mcp_servers"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"{name} is not served", param=name)
        if generate and self.max_tokens is None:
            raise InvalidRequest("max_tokens: field required", param="max_tokens")
        messages = []
        if self.system is not None:
            system = self.system if isinstance(self.system, str) else _text(self.system, "system")
            messages.append(p.ChatMessage(role="system", content=system))
        for i, m in enumerate(self.messages):
            messages += _messages(m, f"messages[{i}]")
        choice, parallel = self._tool_choice()
        return p.ChatCompletionRequest(
            messages=messages, model=self.model, max_tokens=self.max_tokens, stop=self.stop_sequences,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            tools=self._tools(), tool_choice=choice, parallel_tool_calls=parallel, response_format=self._format())

    def _format(self) -> p.ResponseFormat | None:
        f = self.output_config.format if self.output_config is not None else None
        if f is None:
            return None
        if f.type != "json_schema" or f.schema is None:
            raise InvalidRequest("output_config.format must be {\"type\": \"json_schema\", \"schema\": ...}",
                                 param="output_config.format")
        return p.ResponseFormat(type="json_schema", json_schema=p.JsonSchemaFormat(schema=f.schema))

    def _tools(self) -> list[p.Tool] | None:
        out = []
        for i, t in enumerate(self.tools or ()):
            if t.type not in (None, "custom"):
                raise InvalidRequest(f"tools[{i}].type {t.type!r} is not served (custom tools only)", param="tools")
            out.append(p.Tool(type="function", function=p.FunctionDef(
                name=t.name, description=t.description, parameters=t.input_schema)))
        return out or None

    def _tool_choice(self) -> tuple[Union[str, p.NamedToolChoice, None], bool]:
        tc = self.tool_choice
        if tc is None:
            return None, True
        parallel = not tc.disable_parallel_tool_use
        if tc.type in ("auto", "none"):
            return tc.type, parallel
        if tc.type == "any":
            return "required", parallel
        if tc.type == "tool" and tc.name:
            return p.NamedToolChoice(type="function", function=p.FunctionName(name=tc.name)), parallel
        raise InvalidRequest(f"tool_choice {msgspec.to_builtins(tc)} is not one of auto, any, none, or tool with "
                             "a name", param="tool_choice")


def _text(blocks: list[Block], where: str) -> str:
    out = []
    for b in blocks:
        if b.type != "text":
            raise InvalidRequest(f"{where}: a {b.type!r} block is not served here (text only)", param=where)
        out.append(b.text or "")
    return "".join(out)


def _image_url(source: Any, at: str) -> str:
    """An image block's source as a URL: base64 data as a data: URL, or the url source's."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise InvalidRequest(f"{at}: an image source must be {{type: base64, media_type, data}} or {{type: url, url}}",
                         param="messages")


def _messages(m: MessageParam, where: str) -> list[p.ChatMessage]:
    """One Anthropic message as chat messages: a user turn's tool_result blocks become tool
    messages (before its text), an assistant turn's tool_use blocks its tool calls and its
    thinking its reasoning."""
    if m.role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role {m.role!r} must be user or assistant", param="messages")
    if isinstance(m.content, str):
        return [p.ChatMessage(role=m.role, content=m.content)]
    text, thinking, calls, results = [], [], [], []
    parts: list[p.ContentPart] = []  # a user turn's text and images, in order
    for k, b in enumerate(m.content):
        at = f"{where}.content[{k}]"
        if b.type == "text":
            text.append(b.text or "")
            parts.append(p.ContentPart(type="text", text=b.text or ""))
        elif b.type == "image" and m.role == "user":
            parts.append(p.ContentPart(type="image_url", image_url=p.ImageURL(url=_image_url(b.source, at))))
        elif b.type == "tool_use" and m.role == "assistant":
            if not b.id or not b.name:
                raise InvalidRequest(f"{at}: tool_use needs id and name", param="messages")
            calls.append(p.ToolCallIn(id=b.id, function=p.FunctionCall(
                name=b.name, arguments=json.dumps(b.input if b.input is not None else {}, ensure_ascii=False))))
        elif b.type == "tool_result" and m.role == "user":
            if not b.tool_use_id:
                raise InvalidRequest(f"{at}: tool_result needs tool_use_id", param="messages")
            content = b.content if isinstance(b.content, str) or b.content is None else _text(b.content, at)
            if b.is_error:
                content = f"Error: {content or ''}"
            results.append(p.ChatMessage(role="tool", tool_call_id=b.tool_use_id, content=content or ""))
        elif b.type in ("thinking", "redacted_thinking") and m.role == "assistant":
            thinking.append(b.thinking or "")
        else:
            raise InvalidRequest(f"{at}: a {b.type!r} block is not served in a {m.role} message", param="messages")
    out = results
    if m.role == "assistant":
        out.append(p.ChatMessage(role="assistant", content="".join(text) if text or not calls else None,
                                 tool_calls=calls or None, reasoning_content="".join(thinking) or None))
    elif any(part.type == "image_url" for part in parts):
        out.append(p.ChatMessage(role="user", content=parts))
    elif text or not results:
        out.append(p.ChatMessage(role="user", content="".join(text)))
    return out


# -- responses ---------------------------------------------------------------------------------


class AnthropicUsage(_Resp):
    input_tokens: int = 0  # not read from the cache
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageResponse(_Resp):
    id: str
    model: str
    content: list[dict[str, Any]] = msgspec.field(default_factory=list)
    type: str = "message"
    role: str = "assistant"
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage = msgspec.field(default_factory=AnthropicUsage)


class TokenCount(_Resp):
    input_tokens: int


class AnthropicModel(_Resp):
    """A model as Anthropic's Models API describes it (``created_at``: RFC 3339)."""

    id: str
    display_name: str
    created_at: str
    type: str = "model"


class AnthropicModelList(_Resp):
    data: list[AnthropicModel]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# Anthropic's error type for each HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
