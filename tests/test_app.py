"""The HTTP layer in-process (Litestar's test client) over a tiny random model: auth, CORS,
readiness, and refusals that must come as a status code before any stream starts."""

import pytest
from litestar.testing import TestClient

from conftest import tiny_engine
from service.engine import direct
from service.engine.plan import Chunk
from service.app import ServerSettings, State, create_app

CHAT = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def engine(default_checkpoint):
    engine = tiny_engine(default_checkpoint, slots=2)
    yield engine
    engine.stop()


def client(engine, **settings):
    return TestClient(create_app(State(ServerSettings(model_name="tiny", **settings), engine)))


def test_api_keys_guard_every_route_but_health(engine):
    with client(engine, api_keys=("k1", "k2")) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
            assert c.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 401
            assert c.get("/metrics", headers=headers).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).json()["data"][0]["id"] == "tiny"
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_cors_headers_follow_the_flags(engine):
    with client(engine, allow_origins=("http://ui.example",)) as c:
        r = c.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = c.get("/v1/models", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in r.headers
    with client(engine) as c:  # no flags: no CORS headers
        r = c.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in r.headers


def test_not_ready_is_503_and_health_says_loading():
    with TestClient(create_app(State(ServerSettings(model_name="tiny")))) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and "error" in r.json()


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_is_503_before_the_stream_starts(engine, stream):
    queue = engine.waiting.max_queue
    engine.waiting.max_queue = 0
    try:
        with client(engine) as c:
            for path, body in (("/v1/chat/completions", CHAT),
                               ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("/v1/chat/interactive", {"prompt": "hi", "request_output_len": 2})):
                r = c.post(path, json={**body, "stream": stream})
                assert r.status_code == 503, (path, r.text)
                assert "capacity" in r.json()["error"]["message"]
    finally:
        engine.waiting.max_queue = queue


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the killed thread
def test_health_fails_when_the_engine_thread_dies_or_stalls(engine):
    """/health is 200 while the engine works, 503 once pending work has made no progress for
    --stall-timeout, 200 again when it moves, and 503 for good when the engine thread dies."""
    import threading
    import time

    from service.params import SamplingParams

    step, release, stuck = engine._step, threading.Event(), threading.Event()

    def stalled_step():
        stuck.set()
        release.wait()
        step()

    try:
        with client(engine, stall_timeout=0.5) as c:
            assert c.get("/health").status_code == 200
            engine._step = stalled_step
            engine.submit([1, 2, 3], SamplingParams(max_tokens=2), lambda out: None)
            assert stuck.wait(10)
            time.sleep(1.0)
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "engine stalled"
            engine._step = step
            release.set()
            deadline = time.monotonic() + 10
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "health did not recover"
                time.sleep(0.05)

            def crash():
                raise SystemExit("engine thread killed")

            engine._step = crash
            engine.submit([1, 2, 3], SamplingParams(max_tokens=2), lambda out: None)
            engine._thread.join(10)
            assert not engine._thread.is_alive()
            assert c.get("/health").status_code == 503
    finally:
        release.set()
        engine._step = step
        if not engine._thread.is_alive():  # the other tests' engine runs on
            engine.start()


def test_an_adapter_that_is_not_served_is_refused_by_name(engine):
    with client(engine) as c:
        r = c.post("/v1/chat/interactive", json={"prompt": "hi", "request_output_len": 2, "adapter_name": "lora1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_name"
        assert c.post("/v1/chat/interactive", json={"prompt": "hi", "request_output_len": 2}).status_code == 200


def test_streams_say_their_own_content_type(engine):
    """An event stream must be served as text/event-stream (a gateway in front passes an
    SSE error event only into a stream it knows is one), and interactive's lines as NDJSON."""
    with client(engine) as c:
        for path, body, media in (("/v1/chat/completions", CHAT, "text/event-stream"),
                                  ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, "text/event-stream"),
                                  ("/v1/chat/interactive", {"prompt": "hi", "request_output_len": 2},
                                   "application/x-ndjson")):
            with c.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].split(";")[0] == media, path
                r.read()


def test_loads_report_running_waiting_and_kv_usage(engine):
    """/v1/loads, which the proxy's gateway balances on: the same counts as /metrics, in
    SGLang's fields; sections it does not have are left out, unknown ones refused."""
    import threading
    import time

    from service.params import SamplingParams

    with client(engine) as c:
        idle = c.get("/v1/loads", params={"include": "core,disagg,queues,memory"}).json()
        assert idle["dp_rank_count"] == 1 and len(idle["loads"]) == 1
        load = idle["loads"][0]
        assert (load["num_running_reqs"], load["num_waiting_reqs"], load["num_used_tokens"]) == (0, 0, 0)
        assert load["max_total_num_tokens"] == engine.blocks.total_blocks() * engine.blocks.block_size
        assert load["max_running_requests"] == 2
        # A request held mid-generation: running, and its blocks in use.
        gate, seen = threading.Event(), []

        def emit(out):
            seen.append(out)
            gate.wait(30)

        engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True), emit)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = c.get("/v1/loads").json()
        gate.set()
        load = busy["loads"][0]
        assert load["num_running_reqs"] == 1 and load["num_total_reqs"] == 1
        assert load["num_used_tokens"] >= engine.blocks.block_size
        assert load["token_usage"] == pytest.approx(load["num_used_tokens"] / load["max_total_num_tokens"])
        assert busy["aggregate"]["total_running_reqs"] == 1
        r = c.get("/v1/loads", params={"include": "core,bogus"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "include"


def test_chat_logprob_bytes_are_the_tokens_own_bytes(engine, default_checkpoint):
    """A token holding part of a UTF-8 character reports that part (as OpenAI does), not the
    bytes of U+FFFD that its decoded text shows. The reference is the vocabulary itself: a
    byte-level BPE token's characters map back to bytes through GPT-2's byte alphabet."""
    import json

    vocab = json.loads((default_checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
    alphabet = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = alphabet + [256 + n for n in range(256 - len(alphabet))]
    byte_of = dict(zip(map(chr, chars), [*alphabet, *(b for b in range(256) if b not in alphabet)]))
    def raw(text):
        return bytes(byte_of[c] for c in text)

    # A token made of the first two bytes of a 3-byte character: a leader and one continuation.
    split = next(tid for text, tid in sorted(vocab.items(), key=lambda kv: kv[1])
                 if len(text) == 2 and 0xE0 <= raw(text)[0] < 0xF0 and 0x80 <= raw(text)[1] < 0xC0)
    want = list(raw(next(t for t, i in vocab.items() if i == split)))
    with client(engine) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
                                                 "logit_bias": {str(split): 100}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [t["bytes"] for t in content] == [want, want]
    assert content[0]["token"] == "\ufffd"  # its text alone cannot show it
    assert content[0]["top_logprobs"][0]["bytes"] == want


def test_interactive_takes_the_servers_sampling_defaults(engine):
    """One precedence on every route: the request, then the server's defaults
    (--generation-config), then the route's own (interactive: LMDeploy's 0.8 / 40 / 0.8).
    A server configured greedy answers interactive requests greedily, whatever their seed."""
    from service.params import SamplingParams

    body = {"prompt": "hi", "request_output_len": 8}

    def texts(c, **extra):
        return {c.post("/v1/chat/interactive", json={**body, "seed": seed, **extra}).json()["text"]
                for seed in (1, 2, 3)}

    with client(engine, defaults=SamplingParams(temperature=0.0), default_fields=frozenset({"temperature"})) as c:
        assert len(texts(c)) == 1  # greedy: the server's temperature
        assert len(texts(c, temperature=1.0)) == 3  # the request's value wins
    with client(engine) as c:  # nothing configured: the route's 0.8 samples
        assert len(texts(c)) == 3


def test_a_session_under_a_template_that_drops_replies_is_a_400(engine):
    """A template that leaves assistant replies out cannot continue a session's cached
    history: the second turn is a 400 that says so (it was a 500)."""
    template = ("{% for m in messages %}{% if m.role != 'assistant' %}<{{ m.role }}>{{ m.content }}{% endif %}"
                "{% endfor %}<assistant>")
    with client(engine, chat_template=template) as c:
        turn = {"prompt": "hi", "session_id": 7, "interactive_mode": True, "request_output_len": 2}
        assert c.post("/v1/chat/interactive", json=turn).status_code == 200
        r = c.post("/v1/chat/interactive", json=turn)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "interactive_mode"
        assert "leaves earlier assistant replies out" in r.json()["error"]["message"]
        c.post("/v1/chat/interactive", json={**turn, "interactive_mode": False, "request_output_len": 0})


def test_token_ids_outside_the_vocabulary_are_400s_naming_them(engine):
    """They were wrapped modulo the vocabulary (prompt ids) or dropped (logit_bias)."""
    from service.errors import InvalidRequest
    from service.params import SamplingParams

    vocab = engine.runner.cfg.vocab_size
    with client(engine) as c:
        r = c.post("/v1/completions", json={"prompt": [5, vocab + 7], "max_tokens": 2})
        assert r.status_code == 400 and str(vocab + 7) in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(vocab + 3): 5}})
        assert r.status_code == 400 and str(vocab + 3) in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "logit_bias"
        r = c.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(i): 1 for i in range(301)}})
        assert r.status_code == 400 and "at most 300" in r.json()["error"]["message"]
    with pytest.raises(InvalidRequest, match="at most 300"):
        engine.submit([1], SamplingParams(max_tokens=1, logit_bias=tuple((i, 1.0) for i in range(301))),
                      lambda out: None)
    with pytest.raises(InvalidRequest, match=str(vocab)):  # the engine itself, for Python callers
        engine.submit([1, vocab], SamplingParams(max_tokens=1), lambda out: None)


