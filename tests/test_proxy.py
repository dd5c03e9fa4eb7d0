"""``xlaserve serve proxy`` (the SMG gateway behind a node-API shim) over real replicas: two of
the bundled model, and one of a tiny random model that joins by itself with ``--proxy-url``.

The replicas run the shapes the shared test server compiles (``start_server``'s flags), so
they start from the compilation cache."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import ROOT, _free_port, wait_ready

MODEL = "SmolLM2-135M-Instruct"
REPLICA_FLAGS = ["--session-len", "256", "--max-batch-size", "4", "--log-level", "INFO"]


def _spawn(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": ""}
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _replica(log, *extra: str):
    port = _free_port()
    proc = _spawn(["api_server", "--server-name", "127.0.0.1", "--server-port", str(port), *REPLICA_FLAGS,
                   *extra], log)
    return proc, f"http://127.0.0.1:{port}"


def _proxy(log, *extra: str):
    port = _free_port()
    proc = _spawn(["proxy", "--server-name", "127.0.0.1", "--server-port", str(port), *extra], log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, [proc], log, timeout=60)
    return proc, url


def _stop(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def _loads(url: str) -> dict:
    return httpx.get(url + "/v1/loads", timeout=10).json()["loads"][0]


def _finished(url: str) -> float:
    """Requests this replica finished, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("xlaserve_requests_finished_total"))


def _nodes(proxy: str) -> dict:
    r = httpx.get(proxy + "/nodes/status", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def tiny_hf(default_checkpoint, tmp_path_factory):
    """A tiny random Llama with the bundled model's tokenizer: a second, different model."""
    import shutil

    import torch
    import transformers

    from model.convert.build import TOKENIZER_FILES

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_checkpoint / name).exists() and name != "generation_config.json":
            shutil.copy(default_checkpoint / name, path / name)
    return path


@pytest.fixture(scope="module")
def fleet(server, tmp_path_factory):
    """Two replicas of the bundled model and a cache-aware proxy over them: (proxy, [A, B],
    process B, proxy process, log dir). A is the suite's shared server (its flags are the
    replicas'), so only B starts here; B is the one a test may kill."""
    logs = tmp_path_factory.mktemp("fleet")
    pb, b = _replica(logs / "b.log")
    procs = [pb]
    try:
        wait_ready(b, procs, logs / "b.log")
        proxy_proc, proxy = _proxy(logs / "proxy.log", "--worker-urls", server, b)
        procs.append(proxy_proc)
        _wait(lambda: len([n for n in _nodes(proxy).values() if n["healthy"]]) == 2, 60, "both replicas routable")
        yield proxy, [server, b], pb, proxy_proc, logs
    finally:
        _stop(*procs)


def test_proxy_serves_chat_streams_and_completions_from_both_replicas(fleet):
    proxy, replicas, *_ = fleet
    before = [_finished(r) for r in replicas]
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="none")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0,
        stream=True) if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content  # greedy: the same answer, whichever replica
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert completion.choices[0].text

    async def burst():  # distinct texts at once: balanced over both
        async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="none") as c:
            await asyncio.gather(*(c.completions.create(model=MODEL, prompt=f"{i} {word} " * 8, max_tokens=16)
                                   for i, word in enumerate(["apple", "river", "stone", "cloud", "tiger",
                                                             "piano", "maple", "ocean"])))

    asyncio.run(burst())
    served = [_finished(r) - b for r, b in zip(replicas, before)]
    assert sum(served) == 11
    assert all(n >= 1 for n in served), served


def _conversation(proxy: str, topic: str) -> list[tuple[int, int]]:
    """Four turns of one chat through ``proxy``: (prompt tokens, cached tokens) per turn."""
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="none")
    facts = " ".join(f"{topic} fact {i}." for i in range(18))
    messages = [{"role": "user", "content": f"Tell me about {topic}. {facts}"}]
    turns = []
    for turn in range(4):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        turns.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"And then? ({turn})"}]
    return turns


