"""End to end against a live `xlaserve serve api_server` on the default model: the official
openai SDK, every README snippet, the interactive API, and OpenAI error bodies."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture()
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server + "/v1")


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count from one to ten."}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices][-1] == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=[
        {"role": "user", "content": "Count from one to ten."}])
    assert text == full.choices[0].message.content


def test_completions_string_list_echo_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                  temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text.startswith("The capital of France is")
    # Echo scores the prompt: its tokens come first (the first without a logprob), then the 4.
    assert len(choice.logprobs.token_logprobs) == r.usage.prompt_tokens + 4
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs[1:])
    many = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]


def test_n_and_seed_and_stop(client):
    kw = dict(model=MODEL, max_tokens=16, temperature=1.0, seed=1234,
              messages=[{"role": "user", "content": "Tell me a story."}])
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, stop=["Paris"],
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=3, logprobs=True, top_logprobs=3,
                                       messages=[{"role": "user", "content": "Hi"}])
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy picks the top


def test_errors_raise_matching_sdk_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, temperature=-1, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert "maximum context length is 256 tokens" in e.value.body["message"]
    r = httpx.post(server + "/v1/chat/completions", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_interactive_session_prefills_only_new_turns(server):
    """The engine's own counters show the work: each later turn prefills its new tokens, and
    takes the history from the session's blocks."""
    turns = ["hi, what's your name?", "who developed you?", "Tell me more about your developers",
             "Summarize the information we've talked so far"]
    for i, t in enumerate(turns):
        prefilled = _metric(server, "xlaserve_prompt_tokens_total")
        cached = _metric(server, "xlaserve_prefix_cache_hit_tokens_total")
        r = httpx.post(server + "/v1/chat/interactive", timeout=120, json={
            "prompt": t, "session_id": 7, "interactive_mode": True, "request_output_len": 16,
            "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["finish_reason"] in ("stop", "length")
        if i == 0:
            assert body["history_tokens"] == 0
            continue
        assert body["history_tokens"] > 0
        # The new turn's tokens, and at most the last answer's final token: a step that checked
        # speculative drafts (on by default) does not write the KV of the token it drew last,
        # where a chained decode step would have.
        computed = _metric(server, "xlaserve_prompt_tokens_total") - prefilled
        hit = _metric(server, "xlaserve_prefix_cache_hit_tokens_total") - cached
        assert computed - body["input_tokens"] in (0, 1), body
        assert computed + hit == body["input_tokens"] + body["history_tokens"], body
    r = httpx.post(server + "/v1/chat/interactive", json={"prompt": "bye", "session_id": 7,
                                                           "interactive_mode": False, "request_output_len": 4})
    assert r.json()["history_tokens"] == 0


def test_interactive_full_session_finishes_with_length(server):
    body = None
    for _ in range(40):
        body = httpx.post(server + "/v1/chat/interactive", timeout=120, json={
            "prompt": "Write a long story about dragons. " * 3, "session_id": 99, "interactive_mode": True,
            "request_output_len": 64, "temperature": 0, "ignore_eos": True}).json()
        if body["text"] == "" and body["finish_reason"] == "length":
            break
    assert body["text"] == "" and body["finish_reason"] == "length"


def _readme_blocks(lang):
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_curl_snippets_run(server):
    blocks = [b for b in _readme_blocks("bash") if "curl" in b]
    assert len(blocks) == 4
    for block in blocks:
        cmd = block.replace("http://localhost:23333", server)
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert "error" not in body, body


def test_readme_python_snippet_runs(server):
    # (the LoRA section's snippet needs a server with an adapter: tests/test_lora.py runs it; the
    # images section's, a model that takes images: tests/test_images.py; the training loops'
    # in-process sketch is what tools/rollout_example.py runs, in tests/test_rollout.py)
    openai_block, structured_block, client_block = [
        b for b in _readme_blocks("python") if "sql-lora" not in b and "build_engine" not in b and "image_url" not in b]
    for block, expect in ((openai_block, "ChatCompletion("), (structured_block, "tool_calls get_weather {"),
                          (client_block, "'choices': [")):
        code = block.replace("http://localhost:23333", server)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout


def test_openapi_is_valid_and_swagger_is_offline(server):
    spec = httpx.get(server + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/models", "/v1/responses",
            "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens", "/v1/embeddings"} <= set(
        spec["paths"])
    page = httpx.get(server + "/").text
    assert "/static/swagger/swagger-ui-bundle.js" in page
    assert "https://" not in page  # nothing loaded from a CDN
    assert httpx.get(server + "/static/swagger/swagger-ui-bundle.js").status_code == 200


def _metric(server, name, labels=""):
    """Value of one series on /metrics (0 when absent)."""
    text = httpx.get(server + "/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while _metric(server, "xlaserve_requests_running") or _metric(server, "xlaserve_requests_waiting"):
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.2)


def test_metrics_count_tokens_and_latencies(server):
    r = httpx.get(server + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before_gen = _metric(server, "xlaserve_generation_tokens_total")
    before_ttft = _metric(server, "xlaserve_time_to_first_token_seconds_count")
    before_stop = _metric(server, "xlaserve_requests_finished_total", '{finish_reason="length"}')
    body = httpx.post(server + "/v1/completions", timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 5
    assert _metric(server, "xlaserve_generation_tokens_total") == before_gen + 5
    assert _metric(server, "xlaserve_time_to_first_token_seconds_count") == before_ttft + 1
    assert _metric(server, "xlaserve_requests_finished_total", '{finish_reason="length"}') == before_stop + 1
    text = httpx.get(server + "/metrics").text
    for name in ("xlaserve_time_per_output_token_seconds_bucket", "xlaserve_e2e_request_latency_seconds_bucket",
                 "xlaserve_requests_waiting"):
        assert name in text
    # The KV and prefix-cache gauges, by value: a prompt of several blocks sent twice is a hit
    # the second time, and the ratios follow the counters and block counts they come from.
    prompt = "The history of the printing press: " + " ".join(f"page {i}." for i in range(40))
    hits = _metric(server, "xlaserve_prefix_cache_hit_tokens_total")
    usages = [httpx.post(server + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 1, "temperature": 0}).json()["usage"] for _ in range(2)]
    second = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert second >= usages[1]["prompt_tokens"] - 32  # all its full blocks
    assert _metric(server, "xlaserve_prefix_cache_hit_tokens_total") - hits == \
        usages[0]["prompt_tokens_details"]["cached_tokens"] + second
    _wait_idle(server)
    hit_total = _metric(server, "xlaserve_prefix_cache_hit_tokens_total")
    prompt_total = _metric(server, "xlaserve_prompt_tokens_total")
    assert _metric(server, "xlaserve_prefix_cache_hit_rate") == pytest.approx(hit_total / (hit_total + prompt_total))
    used = _metric(server, "xlaserve_kv_cache_blocks", '{state="used"}')
    total = _metric(server, "xlaserve_kv_cache_blocks", '{state="total"}')
    assert total > 0 and _metric(server, "xlaserve_kv_cache_usage_ratio") == pytest.approx(used / total)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_request(server, stream):
    _wait_idle(server)
    aborted = _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}')
    body = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": "Write a long essay about the sea."}]}
    with httpx.Client(timeout=httpx.Timeout(3.0, connect=5.0)) as c:
        if stream:  # read the first chunk, then hang up
            with c.stream("POST", server + "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                next(resp.iter_raw())
        else:  # give up waiting for the answer
            with pytest.raises(httpx.ReadTimeout):
                c.post(server + "/v1/chat/completions", json=body)
    # 200 tokens take far longer than this at this model's speed here: only an abort frees it.
    _wait_idle(server, timeout=20)
    assert _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}') == aborted + 1


def test_oversized_body_is_413(server):
    r = httpx.post(server + "/v1/completions", content=b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "error" in r.json()


def test_openapi_validates_as_openapi_3(server):
    from openapi_spec_validator import validate

    validate(httpx.get(server + "/openapi.json").json())


SNIPPETS = [
    # The reference document's three APIClient examples, with our import path.
    """from service.client import APIClient
api_client = APIClient('{url}')
model_name = api_client.available_models[0]
messages = [{{"role": "user", "content": "Say this is a test!"}}]
for item in api_client.chat_completions_v1(model=model_name, messages=messages, max_tokens=8):
    print(item)
""",
    """from service.client import APIClient
api_client = APIClient('{url}')
model_name = api_client.available_models[0]
for item in api_client.completions_v1(model=model_name, prompt='hi'):
    print(item)
""",
    """from service.client import APIClient
api_client = APIClient('{url}')
messages = [
    "hi, what's your name?",
    "who developed you?",
]
for message in messages:
    for item in api_client.chat_interactive_v1(prompt=message,
                                               session_id=11,
                                               interactive_mode=True,
                                               stream=False, request_output_len=8):
        print(item)
api_client.end_session(11)
""",
]


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_apiclient_reference_snippets_run(server, snippet):
    r = subprocess.run([sys.executable, "-c", snippet.format(url=server)], capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    items = [eval(line) for line in r.stdout.splitlines()]  # printed dicts
    assert items and all("error" not in i for i in items)
    if "chat_interactive_v1" in snippet:
        assert [i["history_tokens"] > 0 for i in items] == [False, True]
    else:
        assert items[0]["choices"] and items[0]["usage"]["completion_tokens"] > 0


def test_apiclient_streams_and_raises_server_errors(server):
    from service.client import APIClient, APIError

    client = APIClient(server)
    chunks = list(client.chat_completions_v1(model=MODEL, messages="Count to five.", stream=True,
                                             max_tokens=6, temperature=0))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    full = next(client.chat_completions_v1(model=MODEL, messages="Count to five.", max_tokens=6,
                                           temperature=0))
    assert text == full["choices"][0]["message"]["content"]
    with pytest.raises(APIError) as e:
        next(client.chat_completions_v1(model=MODEL, messages="x", temperature=-1))
    assert e.value.status == 400 and "temperature" in e.value.message
    with pytest.raises(APIError) as e:
        APIClient("http://127.0.0.1:1").available_models
    assert e.value.status == 0 and "cannot reach" in e.value.message


def test_terminal_client_keeps_the_session(server):
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_client", server,
                        "--session-id", "4242"],
                       input="My name is Ada.\n\nWhat is my name?\n\nexit\n", capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "connected to" in r.stdout
    replies = r.stdout.split(">>> ")[1:]
    assert len(replies) == 3 and all(x.strip() for x in replies[:2])  # two answers, then exit
    bad = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_client", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.startswith("xlaserve: error: cannot reach")
    assert "Traceback" not in bad.stderr


def test_sixty_four_streaming_clients_half_hang_up(server):
    """64 concurrent streams; the odd ones hang up after their first chunk. The rest get whole
    answers, every slot is free afterwards, and the server still answers."""
    import asyncio

    _wait_idle(server)
    aborted = _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}')

    async def one(c, i):
        body = {"prompt": f"Item {i}:", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with c.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if i % 2:  # hang up mid-stream
                        return None
            return events

    async def main():
        async with httpx.AsyncClient(timeout=600) as c:
            return await asyncio.gather(*[one(c, i) for i in range(64)])

    results = asyncio.run(main())
    for events in results[0::2]:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 6
    _wait_idle(server)
    # Those that hung up before their last token were aborted; none is left running.
    assert _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}') > aborted
    r = httpx.post(server + "/v1/completions", timeout=60, json={"prompt": "Still there?", "max_tokens": 2})
    assert r.status_code == 200


def test_sigterm_drains_streams_refuses_new_requests_and_exits_cleanly(default_checkpoint, tmp_path):
    """SIGTERM while two streams run: /health and new requests answer 503 at once; the short
    stream finishes as usual, the long one is aborted at --drain-timeout, both with a finish
    reason and [DONE]; then the process exits 0 without a traceback."""
    import signal
    import threading

    from conftest import start_server

    log = tmp_path / "server.log"
    # The short stream needs a few decode steps of the 1.5 s even on a loaded machine; the long
    # one cannot write 210 tokens in it even on a fast one (about 100 tokens/s alone).
    proc, url = start_server(log, "--drain-timeout", "1.5", log_level="INFO")
    results, started = {}, {name: threading.Event() for name in ("short", "long")}

    def stream(name, max_tokens):
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started[name].set()
        results[name] = lines

    threads = [threading.Thread(target=stream, args=("short", 4)), threading.Thread(target=stream, args=("long", 210))]
    try:
        threads[1].start()
        assert started["long"].wait(60)
        threads[0].start()
        assert started["short"].wait(60)
        proc.send_signal(signal.SIGTERM)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(url + "/v1/chat/completions", timeout=5, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for name, reason in (("short", "length"), ("long", "abort")):
        lines = results[name]
        assert lines[-1] == "data: [DONE]", (name, lines[-3:])
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]
                    if json.loads(x[6:])["choices"] and json.loads(x[6:])["choices"][0]["finish_reason"]]
        assert finishes == [reason], (name, finishes)
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    assert "draining:" in text and "drain timeout" in text
    # The bundled model's sampling defaults, in effect and said at start.
    assert "sampling defaults (--generation-config auto): temperature=0.2, top_p=0.9" in text


def test_echo_scores_the_prompt_for_evaluation_harnesses(server):
    """How lm-evaluation-harness scores a text: echo with logprobs and max_tokens 0 or 1. The
    prompt's tokens come first in logprobs (the first without one), with offsets into the
    echoed text, then the completion's; a token-id prompt echoes its decoded text."""
    prompt = "The capital of France is Paris."
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0}
    zero = httpx.post(server + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
    one = httpx.post(server + "/v1/completions", json={**body, "max_tokens": 1}, timeout=60).json()
    z, o = zero["choices"][0], one["choices"][0]
    assert z["text"] == prompt and z["finish_reason"] == "length" and zero["usage"]["completion_tokens"] == 0
    lp = z["logprobs"]
    n = zero["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:]) and all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
    # The same prompt scores the same with a token generated after it.
    assert o["logprobs"]["token_logprobs"][:n] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert len(o["logprobs"]["tokens"]) == n + 1 and o["text"].startswith(prompt)
    assert o["logprobs"]["text_offset"][n] == len(prompt)
    ids = httpx.post(server + "/v1/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_ids = httpx.post(server + "/v1/completions", json={**body, "prompt": ids, "max_tokens": 0}).json()
    assert by_ids["choices"][0]["text"] == prompt
    assert by_ids["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    plain = httpx.post(server + "/v1/completions", json={**body, "logprobs": None, "max_tokens": 0}).json()
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None
    bad = httpx.post(server + "/v1/completions", json={**body, "echo": False, "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