def test_echo_only_completion_stream_honours_include_usage(engine):
    import json

    body = {"prompt": "hello there", "max_tokens": 0, "echo": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with client(engine) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == "hello there"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == 2
    assert events[-1]["usage"]["completion_tokens"] == 0


def test_wire_types_and_clients_import_without_jax():
    """protocol.py promises it never imports jax (clients and tools import it cheaply); it did,
    through SamplingParams' module."""
    import subprocess
    import sys

    code = ("import sys, service.protocol, service.protocol_responses, service.protocol_messages, "
            "service.protocol_embeddings, service.client, service.proxy, service.registration; "
            "print(sorted(m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


class Scripted:
    """The tiny engine's tokenizer, checks and metrics, with generation replaced by a script of
    Outputs: the HTTP layer's handling of what an engine reports, without a device."""

    def __init__(self, engine, outputs):
        self._engine, self.outputs = engine, outputs

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt_ids, params, emit, session_id=None, request_id=None, images=()):
        for out in self.outputs:
            emit(out)
        return "scripted"

    def abort(self, request_id):
        pass

    def generate(self, prompt_ids, params, session_id=None, request_id=None, images=()):
        from service.engine.bridge import stream

        return stream(self, prompt_ids, params, session_id, request_id)


def test_an_engine_failure_mid_answer_ends_responses_and_messages_streams(engine):
    """The same failure on the Responses and Messages streams: their own failure events, after
    the text that was already sent."""
    import json

    from service.engine import Output

    script = [Output(text="Hel", token_ids=[5], prompt_tokens=3, completion_tokens=1),
              Output(finish_reason="error", prompt_tokens=3, completion_tokens=1)]
    app = create_app(State(ServerSettings(model_name="tiny"), Scripted(engine, script)))
    with TestClient(app) as c:
        for path, body, last in (
                ("/v1/responses", {"input": "hi", "max_output_tokens": 3}, "response.failed"),
                ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, "error")):
            with c.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1]["type"] == last, events
            assert "the engine failed" in json.dumps(events[-1])
            deltas = [e for e in events if e["type"] in ("response.output_text.delta", "content_block_delta")]
            assert "".join(e.get("delta", {}).get("text", "") if path == "/v1/messages" else e["delta"]
                           for e in deltas) == "Hel"
            assert not [e for e in events if e["type"] in ("response.completed", "message_stop")]


