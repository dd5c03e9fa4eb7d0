"""Structured output and tool calls.

On the engine over a tiny random model with the real tokenizer: a random model's answers
still obey the grammar (only the mask makes them), unconstrained neighbours keep exactly their
tokens, and nothing compiles after warm-up. On the live server over the bundled SmolLM2: every
``response_format`` and tool-choice mode end to end, streams equal to non-streamed answers,
and each refusal as a 400 naming its field."""

import asyncio
import json
import re

import jsonschema
import numpy as np
import openai
import pytest

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.weights import init_params
from service.engine import Engine
from service.engine.runner import ModelRunner, compile_count
from service.params import SamplingParams
from service.structured import json_object_grammar, json_schema_grammar, regex_grammar

MODEL = "SmolLM2-135M-Instruct"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


# -- engine, tiny random model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer.from_dir(default_checkpoint)


@pytest.fixture(scope="module")
def engine(tokenizer):
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    runner = ModelRunner(cfg, init_params(cfg, seed=0, scale=0.5), max_batch_size=4, session_len=256,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=32)
    runner.warmup()
    engine = Engine(runner, tokenizer)
    engine.start()
    yield engine
    engine.stop()


async def collect(engine, ids, params):
    toks, text, last = [], "", None
    async for out in engine.generate(ids, params):
        toks += out.token_ids
        text += out.text
        last = out
    return toks, text, last.finish_reason


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


def test_a_random_model_answers_in_the_grammar(engine):
    """A random model writes noise unless the mask forbids it: every answer obeying the
    schema, greedy and sampled, shows the mask is applied at every step."""
    grammar = json_schema_grammar(PERSON)
    engine.grammars.check(grammar)

    async def go():
        runs = [collect(engine, prompt(9, 1), SamplingParams(temperature=0, grammar=grammar, max_tokens=200))]
        runs += [collect(engine, prompt(9, 1), SamplingParams(temperature=1.0, top_p=0.95, seed=s, grammar=grammar,
                                                             max_tokens=200)) for s in range(3)]
        return await asyncio.gather(*runs)

    results = asyncio.run(go())
    for toks, text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for _, text, _ in results}) > 1  # sampling still samples within the grammar


def test_json_object_and_regex_on_a_random_model(engine, tokenizer):
    """A random model never closes a free JSON object by chance; biased towards the
    characters that close one, it does, and the grammar keeps them in a valid order."""
    closers = {tokenizer.encode(c, add_special_tokens=False)[0]: 8.0 for c in ('"', ':', '1', '}')}

    async def go():
        return await asyncio.gather(
            collect(engine, prompt(5, 2), SamplingParams(temperature=0, grammar=json_object_grammar(), max_tokens=120,
                                                         logit_bias=tuple(closers.items()))),
            collect(engine, prompt(5, 3), SamplingParams(temperature=0.8, seed=4,
                                                         grammar=regex_grammar(r"[A-Z][a-z]{2,5}-[0-9]{3}"),
                                                         max_tokens=30)))

    (_, obj, f1), (_, code, f2) = asyncio.run(go())
    assert f1 == "stop", obj
    assert isinstance(json.loads(obj), dict), obj
    assert f2 == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", code), code


def test_unconstrained_requests_keep_their_tokens_beside_constrained_ones(engine):
    """Greedy and seeded requests alone, then again with constrained requests sharing their
    batch and joining mid-way: identical tokens, and no compilation after warm-up."""
    grammar = json_schema_grammar(PERSON)
    plain = [(prompt(7, 10), SamplingParams(temperature=0, max_tokens=24)),
             (prompt(12, 11), SamplingParams(temperature=0.9, seed=5, max_tokens=24))]

    async def alone():
        return [await collect(engine, ids, sp) for ids, sp in plain]

    async def mixed():
        async def late(delay, seed):
            await asyncio.sleep(delay)
            return await collect(engine, prompt(6, seed), SamplingParams(temperature=0.7, seed=seed, grammar=grammar,
                                                                         max_tokens=200))
        runs = [collect(engine, ids, sp) for ids, sp in plain] + [late(0.0, 20), late(0.05, 21)]
        return await asyncio.gather(*runs)

    want = asyncio.run(alone())
    before = compile_count()
    got = asyncio.run(mixed())
    assert [g[0] for g in got[:2]] == [w[0] for w in want]
    for _, text, finish in got[2:]:  # and the constrained ones obey their schema, in full
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert compile_count() == before