def _kept(turns, block=32) -> list[bool]:
    """For each later turn, whether the replica it reached held the whole previous prompt's
    full blocks (it did, if it served the previous turn)."""
    return [cached >= (prev // block) * block for (prev, _), (_, cached) in zip(turns, turns[1:])]


def test_a_conversation_keeps_its_replica_under_cache_aware_but_not_round_robin(fleet):
    proxy, replicas, *_, logs = fleet
    turns = _conversation(proxy, "volcanoes")
    assert turns[0][0] > 96  # long enough that a replica without it shows it in cached_tokens
    assert all(_kept(turns)), turns
    rr_proc, rr = _proxy(logs / "proxy-rr.log", "--routing-strategy", "round_robin", "--worker-urls", *replicas)
    try:
        _wait(lambda: len([n for n in _nodes(rr).values() if n["healthy"]]) == 2, 60, "both replicas routable")
        turns = _conversation(rr, "glaciers")
    finally:
        _stop(rr_proc)
    assert not all(_kept(turns)), turns  # alternating replicas: some turn lands where its history is not


@pytest.fixture(scope="module")
def tiny_replica(fleet, tiny_hf, tmp_path_factory):
    proxy = fleet[0]
    log = tmp_path_factory.mktemp("tiny") / "tiny.log"
    proc, url = _replica(log, str(tiny_hf), "--model-name", "tiny", "--proxy-url", proxy, "--drain-timeout", "60",
                         "--session-len", "4096")
    try:
        wait_ready(url, [proc], log)
        yield proc, url, log
    finally:
        _stop(proc)


def test_a_replica_registers_itself_and_each_model_is_routed_to_its_replica(fleet, tiny_replica):
    proxy = fleet[0]
    _, tiny, _ = tiny_replica
    nodes = _wait(lambda: (n := _nodes(proxy)).get(tiny, {}).get("healthy") and n, 30, "the tiny replica listed")
    assert nodes[tiny]["models"] == ["tiny"]
    assert any(w["url"] == tiny for w in httpx.get(proxy + "/workers", timeout=10).json()["workers"])
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="none")
    assert sorted(m.id for m in client.models.list()) == sorted([MODEL, "tiny"])
    before = _finished(tiny)
    for model in ("tiny", MODEL, "tiny"):
        r = client.completions.create(model=model, prompt="Hello there", max_tokens=4)
        assert r.model == model
    assert _finished(tiny) - before == 2
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=4)
    assert e.value.status_code == 404 and e.value.body["type"] == "invalid_request_error"