def test_an_engine_failure_mid_answer_is_one_error_event_then_done(engine):
    """finish "error" from the engine: a stream already begun gets one SSE error event (OpenAI's
    body) and [DONE], no finish chunk; an answer not yet begun is a 500 with OpenAI's body."""
    import json

    from service.engine import Output

    script = [Output(text="Hel", token_ids=[5], prompt_tokens=3, completion_tokens=1),
              Output(finish_reason="error", prompt_tokens=3, completion_tokens=1)]
    app = create_app(State(ServerSettings(model_name="tiny"), Scripted(engine, script)))
    with TestClient(app) as c:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi", "max_tokens": 3})):
            with c.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]", lines
            events = [json.loads(line[6:]) for line in lines[:-1]]
            errors = [e for e in events if "error" in e]
            assert len(errors) == 1 and errors[0] is events[-1], events
            assert errors[0]["error"]["message"] == "the engine failed while generating this request"
            assert errors[0]["error"]["type"] == "internal_error"
            text = "".join((ch.get("delta", {}).get("content") or ch.get("text") or "")
                           for e in events[:-1] for ch in e["choices"])
            assert text == "Hel"
            assert not [ch for e in events[:-1] for ch in e["choices"] if ch.get("finish_reason")]
            r = c.post(path, json=body)
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "the engine failed while generating this request"


