"""A chat request's tools and answer: the checked tool list and ``tool_choice``, the
conversation as the template sees it (with tools, or with our generic tool prompt when the
template has no tool support), the grammar that a required or named tool choice imposes, and
the answer's text split into reasoning, content and tool calls as it streams.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from service import protocol as p
from service import structured
from service.errors import InvalidRequest
from service.parsers import (TOOL_PARSERS, ReasoningParser, ToolCall, ToolParser, detect_tool_parser,
                             template_supports_tools)

ROLES = ("system", "developer", "user", "assistant", "tool")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

GENERIC_TOOL_PROMPT = (
    "You may call these functions (their arguments as JSON Schemas):\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with only\n<tool_call>\n{{\"name\": <name>, \"arguments\": <JSON object>}}\n"
    "</tool_call>\nResults come back in <tool_response> tags. Otherwise answer in plain text.")


@dataclasses.dataclass
class ToolPlan:
    """What a request's tools mean for its prompt, its grammar and its answer's parsing."""

    tools: list[dict]  # [{"name", "description", "parameters"}]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None
    parallel: bool
    parser: str
    native: bool  # the template renders the tools itself
    # With ``auto``: a Lark expression (a response format) an answer that is not a call follows.
    answer: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> str | None:
        """The grammar of the answer: a required or named call is always constrained (a
        response format then applies to a later turn's plain answer); with ``auto``, a call or
        an answer in the request's response format, else only under our generic prompt (a model
        never taught the format needs the grammar to write it), a call or free text."""
        if not self.active:
            return None
        parser = TOOL_PARSERS[self.parser]()
        # A model never taught tools tends to repeat a call until its budget ends: under our
        # generic prompt an answer makes at most as many calls as there are tools.
        cap = 0 if self.native else len(self.tools)
        if self.choice == "named":
            tools = [t for t in self.tools if t["name"] == self.named]
            return structured.lark_grammar(parser.lark(tools, False))
        if self.choice == "required":
            return structured.lark_grammar(parser.lark(self.tools, self.parallel, None, cap))
        if self.answer is not None:
            return structured.lark_grammar(parser.lark(self.tools, self.parallel, self.answer, cap))
        if not self.native and self.parser == "hermes":
            return structured.lark_grammar(parser.lark(self.tools, self.parallel, parser.free_text, cap))
        return None


def _tool_error(msg: str) -> InvalidRequest:
    return InvalidRequest(msg, param="tools")


def tool_plan(req: p.ChatCompletionRequest, template: str | None, parser: str | None) -> ToolPlan:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type != "function":
            raise _tool_error(f"tools[{i}].type must be 'function', got {t.type!r}")
        f = t.function
        if not _NAME.match(f.name):
            raise _tool_error(f"tools[{i}].function.name {f.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            raise _tool_error(f"tools[{i}].function.parameters must be a JSON Schema of type object")
        tools.append({"name": f.name, "description": f.description or "", "parameters": params})
    names = [t["name"] for t in tools]
    if len(set(names)) < len(names):
        raise _tool_error("tool names must be distinct")
    choice, named = "auto" if tools else "none", None
    tc = req.tool_choice
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise InvalidRequest(f"tool_choice must be none, auto, required or a named function, got {tc!r}",
                                 param="tool_choice")
        choice = tc
    elif tc is not None:
        if tc.type != "function":
            raise InvalidRequest(f"tool_choice.type must be 'function', got {tc.type!r}", param="tool_choice")
        choice, named = "named", tc.function.name
        if named not in names:
            raise InvalidRequest(f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    if choice in ("required", "named") and not tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
    plan = ToolPlan(tools, choice, named, req.parallel_tool_calls, parser or detect_tool_parser(template),
                    template_supports_tools(template))
    if plan.active and choice == "auto":  # the model picks: a call, or an answer in the format
        plan.answer = p.format_lark(req.response_format)
    return plan


def _text(m: p.ChatMessage) -> str | list[dict] | None:
    """A message's content as the template takes it: its text, or (a user message with images)
    its parts in order, ``{"type": "text", "text": ...}`` and ``{"type": "image"}``."""
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts: list[dict] = []
    for part in m.content:
        if part.type == "image_url":
            if m.role != "user":
                raise InvalidRequest(f"images are only taken in user messages, not {m.role}", param="messages")
            parts.append({"type": "image"})
        elif part.type == "text":
            parts.append({"type": "text", "text": part.text or ""})
        else:
            raise InvalidRequest(f"content part type {part.type!r} is not supported (text, image_url)",
                                 param="messages")
    if any(x["type"] == "image" for x in parts):
        return parts
    return "".join(x["text"] for x in parts)


def image_urls(messages: list[p.ChatMessage]) -> list[str]:
    """The URLs of the conversation's images, in the order the template places them."""
    urls = []
    for m in messages:
        for part in m.content if isinstance(m.content, list) else ():
            if part.type == "image_url":
                if part.image_url is None or not part.image_url.url:
                    raise InvalidRequest("an image_url content part needs image_url.url", param="messages")
                urls.append(part.image_url.url)
    return urls