def test_logprobs_under_a_grammar_list_only_allowed_tokens(engine, tokenizer):
    """The mask acts like a bias of -inf: the chosen token's logprob is of the masked
    distribution, and forbidden tokens never show up as alternatives."""
    grammar = regex_grammar("(alpha|beta)")

    async def go():
        outs = []
        async for out in engine.generate(prompt(6, 30), SamplingParams(temperature=0, grammar=grammar, logprobs=20,
                                                                       max_tokens=5)):
            outs.append(out)
        return outs

    outs = asyncio.run(go())
    text = "".join(o.text for o in outs)
    assert text in ("alpha", "beta") and outs[-1].finish_reason == "stop"
    first = outs[0].logprobs[0]
    # What the grammar allows first, from the vocabulary itself: every token whose text is a
    # non-empty prefix of an answer. There are few enough that the top 20 hold them all.
    texts = ((i, tokenizer.decode([i], skip_special_tokens=False)) for i in range(tokenizer.vocab_size))
    want = {i for i, t in texts if t and ("alpha".startswith(t) or "beta".startswith(t))}
    assert 1 < len(want) <= 20
    shown = {i for i, lp in first.top if lp > -np.inf}
    assert shown == want, sorted(tokenizer.decode([i]) for i in shown ^ want)
    # The chosen token's logprob is of the masked distribution: the allowed tokens hold all the mass.
    assert np.isclose(np.logaddexp.reduce([lp for i, lp in first.top if i in want]), 0.0, atol=1e-3)


def test_a_repeated_schema_is_compiled_once(engine):
    grammar = json_schema_grammar({"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]})
    engine.grammars.check(grammar)
    compiled = engine.grammars.compiles
    for _ in range(3):
        engine.grammars.check(grammar)
        engine.grammars.matcher(grammar)
    assert engine.grammars.compiles == compiled


# -- the live server, bundled SmolLM2 ----------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


CITY = {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "country": {"enum": ["France", "Germany", "Italy", "Spain"]},
                       "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
                       "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
        "required": ["city", "country", "population_millions", "landmarks"], "additionalProperties": False}
ASK_CITY = [{"role": "user", "content": "Describe the capital of France."}]


def test_json_schema_answers_validate_greedy_and_sampled(client):
    greedy = client.chat.completions.create(model=MODEL, messages=ASK_CITY, temperature=0, max_tokens=120,
                                            response_format=_schema_format(CITY))
    sampled = client.chat.completions.create(model=MODEL, messages=ASK_CITY, temperature=1.0, seed=7, n=4,
                                             max_tokens=120, response_format=_schema_format(CITY))
    for choice in greedy.choices + sampled.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), CITY)
    assert json.loads(greedy.choices[0].message.content)["city"] == "Paris"


def test_json_object_and_regex_schema_on_chat_and_completions(client):
    ask = "Reply with a JSON object with the keys name and color of a cat."
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}],
                                       temperature=0, max_tokens=200, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    rx = r"(yes|no), because [a-z ]{5,40}\."
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is Paris in France?"}],
                                       temperature=0, max_tokens=40,
                                       response_format={"type": "regex_schema", "regex_schema": rx})
    assert re.fullmatch(rx, r.choices[0].message.content), r.choices[0].message.content
    r = client.completions.create(model=MODEL, prompt="The year the Eiffel Tower opened:", max_tokens=8, temperature=0,
                                  extra_body={"response_format": {"type": "regex_schema", "regex_schema": r" [0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"


def test_a_streamed_constrained_answer_equals_the_non_streamed_one(client):
    kw = dict(model=MODEL, messages=ASK_CITY, temperature=0, max_tokens=120, response_format=_schema_format(CITY))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


def _validate_call(call, tools):
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
    assert call.id and call.type == "function"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_choice_give_schema_valid_calls(client, choice):
    tools = [WEATHER, TIME]
    # One call per answer: two would not fit the test server's 256-token context.
    kw = dict(model=MODEL, messages=ASK_WEATHER, tools=tools, tool_choice=choice, parallel_tool_calls=False,
              max_tokens=48)
    r = client.chat.completions.create(temperature=0, **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
    for call in c.message.tool_calls:
        _validate_call(call, tools)
    if isinstance(choice, dict):
        assert [call.function.name for call in c.message.tool_calls] == ["get_time"]
    sampled = client.chat.completions.create(temperature=1.0, seed=3, n=3, **kw)
    for c in sampled.choices:
        assert c.finish_reason == "tool_calls"
        for call in c.message.tool_calls:
            _validate_call(call, tools)


def test_a_streamed_tool_call_reassembles_to_the_non_streamed_one(client):
    kw = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call: id, type and name
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_tool_result_in_the_history_is_answered(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    # tool_choice none: answer from the result (this small model would otherwise call again)
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and not c.message.tool_calls
    assert "21" in c.message.content or "sunny" in c.message.content.lower(), c.message.content


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "response_format", "strin"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools", "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 7}}}}}]}, "tools", "f"),
    ({"messages": [{"role": "user"}]}, "messages", "no content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "wizard"),
    ({"frobnicate": 1}, "frobnicate", "frobnicate"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "audio"),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
    ({"modalities": ["text", "audio"]}, "modalities", "text"),
    ({"store": True}, "store", "store"),
]


