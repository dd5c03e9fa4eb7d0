"""End to end against a live `xlaserve serve api_server` on the default model: the official
openai SDK, every README snippet, the interactive API, and OpenAI error bodies."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_checkpoint, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "XLA_FLAGS": ""}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "api_server", "--server-name", "127.0.0.1",
             "--server-port", str(port), "--session-len", "256", "--max-batch-size", "4",
             "--log-level", "WARNING"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
    assert len(choice.logprobs.token_logprobs) == 4
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
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
    turns = ["hi, what's your name?", "who developed you?", "Tell me more about your developers",
             "Summarize the information we've talked so far"]
    history, inputs = [], []
    for t in turns:
        r = httpx.post(server + "/v1/chat/interactive", timeout=120, json={
            "prompt": t, "session_id": 7, "interactive_mode": True, "request_output_len": 16,
            "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["finish_reason"] in ("stop", "length")
        history.append(body["history_tokens"])
        inputs.append(body["input_tokens"])
    assert history[0] == 0 and all(b > a for a, b in zip(history, history[1:]))
    full_first = inputs[0]
    assert all(n < full_first for n in inputs[1:]), inputs  # later turns send only their own tokens
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
    (block,) = _readme_blocks("python")
    code = block.replace("http://localhost:23333", server)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ChatCompletion(" in r.stdout


def test_openapi_is_valid_and_swagger_is_offline(server):
    spec = httpx.get(server + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/models"} <= set(spec["paths"])
    page = httpx.get(server + "/").text
    assert "/static/swagger/swagger-ui-bundle.js" in page
    assert "https://" not in page  # nothing loaded from a CDN
    assert httpx.get(server + "/static/swagger/swagger-ui-bundle.js").status_code == 200