def _arguments(call: p.ToolCallIn) -> Any:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except ValueError:
            raise InvalidRequest(f"tool call {call.function.name!r}: arguments are not JSON", param="messages") from None
    return args


def conversation(messages: list[p.ChatMessage], plan: ToolPlan | None) -> tuple[list[dict], dict]:
    """The messages as the template gets them, and the template's extra variables (``tools``).
    Without template support the tools go into the system prompt and the history's calls and
    results are written in the format that prompt teaches."""
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    native = plan is None or plan.native
    msgs = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}", param="messages")
        text = _text(m)
        if text is None and m.role in ("system", "developer", "user", "tool"):
            raise InvalidRequest(f"messages[{i}] ({m.role}) has no content", param="messages")
        if m.role == "assistant" and text is None and not m.tool_calls:
            raise InvalidRequest(f"messages[{i}] (assistant) has neither content nor tool_calls", param="messages")
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": text or ""}
        if m.name:
            msg["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            calls = [{"id": c.id or f"call_{i}_{k}", "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c)}}
                     for k, c in enumerate(m.tool_calls)]
            if native:
                msg["tool_calls"] = calls
            else:
                blocks = "".join(f"\n<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                                 for c in calls)
                msg["content"] = (msg["content"] + blocks).strip("\n")
        if m.role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if m.role == "tool":
            if native:
                if m.tool_call_id:
                    msg["tool_call_id"] = m.tool_call_id
            else:
                msg = {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        msgs.append(msg)
    extra: dict[str, Any] = {}
    if plan is not None and plan.tools and plan.choice != "none":
        specs = [{"type": "function", "function": t} for t in plan.tools]
        if native:
            extra["tools"] = specs
        else:
            prompt = GENERIC_TOOL_PROMPT.format(tools="\n".join(
                json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in plan.tools))
            if msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + prompt}
            else:
                msgs.insert(0, {"role": "system", "content": prompt})
    return msgs, extra


class Answer:
    """A chat answer's text, split as it streams: reasoning, content and tool calls."""

    def __init__(self, plan: ToolPlan | None, reasoning: ReasoningParser | None):
        self.reasoning = reasoning
        self.tools: ToolParser | None = TOOL_PARSERS[plan.parser]() if plan is not None and plan.active else None
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, new tool calls) of the next piece of text (``final``: the
        answer ended after it)."""
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if final and self.reasoning:
            r2, c2 = self.reasoning.finish()
            reasoning, content = reasoning + r2, content + c2
        calls: list[ToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, more = self.tools.finish()
                content, calls = content + c2, calls + more
        self.calls += calls
        return reasoning, content, calls

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


def call_out(call: ToolCall) -> p.ToolCallOut:
    return p.ToolCallOut(id=call.id, function=p.FunctionCallOut(name=call.name, arguments=call.arguments))


def call_deltas(index: int, call: ToolCall) -> list[p.ToolCallDelta]:
    """OpenAI's deltas of one call: its id, type and name first, then its arguments."""
    return [p.ToolCallDelta(index=index, id=call.id, type="function",
                            function=p.FunctionDelta(name=call.name, arguments="")),
            p.ToolCallDelta(index=index, function=p.FunctionDelta(arguments=call.arguments))]
