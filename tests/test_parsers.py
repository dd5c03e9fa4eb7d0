"""The answer parsers (reasoning blocks, each family's tool-call format) against fixed model
outputs, fed whole and cut at every character boundary: a stream's pieces must add up to the
non-streamed parse."""

import json

import pytest

from service.chat import Answer, ToolPlan
from service.parsers import (HermesParser, Llama3JsonParser, MistralParser, ReasoningParser, detect_tool_parser,
                             template_supports_tools)


def parse_whole(make, text):
    p = make()
    first = p.feed(text)
    rest = p.finish()
    return first, rest


def feed_pieces(make, text, cuts):
    """Feed ``text`` cut at ``cuts``; return the concatenated pieces of each output."""
    p = make()
    pieces, out = [], []
    last = 0
    for c in list(cuts) + [len(text)]:
        pieces.append(text[last:c])
        last = c
    for piece in pieces:
        out.append(p.feed(piece))
    out.append(p.finish())
    return out


def all_cuts(text):
    return [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]


REASONING_CASES = [
    ("<think>plan a, then b</think>\n\nThe answer is 4.", "plan a, then b", "The answer is 4."),
    ("No block here, just <think> in the middle", "", "No block here, just <think> in the middle"),
    ("  <think>unfinished", "unfinished", ""),
    ("<thin", "", "<thin"),
]


@pytest.mark.parametrize("text,reasoning,content", REASONING_CASES)
def test_reasoning_split_is_the_same_whole_and_cut_anywhere(text, reasoning, content):
    for cuts in [[]] + all_cuts(text):
        outs = feed_pieces(ReasoningParser, text, cuts)
        assert "".join(r for r, _ in outs) == reasoning, cuts
        assert "".join(c for _, c in outs) == content, cuts


def test_reasoning_with_the_block_opened_or_closed_by_the_prompt():
    p = ReasoningParser.named("deepseek-r1")  # R1's template opens the block in the prompt
    assert p.feed("weigh it</think>Yes.") == ("weigh it", "Yes.")
    p = ReasoningParser.named("qwen3", prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert p.done and p.feed("<think>not reasoning") == ("", "<think>not reasoning")
    p = ReasoningParser.named("qwen3", prompt="<|im_start|>assistant\n<think>\n")
    assert p.feed("still thinking") == ("still thinking", "")


def _calls(outs):
    return [(c.name, json.loads(c.arguments)) for _, calls in outs for c in calls]


TOOL_CASES = [
    (HermesParser, 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    (HermesParser, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
                   '{"x": [1, 2]}}</tool_call>', "", [("a", {}), ("b", {"x": [1, 2]})]),
    (HermesParser, "I would use <tool_call> tags, but not now.", "I would use <tool_call> tags, but not now.", []),
    (HermesParser, "1 < 2 and <tool", "1 < 2 and <tool", []),
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    (Llama3JsonParser, '<|python_tag|>{"name": "a", "parameters": {"k": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"k": 1}), ("b", {})]),
    (Llama3JsonParser, "Plain answer {not json}", "Plain answer {not json}", []),
    (Llama3JsonParser, '{"key": "a JSON answer, not a call"}', '{"key": "a JSON answer, not a call"}', []),
    (MistralParser, 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"q": "x"}}, {"name": "g", "arguments": {}}]',
     "Sure. ", [("f", {"q": "x"}), ("g", {})]),
    (MistralParser, "[TOOL_CALLS] [{broken", "[TOOL_CALLS] [{broken", []),
]


@pytest.mark.parametrize("make,text,content,calls", TOOL_CASES)
def test_tool_calls_parse_the_same_whole_and_cut_anywhere(make, text, content, calls):
    for cuts in [[]] + all_cuts(text):
        outs = feed_pieces(make, text, cuts)
        assert "".join(c for c, _ in outs) == content, cuts
        assert _calls(outs) == calls, cuts


def test_answer_splits_reasoning_then_tool_calls_and_reports_tool_calls():
    plan = ToolPlan([{"name": "f", "description": "", "parameters": {"type": "object"}}], "auto", None, True,
                    "hermes", True)
    text = '<think>need f</think>\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    for cuts in [[]] + all_cuts(text)[:-1]:
        a = Answer(plan, ReasoningParser())
        pieces, last = [], 0
        for c in cuts + [len(text)]:
            pieces.append(text[last:c])
            last = c
        outs = [a.feed(piece, final=k == len(pieces) - 1) for k, piece in enumerate(pieces)]
        assert "".join(r for r, _, _ in outs) == "need f"
        assert "".join(c for _, c, _ in outs) == ""
        assert [(c.name, json.loads(c.arguments)) for c in a.calls] == [("f", {"a": 1})]
        assert a.finish_reason("stop") == "tool_calls" and a.finish_reason("length") == "length"


def test_the_parser_follows_the_template():
    assert detect_tool_parser("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_tool_parser("{{ '[TOOL_CALLS]' }} {{ tools }}") == "mistral"
    assert detect_tool_parser("<|start_header_id|>ipython<|end_header_id|> {{ tools }}") == "llama3_json"
    assert detect_tool_parser(None) == "hermes"
    assert template_supports_tools("{% if tools %}x{% endif %}")
    assert not template_supports_tools("{% for message in messages %}{{ message['content'] }}{% endfor %}")