def test_node_api_adds_and_removes_and_refuses_bad_input_in_words(fleet):
    proxy, (a, _), *_ = fleet
    r = httpx.post(proxy + "/nodes/remove", params={"node_url": a}, timeout=30)
    assert r.status_code == 200 and r.json() == "Deleted successfully"
    assert a not in _nodes(proxy)
    r = httpx.post(proxy + "/nodes/add", json={"url": a}, timeout=60)
    assert r.status_code == 200 and r.json() == "Added successfully"
    assert _nodes(proxy)[a]["models"] == [MODEL]
    dead = f"http://127.0.0.1:{_free_port()}"
    for path, kwargs, status, param in (("/nodes/add", {"json": {"url": dead}}, 400, "url"),
                                        ("/nodes/add", {"json": {"uri": a}}, 400, "url"),
                                        ("/nodes/add", {"content": b"{not json"}, 400, None),
                                        ("/nodes/remove", {"params": {"node_url": dead}}, 404, "node_url"),
                                        ("/nodes/remove", {}, 400, "node_url")):
        r = httpx.post(proxy + path, timeout=30, **kwargs)
        assert r.status_code == status, (path, kwargs, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_sigterm_leaves_the_proxy_before_the_drain_ends(fleet, tiny_replica):
    proxy = fleet[0]
    proc, tiny, log = tiny_replica
    _wait(lambda: tiny in _nodes(proxy), 30, "the tiny replica listed")
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    gone_while_streaming = None
    with httpx.stream("POST", tiny + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        last = None
        for line in lines:
            if line.startswith("data:"):
                last = line
                if gone_while_streaming is None and tiny not in _nodes(proxy):
                    gone_while_streaming = True
    assert last == "data: [DONE]"  # the drain let it finish
    assert gone_while_streaming, "the replica was still listed when its last request finished"
    assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert text.index("left the proxy") < text.index("drained: every request finished")


def test_api_keys_on_the_proxy(fleet, tmp_path):
    _, (a, _), *_ = fleet
    proc, url = _proxy(tmp_path / "proxy-keys.log", "--api-keys", "k1", "k2", "--worker-urls", a)
    try:
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # for load balancers
        r = httpx.get(url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(url + "/nodes/status", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="k2")
        _wait(lambda: [m.id for m in client.models.list()] == [MODEL], 30, "the replica routable")
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    finally:
        _stop(proc)
    assert proc.returncode == 0  # SIGTERM: the gateway drained and exited 0, and so did the proxy


def test_sigkill_of_a_replica_under_load(fleet, tmp_path):
    """Runs last: it kills replica B."""
    _, (a, b), pb, *_ = fleet
    rr_proc, rr = _proxy(tmp_path / "proxy-kill.log", "--routing-strategy", "round_robin", "--worker-urls", a, b)
    try:
        _wait(lambda: len([n for n in _nodes(rr).values() if n["healthy"]]) == 2, 60, "both replicas routable")
        held = _loads(a)["num_used_tokens"]  # blocks other tests' sessions keep on the shared server
        asyncio.run(_kill_under_load(rr, b, pb))
        # Nothing left pending at the survivor: no request, and no KV block beyond what it held.
        _wait(lambda: (lambda x: (x["num_total_reqs"], x["num_used_tokens"]) == (0, held))(_loads(a)), 30,
              "the survivor idle")
    finally:
        _stop(rr_proc)


async def _kill_under_load(proxy: str, victim: str, victim_proc) -> None:
    client = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="none", max_retries=0)

    async def stream(i):
        text = ""
        try:
            async for chunk in await client.completions.create(
                    model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=150, stream=True,
                    extra_body={"ignore_eos": True}):
                text += chunk.choices[0].text if chunk.choices else ""
        except openai.APIConnectionError as e:  # a broken connection, not an answer
            return "broken", str(e), time.monotonic()
        except openai.APIError as e:  # an error event in the stream
            return "cut", str(e), time.monotonic()
        return "done", text, time.monotonic()

    streams = [asyncio.ensure_future(stream(i)) for i in range(6)]
    await asyncio.to_thread(_wait, lambda: _loads(victim)["num_running_reqs"] > 0, 30, "streams on the victim")
    victim_proc.kill()
    killed = time.monotonic()
    after = [await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                                  max_tokens=4) for i in range(6)]
    assert all(r.choices[0].message.content is not None for r in after)  # every one: on the survivor
    results = await asyncio.gather(*streams)
    cut = [r for r in results if r[0] == "cut"]
    assert cut, results  # the victim's streams
    # The victim's streams end promptly, each with an error event (the gateway's "Stream error:
    # ... unexpected EOF"), which the SDK raises as an APIError; no [DONE], no hang.
    assert not [r for r in results if r[0] == "broken"], results
    for _, message, ended in cut:
        assert ended - killed < 15
        assert "error" in message.lower()
    assert [r for r in results if r[0] == "done"]  # the survivor's streams finished
    await client.close()


def test_a_missing_gateway_is_one_line_naming_the_install(monkeypatch, capsys):
    from service import cli, proxy

    monkeypatch.setattr(proxy, "gateway_binary", lambda: None)
    assert cli.main(["serve", "proxy", "--server-port", str(_free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'xlaserve[proxy]'" in err
