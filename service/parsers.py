"""Parsers of a chat answer's text: the reasoning block (``<think>...</think>``) and tool calls
in each family's format (Hermes/Qwen ``<tool_call>``, Llama 3 JSON, Mistral ``[TOOL_CALLS]``).

Each parser is incremental: ``feed`` takes the next piece of text and returns what can be
emitted now, holding back text that might start a tag cut at a chunk boundary; ``finish``
returns the rest. A non-streamed answer is parsed by the same calls (everything fed, then
``finish``), so a stream's deltas concatenate to the non-streamed result by construction.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any


def _held(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# -- reasoning ---------------------------------------------------------------------------------


REASONING_PARSERS = ("qwen3", "deepseek-r1")


class ReasoningParser:
    """Splits ``<think>reasoning</think>content``. ``implicit_start``: the template opens the
    block in the prompt (DeepSeek-R1), so the answer starts inside it."""

    start, end = "<think>", "</think>"

    def __init__(self, implicit_start: bool = False):
        self.state = "maybe" if not implicit_start else "inside"
        self.buf = ""
        self.strip = False

    @classmethod
    def named(cls, name: str, prompt: str = "") -> "ReasoningParser":
        # A prompt that already closed the block (thinking switched off by the template)
        # leaves nothing to parse; one that opened it starts the answer inside it.
        tail = prompt.rstrip()
        if tail.endswith(cls.end):
            p = cls()
            p.state = "after"
            return p
        return cls(implicit_start=name == "deepseek-r1" or tail.endswith(cls.start))

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) to emit now."""
        self.buf += text
        reasoning = content = ""
        if self.state == "maybe":  # before any content: does the answer open a block?
            stripped = self.buf.lstrip()
            if stripped.startswith(self.start):
                self.buf = stripped[len(self.start):]
                self.state = "inside"
            elif self.start.startswith(stripped):
                return "", ""  # could still be the opening tag
            else:
                self.state = "after"
        if self.state == "inside":
            i = self.buf.find(self.end)
            if i >= 0:
                reasoning, self.buf = self.buf[:i], self.buf[i + len(self.end):]
                self.state = "after"
                self.strip = True
            else:
                k = _held(self.buf, self.end)
                reasoning, self.buf = self.buf[:len(self.buf) - k], self.buf[len(self.buf) - k:]
                return reasoning, ""
        if self.state == "after":
            if self.strip:  # the newlines that close the block are not content
                self.buf = self.buf.lstrip("\n")
                self.strip = not self.buf
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "inside":
            return rest, ""
        return "", rest

    @property
    def done(self) -> bool:
        return self.state == "after"


# -- tool calls --------------------------------------------------------------------------------


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """One family's tool-call format. ``start`` opens a call in the answer; the text from the
    first ``start`` on is held until it parses as calls (or the answer ends)."""

    name = ""
    start = ""
    args_key = "arguments"

    def __init__(self):
        self.buf = ""
        self.in_calls = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, complete calls) to emit now."""
        self.buf += text
        if not self.in_calls:
            i = self.buf.find(self.start)
            if i < 0:
                k = _held(self.buf, self.start)
                content, self.buf = self.buf[:len(self.buf) - k], self.buf[len(self.buf) - k:]
                return content, []
            content, self.buf = self.buf[:i], self.buf[i:]
            self.in_calls = True
        else:
            content = ""
        calls = self._complete()
        self.calls += calls
        return content, calls

    def _complete(self) -> list[ToolCall]:
        """Calls complete in ``buf`` (consumed from it)."""
        return []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left: calls that parse at the end, else the held text as content."""
        calls = self._complete() + self._final()
        self.calls += calls
        rest, self.buf = self.buf, ""
        if rest.strip() and not calls and not self.calls:
            return rest, []
        return (rest if rest.strip() else ""), calls

    def _final(self) -> list[ToolCall]:
        return []

    # The grammar side: how one call of each tool is written, so a required or named
    # tool_choice can be constrained to exactly this format.
    def call_schema(self, tools: list[dict]) -> dict:
        options = [{"type": "object",
                    "properties": {"name": {"const": t["name"]}, self.args_key: _closed(t["parameters"])},
                    "required": ["name", self.args_key], "additionalProperties": False} for t in tools]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        # Compact JSON, as under response_format (see structured.JSON_OPTIONS).
        return {**schema, "x-guidance": {"whitespace_flexible": False}}

    # A Lark expression for free text that does not open a call (the non-call answer a model
    # never taught tools may give under our generic prompt).
    free_text = r"/[^<\s][\s\S]*/"

    def lark(self, tools: list[dict], parallel: bool, answer: str | None = None, max_calls: int = 0) -> str:
        """The grammar of an answer that is calls of ``tools`` (one, or with ``parallel``
        several: at most ``max_calls`` when > 0), or, with ``answer`` (a Lark expression: free
        text, or a response format), that instead."""
        raise NotImplementedError


