"""Tools together with a response format in one request, as agent libraries send them: with
``tool_choice`` auto the answer is a tool call or text in the format (the model picks; a
logit bias on the first token forces each branch here), ``required`` or a named tool gives a
call, ``none`` the format alone; on chat completions, Responses and Messages alike. A tiny
random model with the bundled model's tokenizer: the grammar, not the model, makes each
answer valid."""

import json

import openai
import pytest
from litestar.testing import TestClient

from service.app import ServerSettings, State, create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
           "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}


@pytest.fixture(scope="module")
def app(default_checkpoint):
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer
    from model.weights import init_params
    from service.engine import Engine
    from service.engine.runner import ModelRunner

    tokenizer = Tokenizer.from_dir(default_checkpoint)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    runner = ModelRunner(cfg, init_params(cfg, seed=0), max_batch_size=2, session_len=512,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=128)
    engine = Engine(runner, tokenizer)
    engine.start()
    yield create_app(State(ServerSettings(model_name="tiny"), engine)), tokenizer
    engine.stop()


def first_token(tokenizer, text: str) -> int:
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token


def chat(c, **kw):
    body = {"model": "tiny", "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "user", "content": "Is it sunny in Paris?"}], "tools": [WEATHER], **kw}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_auto_with_a_format_gives_a_call_or_an_answer_in_the_format(app):
    app, tok = app
    with TestClient(app) as c:
        # Biased towards opening a call: the grammar then writes one.
        call = chat(c, response_format=FORMAT, logit_bias={str(first_token(tok, "<")): 100})
        assert call["finish_reason"] == "tool_calls" and call["message"]["content"] is None
        (tc,) = call["message"]["tool_calls"]
        assert tc["function"]["name"] == "get_weather"
        assert json.loads(tc["function"]["arguments"])["city"] in ("Paris", "Rome")
        # Biased towards a JSON answer: it follows the format, and no call is made.
        answer = chat(c, response_format=FORMAT, logit_bias={str(first_token(tok, "{")): 100})
        assert answer["finish_reason"] == "stop" and not answer["message"].get("tool_calls")
        assert json.loads(answer["message"]["content"])["answer"] in ("yes", "no")


def test_required_and_named_give_a_call_and_none_the_format_alone(app):
    app, _ = app
    with TestClient(app) as c:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            got = chat(c, response_format=FORMAT, tool_choice=choice)
            assert got["message"]["tool_calls"][0]["function"]["name"] == "get_weather", choice
        plain = chat(c, response_format=FORMAT, tool_choice="none")
        assert json.loads(plain["message"]["content"])["answer"] in ("yes", "no")


def test_the_openai_sdk_parses_either_branch(app):
    app, tok = app
    with TestClient(app) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c)
        for first, branch in (("<", "call"), ("{", "format")):
            r = client.chat.completions.create(
                model="tiny", max_tokens=60, temperature=0, tools=[WEATHER], response_format=FORMAT,
                messages=[{"role": "user", "content": "Is it sunny in Paris?"}],
                logit_bias={str(first_token(tok, first)): 100})
            message = r.choices[0].message
            if branch == "call":
                assert message.tool_calls[0].function.name == "get_weather"
            else:
                assert json.loads(message.content)["answer"] in ("yes", "no")


def test_responses_and_messages_take_tools_with_their_formats(app):
    app, _ = app
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    with TestClient(app) as c:
        r = c.post("/v1/responses", json={
            "input": "Is it sunny in Paris?", "tools": [tool], "max_output_tokens": 60, "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT}}})
        assert r.status_code == 200, r.text
        (item,) = [i for i in r.json()["output"] if i["type"] in ("function_call", "message")]
        if item["type"] == "function_call":  # the model picked a call
            assert json.loads(item["arguments"])["city"] in ("Paris", "Rome")
        else:
            assert json.loads(item["content"][0]["text"])["answer"] in ("yes", "no")
        body = {"model": "tiny", "max_tokens": 60, "messages": [{"role": "user", "content": "Sunny in Rome?"}],
                "tools": [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
                "output_config": {"format": {"type": "json_schema", "schema": VERDICT}}}
        for choice in ({"type": "auto"}, {"type": "any"}):
            r = c.post("/v1/messages", json={**body, "tool_choice": choice})
            assert r.status_code == 200, r.text
            blocks = r.json()["content"]
            uses = [b for b in blocks if b["type"] == "tool_use"]
            if uses or choice["type"] == "any":
                assert uses and uses[0]["input"]["city"] in ("Paris", "Rome")
            else:
                assert json.loads("".join(b["text"] for b in blocks if b["type"] == "text"))["answer"] in ("yes", "no")


def test_a_format_that_cannot_join_a_call_is_refused_naming_the_routes_own_field(app):
    app, _ = app
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "response_format": {"type": "regex_schema", "regex_schema": "[a-z]+"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        r = c.post("/v1/responses", json={
            "input": "hi", "tools": [{"type": "function", "name": "get_weather", "parameters": {}}],
            "text": {"format": {"type": "json_schema", "name": "x"}}})  # no schema
        assert r.status_code == 400 and r.json()["error"]["param"] == "text.format", r.text
        assert "response_format" not in r.json()["error"]["message"]


def test_parallel_tool_calls_false_is_at_most_one_call_on_every_route(app):
    app, _ = app
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    with TestClient(app) as c:
        counts = {}
        for parallel in (True, False):
            got = chat(c, tools=[WEATHER, clock], tool_choice="required", parallel_tool_calls=parallel,
                       max_tokens=120)
            counts[parallel] = len(got["message"]["tool_calls"])
        # The generic prompt's cap: as many calls as tools; one when parallel calls are off.
        assert 1 <= counts[True] <= 2 and counts[False] == 1
        tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
                 for t in (WEATHER, clock)]
        r = c.post("/v1/responses", json={"input": "hi", "tools": tools, "tool_choice": "required",
                                          "parallel_tool_calls": False, "max_output_tokens": 120}).json()
        assert [i["type"] for i in r["output"]].count("function_call") == 1
        r = c.post("/v1/messages", json={
            "model": "tiny", "max_tokens": 120, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": t["name"], "input_schema": t["parameters"]} for t in tools],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}).json()
        assert [b["type"] for b in r["content"]].count("tool_use") == 1
