"""OpenAI's Responses API and Anthropic's Messages API against a live server on the default
model, through the official ``openai`` and ``anthropic`` SDKs: the same answers as chat, the
stored conversation, tool round trips, structured output, streaming, and error bodies."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture()
def oai(server):
    return openai.OpenAI(api_key="unused", base_url=server + "/v1")


@pytest.fixture()
def claude(server):
    return anthropic.Anthropic(api_key="unused", base_url=server)


def chat_text(oai, content, **kw):
    r = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                    messages=[{"role": "user", "content": content}], **kw)
    return r.choices[0].message.content


# -- Responses ---------------------------------------------------------------------------------


def test_response_equals_chat_and_its_stream(oai):
    r = oai.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24)
    assert r.status == "completed" and r.object == "response"
    assert r.output_text == chat_text(oai, QUESTION) and "Paris" in r.output_text
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    with oai.responses.stream(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == r.output_text
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for first, then in (("response.output_item.added", "response.content_part.added"),
                        ("response.content_part.added", "response.output_text.delta"),
                        ("response.output_text.delta", "response.output_text.done"),
                        ("response.output_text.done", "response.output_item.done")):
        assert kinds.index(first) < kinds.index(then)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_a_cut_answer_is_incomplete_in_both_forms(oai):
    r = oai.responses.create(model=MODEL, input="Write a long story about the sea.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    with oai.responses.stream(model=MODEL, input="Write a long story about the sea.", max_output_tokens=5) as s:
        kinds = [e.type for e in s]
    assert kinds[-1] == "response.incomplete"


def test_previous_response_id_continues_from_the_cache(oai):
    first = oai.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", temperature=0,
                                 max_output_tokens=24)
    second = oai.responses.create(model=MODEL, previous_response_id=first.id, input="And of Germany?",
                                  temperature=0, max_output_tokens=24)
    assert second.previous_response_id == first.id
    # The second prompt starts with the first turn (its instructions do not carry over, as in
    # OpenAI's API): the cache holds at least its whole blocks.
    assert second.usage.input_tokens_details.cached_tokens >= 32
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 16
    # The same conversation sent whole over chat gives the same answer.
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And of Germany?"}]
    chat = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, messages=messages)
    assert second.output_text == chat.choices[0].message.content


def test_stored_responses_can_be_read_and_deleted(oai):
    r = oai.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8)
    got = oai.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model=MODEL, input="x", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"
    unstored = oai.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)


def test_a_required_tool_call_and_its_output_round_trip(oai):
    r = oai.responses.create(model=MODEL, input="What's the weather in Paris?", tools=TOOLS,
                             tool_choice="required", temperature=0, max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = oai.responses.create(
        model=MODEL, previous_response_id=r.id, tools=TOOLS, tool_choice="none", temperature=0,
        max_output_tokens=30, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                      "output": "sunny, 21 C"}])
    assert follow.status == "completed" and follow.output_text
    assert not [o for o in follow.output if o.type == "function_call"]
    # The same loop with the whole history as items gives the same answer.
    whole = oai.responses.create(
        model=MODEL, tools=TOOLS, tool_choice="none", temperature=0, max_output_tokens=30,
        input=[{"role": "user", "content": "What's the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert whole.output_text == follow.output_text
    with oai.responses.stream(model=MODEL, input="What's the weather in Paris?", tools=TOOLS,
                              tool_choice="required", temperature=0, max_output_tokens=60) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [o.arguments for o in final.output if o.type == "function_call"] == [calls[0].arguments]


def test_a_json_schema_answer_validates(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oai.responses.create(model=MODEL, input="Invent a person.", temperature=0, max_output_tokens=60,
                             text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_unknown_and_unsupported_fields_are_400s_naming_them(oai):
    for extra, param in (({"bogus": 1}, "bogus"), ({"background": True}, "background"),
                         ({"truncation": "auto"}, "truncation"), ({"include": ["file_search_call.results"]}, "include"),
                         ({"tools": [{"type": "web_search"}]}, "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model=MODEL, input="x", extra_body=extra)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_image",
                                                                               "image_url": "x"}]}])


def test_seeded_and_greedy_responses_do_not_depend_on_their_batch(server):
    async def run():
        client = openai.AsyncOpenAI(api_key="unused", base_url=server + "/v1")
        kw = dict(model=MODEL, input="Tell me about the moon.", max_output_tokens=16)
        alone = [(await client.responses.create(**kw, temperature=0)).output_text,
                 (await client.responses.create(**kw, extra_body={"seed": 7})).output_text]
        crowd = [client.responses.create(model=MODEL, input=f"Story number {i}.", max_output_tokens=24)
                 for i in range(3)]
        together = await asyncio.gather(client.responses.create(**kw, temperature=0),
                                        client.responses.create(**kw, extra_body={"seed": 7}), *crowd)
        return alone, [r.output_text for r in together[:2]]

    alone, together = asyncio.run(run())
    assert alone == together


# -- Messages ----------------------------------------------------------------------------------


def test_a_message_equals_chat_and_its_stream(oai, claude):
    m = claude.messages.create(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                               extra_body={"temperature": 0})
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn"
    assert m.content[0].type == "text" and m.content[0].text == chat_text(oai, QUESTION)
    assert m.usage.output_tokens > 0 and m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == m.usage.output_tokens


def test_message_stop_reasons(claude):
    cut = claude.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": QUESTION}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    stopped = claude.messages.create(model=MODEL, max_tokens=24, stop_sequences=["Paris"],
                                     messages=[{"role": "user", "content": QUESTION}], extra_body={"temperature": 0})
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert "Paris" not in stopped.content[0].text
    short = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=[
        {"role": "user", "content": QUESTION}]).input_tokens
    long = claude.messages.count_tokens(model=MODEL, system="Be brief. " * 10, messages=[
        {"role": "user", "content": QUESTION}]).input_tokens
    assert long > short  # the system prompt is rendered


def test_a_tool_use_round_trip(claude):
    tools = [{"name": "get_weather", "description": "Get the weather of a city",
              "input_schema": TOOLS[0]["parameters"]}]
    question = {"role": "user", "content": "What's the weather in Paris?"}
    m = claude.messages.create(model=MODEL, max_tokens=60, tools=tools, tool_choice={"type": "any"},
                               messages=[question], extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    use = [b for b in m.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_weather" and isinstance(use[0].input["city"], str)
    with claude.messages.stream(model=MODEL, max_tokens=60, tools=tools, tool_choice={"type": "any"},
                                messages=[question], extra_body={"temperature": 0}) as s:
        streamed = s.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use[0].input]
    def follow_up():
        return claude.messages.create(
            model=MODEL, max_tokens=30, tools=tools, tool_choice={"type": "none"}, extra_body={"temperature": 0},
            messages=[question, {"role": "assistant", "content": m.content},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                                    "content": "sunny, 21 C"}]}])

    follow = follow_up()
    assert follow.stop_reason in ("end_turn", "max_tokens") and follow.content[0].type == "text"
    # Sent again, its prompt is read from the cache (without tools rendered it shares no block
    # with the first turn's), and the usage splits the same prompt differently.
    again = follow_up()
    assert again.usage.cache_read_input_tokens > 0
    assert (again.usage.input_tokens + again.usage.cache_read_input_tokens
            == follow.usage.input_tokens + follow.usage.cache_read_input_tokens)
    count = claude.messages.count_tokens(model=MODEL, messages=[question], tools=tools)
    assert count.input_tokens > claude.messages.count_tokens(model=MODEL, messages=[question]).input_tokens


def test_errors_have_anthropics_body_and_x_api_key_is_accepted(claude, server, default_checkpoint):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(server + "/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_x_api_key_is_accepted_alongside_bearer():
    from litestar.testing import TestClient

    from service.app import ServerSettings, State, create_app

    with TestClient(create_app(State(ServerSettings(model_name="m", api_keys=("k1",))))) as c:
        body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
        denied = c.post("/v1/messages", json=body, headers={"x-api-key": "nope"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        # Past the key check the model is still loading here: 503, Anthropic's overloaded body.
        for headers in ({"x-api-key": "k1"}, {"Authorization": "Bearer k1"}):
            r = c.post("/v1/messages", json=body, headers=headers)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"


# -- README ------------------------------------------------------------------------------------


def readme_snippets(contains: str) -> list[str]:
    """The README's ``py`` blocks (those that need this file's SDKs) that contain ``contains``."""
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```py\n(.*?)```", text, re.S) if contains in b]


@pytest.mark.parametrize("contains, printed", [("client.responses", r"^get_weather \{"),
                                               ("anthropic.Anthropic", r" (end_turn|max_tokens)$")])
def test_readme_snippets_run(server, contains, printed):
    (block,) = readme_snippets(contains)
    code = block.replace("http://localhost:23333", server)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert re.search(printed, r.stdout, re.M), r.stdout


def test_apiclient_responses_v1(server, oai):
    from service.client import APIClient

    with APIClient(server) as api:
        (whole,) = api.responses_v1(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24)
        events = list(api.responses_v1(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24,
                                       stream=True))
    text = "".join(c["text"] for item in whole["output"] if item["type"] == "message" for c in item["content"])
    assert text == chat_text(oai, QUESTION)
    assert events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text


def test_both_sdks_retrieve_and_list_the_served_model_in_their_own_shape(oai, claude):
    got = oai.models.retrieve(MODEL)
    assert (got.id, got.object, got.owned_by) == (MODEL, "model", "xlaserve")
    assert got.created == oai.models.list().data[0].created
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("other")
    assert e.value.body["code"] == "model_not_found" and "'other' does not exist" in e.value.body["message"]
    info = claude.models.retrieve(MODEL)
    assert (info.id, info.type, info.display_name) == (MODEL, "model", MODEL)
    assert info.created_at.timestamp() == got.created
    page = claude.models.list()
    assert [x.id for x in page.data] == [MODEL] and page.has_more is False
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.models.retrieve("other")
    assert e.value.body["error"]["type"] == "not_found_error"


def test_the_sdk_lists_a_stored_responses_input_items(oai):
    r = oai.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4)
    page = oai.responses.input_items.list(r.id)
    (item,) = page.data
    assert item.type == "message" and item.role == "user" and item.content[0].text == QUESTION



def _sse_events(url: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def _fields(model) -> set[str]:
    return {f.alias or name for name, f in type(model).model_fields.items()}


# Fields the API reference documents that the SDK's type may not have yet.
DOCUMENTED_EXTRAS = {"response.function_call_arguments.done": {"name"}}


def _check_against(adapter, event: dict):
    """The event validates as the SDK's own type (not merely constructed), and every field we
    send is one that type has (a misnamed field would be silently dropped by the SDK)."""
    parsed = adapter.validate_python(event)
    extra = set(event) - _fields(parsed) - DOCUMENTED_EXTRAS.get(event["type"], set())
    assert not extra, (event["type"], extra)
    return parsed


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS, "tool_choice": "required"},
                                   {"text": {"format": {"type": "json_schema", "name": "city", "schema": {
                                       "type": "object", "properties": {"name": {"type": "string"}},
                                       "required": ["name"], "additionalProperties": False}}}}],
                         ids=["text", "tool_call", "json_schema"])
def test_every_responses_stream_event_is_the_sdks_type(server, extra):
    """Each streamed event of a text answer, a tool call and a structured answer validates as
    the openai SDK's event type with no field it lacks; sequence numbers count from 0; the
    output item and content part events agree with the final response."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    events = _sse_events(server + "/v1/responses", {"model": MODEL, "input": "What's the weather in Paris?",
                                                    "stream": True, "temperature": 0, "max_output_tokens": 40,
                                                    **extra})
    parsed = [_check_against(adapter, e) for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.incomplete")  # (max_output_tokens)
    final = Response.model_validate(events[-1]["response"])
    added = [p.item.id for p in parsed if p.type == "response.output_item.added"]
    done = [p.item for p in parsed if p.type == "response.output_item.done"]
    assert added == [o.id for o in done] == [o.id for o in final.output]
    for p in parsed:
        if p.type == "response.output_item.added" and p.item.type == "message":
            assert p.item.content == []  # the part arrives with response.content_part.added


def test_every_messages_stream_event_is_the_sdks_type(server):
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(RawMessageStreamEvent)
    tools = [{"name": "get_weather", "description": "Weather of a city", "input_schema": TOOLS[0]["parameters"]}]
    for extra in ({}, {"tools": tools, "tool_choice": {"type": "any"}}):
        events = _sse_events(server + "/v1/messages", {"model": MODEL, "max_tokens": 40, "stream": True,
                                                       "messages": [{"role": "user", "content": QUESTION}], **extra})
        # (Anthropic's keep-alive "ping" is no message event: the SDK skips it by name)
        kinds = [_check_against(adapter, e).type for e in events if e["type"] != "ping"]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