def _repeat(item: str, sep: str, parallel: bool, max_calls: int) -> str:
    if not parallel:
        return item
    if max_calls <= 0:
        return f"{item} ({sep} {item})*"
    return " | ".join(f" {sep} ".join([item] * k) for k in range(1, max_calls + 1))


def _closed(schema: dict) -> dict:
    """A parameters schema whose object takes only the declared arguments, unless it says
    otherwise: a model free to invent arguments may never stop inventing them."""
    if schema.get("type", "object") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one tag per call (Hermes,
    Qwen2.5/Qwen3, and our generic format for templates without tool support)."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    _call_re = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>\s*", re.S)

    def _complete(self) -> list[ToolCall]:
        calls = []
        while True:
            m = self._call_re.match(self.buf)
            if not m:
                return calls
            try:
                call = _call(json.loads(m.group(1)), self.args_key)
            except ValueError:
                call = None
            if call is None:  # not a call after all: leave it for finish to report as text
                return calls
            calls.append(call)
            self.buf = self.buf[m.end():]

    def lark(self, tools: list[dict], parallel: bool, answer: str | None = None, max_calls: int = 0) -> str:
        call = f'"<tool_call>\\n" %json {json.dumps(self.call_schema(tools))} "\\n</tool_call>"'
        calls = _repeat("call", '"\\n"', parallel, max_calls)
        lines = [f"start: {'calls | answer' if answer else 'calls'}", f"calls: {calls}", f"call: {call}"]
        return "\n".join(lines + ([f"answer: {answer}"] if answer else [])) + "\n"


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the answer is ``{"name": ..., "parameters": {...}}`` (optionally after
    ``<|python_tag|>``), several separated by ``;``."""

    name = "llama3_json"
    start = "{"
    args_key = "parameters"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not self.in_calls:
            probe = (self.buf + text).lstrip()
            if probe.startswith("<|python_tag|>"):
                probe = probe[len("<|python_tag|>"):].lstrip()
            if not probe or "<|python_tag|>".startswith(probe) or probe.startswith("{"):
                self.buf += text  # a call, if anything: it only parses whole
                if probe.startswith("{"):
                    self.in_calls = True
                return "", []
            content, self.buf = self.buf + text, ""
            self.start = "\x00"  # the answer is text: never look again
            return content, []
        self.buf += text
        return "", []

    def _final(self) -> list[ToolCall]:
        body = self.buf.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return []
        calls = []
        for part in body.split(";"):
            try:
                call = _call(json.loads(part), self.args_key)
            except ValueError:
                return []
            if call is None:
                return []
            calls.append(call)
        self.buf = ""
        return calls

    def lark(self, tools: list[dict], parallel: bool, answer: str | None = None, max_calls: int = 0) -> str:
        call = f"%json {json.dumps(self.call_schema(tools))}"
        calls = _repeat("call", '";"', parallel, max_calls)
        # An answer that is not a call is content: what does not parse as calls is (finish).
        start = "calls | answer" if answer else "calls"
        return f"start: {start}\ncalls: {calls}\ncall: {call}\n" + (f"answer: {answer}\n" if answer else "")


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    start = "[TOOL_CALLS]"

    def _final(self) -> list[ToolCall]:
        body = self.buf.strip()[len(self.start):].strip() if self.buf.strip().startswith(self.start) else ""
        try:
            items = json.loads(body)
        except ValueError:
            return []
        items = items if isinstance(items, list) else [items]
        calls = [_call(x, self.args_key) for x in items]
        if not calls or any(c is None for c in calls):
            return []
        self.buf = ""
        return calls

    def lark(self, tools: list[dict], parallel: bool, answer: str | None = None, max_calls: int = 0) -> str:
        schema = {"type": "array", "items": self.call_schema(tools), "minItems": 1}
        if not parallel or max_calls > 0:
            schema["maxItems"] = max_calls if parallel else 1
        start = "calls | answer" if answer else "calls"
        return (f'start: {start}\ncalls: "[TOOL_CALLS]" %json {json.dumps(schema)}\n'
                + (f"answer: {answer}\n" if answer else ""))


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def detect_tool_parser(template: str | None) -> str:
    """The tool-call format a chat template teaches its model (Hermes when it teaches none)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def template_supports_tools(template: str | None) -> bool:
    """Whether the template renders a ``tools`` list itself (else tools go in our generic
    system prompt)."""
    return bool(template) and re.search(r"\btools\b", template) is not None