def test_reasoning_comes_back_as_reasoning_items_and_thinking_blocks(engine):
    """Under a reasoning parser, the <think> block is a Responses ``reasoning`` item and a
    Messages ``thinking`` block, streamed or whole, and the rest the answer's text."""
    import json

    from service.engine import Output

    script = [Output(text="<think>Paris is", token_ids=[5]), Output(text=" the capital.</think>", token_ids=[6]),
              Output(text="Paris", token_ids=[7], finish_reason="stop", prompt_tokens=3, completion_tokens=3)]
    app = create_app(State(ServerSettings(model_name="tiny", reasoning_parser="qwen3"), Scripted(engine, script)))
    with TestClient(app) as c:
        r = c.post("/v1/responses", json={"input": "hi"}).json()
        assert [item["type"] for item in r["output"]] == ["reasoning", "message"]
        assert r["output"][0]["content"][0]["text"] == "Paris is the capital."
        assert r["output"][1]["content"][0]["text"] == "Paris"
        assert r["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
        with c.stream("POST", "/v1/responses", json={"input": "hi", "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == \
            "Paris is the capital."
        assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "message"]
        m = c.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).json()
        assert [(b["type"], b.get("thinking", b.get("text"))) for b in m["content"]] == [
            ("thinking", "Paris is the capital."), ("text", "Paris")]
        with c.stream("POST", "/v1/messages", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 5, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        thinking = "".join(e["delta"]["thinking"] for e in events
                           if e["type"] == "content_block_delta" and e["delta"]["type"] == "thinking_delta")
        assert thinking == "Paris is the capital."
        assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["thinking", "text"]


def test_the_response_store_keeps_the_most_recent():
    from service.errors import NotFound
    from service.protocol_responses import ResponseObject
    from service.routes.store import ResponseStore

    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(ResponseObject(id=rid, created_at=0, model="m"), [])
    store.get("a")  # used: now b is the least recent
    store.put(ResponseObject(id="c", created_at=0, model="m"), [])
    assert store.get("a").response.id == "a" and store.get("c").response.id == "c"
    with pytest.raises(NotFound):
        store.get("b")
    empty = ResponseStore(0)
    empty.put(ResponseObject(id="x", created_at=0, model="m"), [])
    assert len(empty) == 0


def test_mean_pooled_embeddings_sum_over_every_chunk(engine):
    """--task embed on a generative model (mean pooling): an input longer than the engine's
    prefill chunk (32 tokens here) is pooled over all its chunks, equal to the mean of one
    whole-prompt call's final hidden states, normalised."""
    import numpy as np

    from service.engine.runner import ModelRunner

    ids = [int(x) for x in np.random.default_rng(4).integers(100, 30000, 70)]
    with client(engine, embedding=("mean", True)) as c:
        r = c.post("/v1/embeddings", json={"input": [ids, ids[:10]]})
        assert r.status_code == 200, r.text
        got = [np.array(d["embedding"]) for d in r.json()["data"]]
        assert r.json()["usage"]["prompt_tokens"] == 80
        chat = c.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 400 and "--task embed" in chat.json()["error"]["message"]
    from model.weights import init_params

    # The tiny engine's params (conftest.tiny_engine makes them so), in one call of 128 tokens.
    whole = ModelRunner(engine.runner.cfg, init_params(engine.runner.cfg, seed=0), max_batch_size=1,
                        session_len=128, max_prefill_chunk=128)
    for vector, prompt in zip(got, (ids, ids[:10])):
        hidden = direct.prefill_chunks(whole, [Chunk(slot=0, tokens=tuple(prompt), start=0, last=True,
                                                     embed=True)]).hidden
        want = hidden.mean(axis=0)
        np.testing.assert_allclose(vector, want / np.linalg.norm(want), atol=1e-5)


class Buggy(Scripted):
    """An engine whose stream breaks with a bug (not a ServiceError) after its first Output."""

    def generate(self, prompt_ids, params, session_id=None, request_id=None, images=()):
        outputs = self.outputs

        async def broken():
            yield outputs[0]
            raise RuntimeError("a bug in the engine")

        return broken()


def test_a_bug_mid_stream_is_each_routes_own_error_event_with_a_generic_message(engine):
    """One stream-error policy on every streamed route: a failure that is not a ServiceError is
    logged with its traceback and ends the stream with the route's own error event, saying
    no more than that something failed."""
    import json
    import logging

    from service.engine import Output

    script = [Output(text="Hel", token_ids=[5], prompt_tokens=3, completion_tokens=1)]
    app = create_app(State(ServerSettings(model_name="tiny"), Buggy(engine, script)))
    routes = (("/v1/chat/completions", CHAT, lambda e: e["error"]),
              ("/v1/completions", {"prompt": "hi", "max_tokens": 3}, lambda e: e["error"]),
              ("/v1/responses", {"input": "hi", "max_output_tokens": 3}, lambda e: e["response"]["error"]),
              ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
               lambda e: e["error"]),
              ("/v1/chat/interactive", {"prompt": "hi", "request_output_len": 3}, lambda e: e["error"]))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("service.routes.common")
    logger.addHandler(handler)
    with TestClient(app) as c:
        for path, body, error in routes:
            records.clear()
            with c.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line and not line.startswith("event: ")]
            if lines[-1] == "data: [DONE]":  # OpenAI's streams end so, even after an error
                lines = lines[:-1]
            last = json.loads(lines[-1].removeprefix("data: "))
            assert error(last)["message"] == "internal error while streaming", (path, last)
            assert [str(r.exc_info[1]) for r in records] == ["a bug in the engine"], path
    logger.removeHandler(handler)