@pytest.mark.parametrize("extra,param,words", BAD)
def test_bad_structured_requests_are_400_naming_the_field(server, extra, param, words):
    import httpx

    body = {"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 4, **extra}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_documented_no_op_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_CITY, max_tokens=3, temperature=0, user="u1",
                                       metadata={"k": "v"}, store=False, service_tier="auto",
                                       extra_body={"prompt_cache_key": "k", "safety_identifier": "s"})
    assert r.choices[0].finish_reason == "length"


def test_apiclient_helpers_make_a_tool_round_trip_and_schema_answers(server):
    from service.client import APIClient, json_schema_format, tool_result_messages

    with APIClient(server) as api:
        item = next(api.chat_completions_v1(model=MODEL, messages=ASK_CITY, temperature=0, max_tokens=120,
                                            response_format=json_schema_format(CITY)))
        jsonschema.validate(json.loads(item["choices"][0]["message"]["content"]), CITY)
        messages = list(ASK_WEATHER)
        item = next(api.chat_completions_v1(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=60))
        seen = []
        messages += tool_result_messages(item, {"get_weather": lambda city, unit: seen.append(city) or "21 C, sunny"})
        assert seen and messages[-1]["role"] == "tool"
        answer = next(api.chat_completions_v1(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                              temperature=0, max_tokens=20))
        assert answer["choices"][0]["message"]["content"]


def test_terminal_client_answers_in_json_and_round_trips_a_tool_call(server, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    schema, tools = tmp_path / "schema.json", tmp_path / "tools.json"
    schema.write_text(json.dumps(CITY))
    tools.write_text(json.dumps([WEATHER]))
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_client", server, "--json-schema", str(schema)],
                       input="Describe the capital of France.\n\nexit\n", capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    answer = r.stdout.split(">>> ")[1].strip().splitlines()[0]
    jsonschema.validate(json.loads(answer), CITY)
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_client", server, "--tools", str(tools),
                        "--tool-choice", "required"],
                       input="Weather in Paris?\n\n21 C and sunny\n\nexit\n", capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "call get_weather(" in r.stdout and "type its result >>> " in r.stdout
    after = r.stdout.split("type its result >>> ")[1].split(">>> ")[0].strip()
    assert after  # the model's answer from the typed result
    bad = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_client", server, "--tools",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.startswith("xlaserve: error: --tools:")


def test_a_grammar_starts_after_the_reasoning_block(engine, tokenizer):
    """Tokens of the <think> block pass the matcher by; the grammar holds from its end: the
    block's tokens would break a JSON grammar if it were applied to them."""
    from service.engine.output import OutputProcessor
    from service.engine.request import Request, Sequence

    grammar = json_schema_grammar({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    seq = Sequence(Request("r", [1], SamplingParams(grammar=grammar, grammar_after="</think>"), print))
    seq.matcher, seq.grammar_wait = engine.grammars.matcher(grammar), "</think>"
    proc = OutputProcessor(tokenizer, None, 256, None, None)
    for tok in tokenizer.encode("<think>is it? yes</think>", add_special_tokens=False):
        assert proc._advance(seq, tok) is None
    assert seq.grammar_wait is None
    json_tokens = tokenizer.encode('{"ok":true}', add_special_tokens=False)
    assert [proc._advance(seq, tok) for tok in json_tokens] == [None] * (len(json_tokens) - 1) + ["stop"]
    broken = engine.grammars.matcher(grammar)
    seq2 = Sequence(Request("r2", [1], SamplingParams(grammar=grammar), print), matcher=broken)
    assert proc._advance(seq2, tokenizer.encode("<think>", add_special_tokens=False)[0]) == "error"