def test_the_route_modules_import_each_other_without_a_circle():
    """Among ``service/routes/`` the imports point one way, and none hides in a function (an
    import deferred to dodge a circle keeps the circle)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).parent.parent / "service" / "routes"
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("service.routes."):
                deps.add(node.module.rsplit(".", 1)[1])
                assert node.col_offset == 0, f"{path.name} imports {node.module} inside a function"
        graph[path.stem] = deps

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert graph["common"] and "chat_run" in graph["openai"]  # the graph is the real one
    assert [m for m in graph if reaches(m, m, set())] == []


def test_a_model_is_retrieved_by_a_name_with_slashes_in_either_shape(engine):
    with TestClient(create_app(State(ServerSettings(model_name="org/tiny-1"), engine))) as c:
        card = c.get("/v1/models/org/tiny-1").json()
        assert card["id"] == "org/tiny-1" and card["object"] == "model"
        assert card["created"] == c.get("/v1/models").json()["data"][0]["created"]  # the server's start
        r = c.get("/v1/models/org/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        info = c.get("/v1/models/org/tiny-1", headers={"anthropic-version": "2023-06-01"}).json()
        assert info["type"] == "model" and info["display_name"] == "org/tiny-1" and info["created_at"].endswith("Z")
        r = c.get("/v1/models/nope", headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_stored_responses_input_items_page_in_either_order(engine):
    items = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "more"}]}]
    with client(engine) as c:
        rid = c.post("/v1/responses", json={"input": items, "max_output_tokens": 2}).json()["id"]
        asc = c.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"}).json()
        assert asc["object"] == "list" and asc["has_more"] is False
        assert [(i["role"], i["content"]) for i in asc["data"]] == [
            ("user", [{"type": "input_text", "text": "hi"}]), ("assistant", [{"type": "output_text", "text": "hello"}]),
            ("user", [{"type": "input_text", "text": "more"}])]
        ids = [i["id"] for i in asc["data"]]
        assert len(set(ids)) == 3 and (asc["first_id"], asc["last_id"]) == (ids[0], ids[-1])
        desc = c.get(f"/v1/responses/{rid}/input_items").json()  # OpenAI's default order
        assert [i["id"] for i in desc["data"]] == ids[::-1]
        first = c.get(f"/v1/responses/{rid}/input_items", params={"order": "asc", "limit": 2}).json()
        assert [i["id"] for i in first["data"]] == ids[:2] and first["has_more"] is True
        rest = c.get(f"/v1/responses/{rid}/input_items",
                     params={"order": "asc", "limit": 2, "after": first["last_id"]}).json()
        assert [i["id"] for i in rest["data"]] == ids[2:] and rest["has_more"] is False
        for params, param in (({"after": "msg_nope"}, "after"), ({"order": "up"}, "order"), ({"limit": 0}, "limit")):
            r = c.get(f"/v1/responses/{rid}/input_items", params=params)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, params
        text = c.post("/v1/responses", json={"input": "just text", "max_output_tokens": 2}).json()["id"]
        (only,) = c.get(f"/v1/responses/{text}/input_items").json()["data"]
        assert only["type"] == "message" and only["content"] == [{"type": "input_text", "text": "just text"}]
        assert c.get("/v1/responses/resp_nope/input_items").status_code == 404



def test_a_responses_stream_adds_each_message_empty_and_its_part_once(engine):
    """The openai SDK builds its snapshot from the events: an item as added, then each part
    as content_part.added brings it. Accumulated so, every item holds exactly its parts."""
    import json

    with client(engine) as c, c.stream("POST", "/v1/responses",
                                       json={"input": "hi", "max_output_tokens": 4, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    items: dict[int, dict] = {}
    for e in events:
        if e["type"] == "response.output_item.added":
            items[e["output_index"]] = e["item"]
            if e["item"]["type"] == "message":
                assert e["item"]["content"] == [] and e["item"]["status"] == "in_progress"
        elif e["type"] == "response.content_part.added":
            items[e["output_index"]]["content"].append(e["part"])
    final = events[-1]["response"]["output"]
    assert [len(i["content"]) for i in items.values()] == [len(i["content"]) for i in final] == [1] * len(final)


def test_a_messages_stream_reports_the_prompts_cache_split_at_its_start_as_at_its_end(engine):
    import json

    body = {"messages": [{"role": "user", "content": "tell me a story " * 20}], "max_tokens": 3, "stream": True}
    with client(engine) as c:
        for attempt in range(2):  # the second finds the first's prompt blocks in the cache
            with c.stream("POST", "/v1/messages", json=body) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            start = events[0]["message"]["usage"]
            (delta,) = [e for e in events if e["type"] == "message_delta"]
            assert events[0]["type"] == "message_start" and events[1]["type"] == "ping"
            for key in ("input_tokens", "cache_read_input_tokens"):
                assert start[key] == delta["usage"][key], (attempt, start, delta)
    assert start["cache_read_input_tokens"] > 0 and start["input_tokens"] > 0
