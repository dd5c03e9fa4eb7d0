"""The chat page (`xlaserve serve gradio URL`) end to end in headless Chromium against the live
api_server on the default model: a streamed answer, a stop that frees the server's slot,
readable errors. Chromium comes from Debian's package (.ci/run installs it)."""

import contextlib
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, _free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def _metric(server, name, labels=""):
    text = httpx.get(server + "/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def _chat_page(api_server_url):
    """`xlaserve serve gradio API_SERVER_URL` until the block ends: the page's URL, once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "gradio", api_server_url,
                             "--server-name", "127.0.0.1", "--server-port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the chat page did not come up"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ui(server):
    with _chat_page(server) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _wait_for(page, expression, timeout=30.0):
    """Poll ``expression`` in the page until it is true. (Playwright's wait_for_function
    evaluates a string with eval, which the page's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def _set_slider(page, id_, value):
    page.eval_on_selector(f"#{id_}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def test_chat_streams_an_answer_and_stop_frees_the_request(ui, server, browser, tmp_path):
    page = browser.new_page()
    page.goto(ui)
    _wait_for(page, "document.getElementById('model').textContent.includes('SmolLM2')")
    _set_slider(page, "temperature", 0)
    _set_slider(page, "max_tokens", 24)
    page.fill("#prompt", "What is the capital of France?")
    # Streamed: the reply grows through several lengths before it is done. The page records
    # every length it shows (polling from here can miss a short answer's steps on a busy machine).
    page.evaluate("""() => {
        window.__lengths = new Set();
        new MutationObserver(() => {
            const a = document.querySelector('.assistant');
            if (a && a.dataset.state === 'streaming') window.__lengths.add(a.textContent.length);
        }).observe(document.body, {childList: true, subtree: true, characterData: true, attributes: true});
    }""")
    page.click("#send")
    deadline = time.monotonic() + 120
    while page.get_attribute(".assistant", "data-state") in (None, "streaming"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lengths = set(page.evaluate("() => [...window.__lengths]"))
    answer = page.inner_text(".assistant")
    assert "Paris" in answer
    assert len({n for n in lengths if n > 0}) >= 2, lengths
    assert page.get_attribute(".assistant", "data-finish") == "stop"

    # A second turn keeps the history; stop it mid-answer.
    aborted = _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}')
    _set_slider(page, "max_tokens", 150)  # history + 150 stays within the 256-token session
    page.fill("#prompt", "Now write a long essay about the history of Paris.")
    page.click("#send")
    _wait_for(page, "document.querySelectorAll('.assistant')[1]?.textContent.length > 0", 120)
    assert _metric(server, "xlaserve_requests_running") == 1
    page.click("#stop")
    _wait_for(page, "document.querySelectorAll('.assistant')[1].dataset.state === 'stopped'")
    deadline = time.monotonic() + 20
    while _metric(server, "xlaserve_requests_running") > 0:
        assert time.monotonic() < deadline, "the server kept generating after stop"
        time.sleep(0.2)
    assert _metric(server, "xlaserve_requests_finished_total", '{finish_reason="abort"}') == aborted + 1
    page.screenshot(path=str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 0

    page.click("#new")
    assert page.query_selector_all(".msg") == []
    page.close()


def test_server_errors_are_shown_as_messages(ui, browser):
    page = browser.new_page()
    page.goto(ui)
    _wait_for(page, "document.getElementById('model').textContent.includes('SmolLM2')")
    _set_slider(page, "max_tokens", 4000)  # more than the api_server's 256-token session
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#error", state="visible")
    assert "maximum context length is 256 tokens" in page.inner_text("#error")
    assert "Traceback" not in page.content()
    page.close()


def test_unreachable_api_server_is_a_readable_message(browser):
    with _chat_page("http://127.0.0.1:1") as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#error", state="visible")
        assert "cannot reach the api_server" in page.inner_text("#error")
        page.close()


ANSWER = """Here is **bold**, and a list:

- one
- two

| a | b |
|---|---|
| 1 | 2 |

```python
def f(x):
    return x + 1
```

<script>window.__pwned = "script"</script>
<img src="x" onerror="window.__pwned = 'img'">
<a href="javascript:window.__pwned='link'">click</a>
"""


def _scripted_upstream():
    """An OpenAI-compatible server whose one answer streams reasoning, markdown with hostile
    HTML in it, and a tool call in two fragments: (uvicorn server, url)."""
    import json as _json
    import threading

    import uvicorn
    from litestar import Litestar, get, post
    from litestar.params import JSONBody
    from litestar.response import Stream

    def event(delta, finish=None):
        return ("data: " + _json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                + "\n\n").encode()

    @get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @post("/v1/chat/completions", status_code=200)
    async def chat(data: JSONBody[dict]) -> Stream:
        async def chunks():
            yield event({"role": "assistant", "reasoning_content": "Let me think <b>hard</b>."})
            for i in range(0, len(ANSWER), 40):
                yield event({"content": ANSWER[i:i + 40]})
            yield event({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city": '}}]})
            yield event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
            yield event({}, "tool_calls")
            yield b"data: [DONE]\n\n"

        return Stream(chunks(), media_type="text/event-stream")

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(Litestar([models, chat]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def test_answers_render_as_sanitized_markdown_with_reasoning_and_tool_calls(browser):
    """Markdown renders (emphasis, a list, a table, a highlighted code block); reasoning sits in
    a collapsed block and a tool call shows as a call; the answer's <script>, onerror and
    javascript: link never run, and the page refuses inline script besides."""
    upstream, upstream_url = _scripted_upstream()
    try:
        with _chat_page(upstream_url) as url:
            _check_rendering(browser, url)
    finally:
        upstream.should_exit = True


def _check_rendering(browser, url):
    r = httpx.get(url + "/", timeout=5)
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for asset in ("/static/webui.js", "/static/vendor/marked/marked.umd.js"):  # served here, no CDN
        assert httpx.get(url + asset, timeout=5).status_code == 200
    page = browser.new_page()
    page.goto(url)
    _wait_for(page, "document.getElementById('model').textContent.includes('scripted')")
    page.fill("#prompt", "Show me everything")
    page.click("#send")
    _wait_for(page, "document.querySelector('.assistant')?.dataset.state === 'done'", 30)
    reply = ".assistant"
    assert page.inner_text(f"{reply} .content strong") == "bold"
    assert page.eval_on_selector_all(f"{reply} .content ul li", "els => els.map(e => e.textContent)") == \
        ["one", "two"]
    assert page.eval_on_selector_all(f"{reply} .content table td", "els => els.map(e => e.textContent)") == \
        ["1", "2"]
    code = page.query_selector(f"{reply} .content pre code")
    assert "hljs" in code.get_attribute("class") and code.query_selector_all("span[class^=hljs-]")
    assert "return x + 1" in code.inner_text()
    # Reasoning: collapsed, its text shown as text (no <b> element made of it).
    assert page.eval_on_selector(f"{reply} details.reasoning", "d => d.open") is False
    assert "Let me think <b>hard</b>." == page.eval_on_selector(f"{reply} .reasoning-text", "e => e.textContent")
    assert page.query_selector(f"{reply} .reasoning-text b") is None
    assert page.inner_text(f"{reply} .tool-call .tool-name").startswith("get_weather")
    assert page.inner_text(f"{reply} .tool-call pre") == '{"city": "Paris"}'
    assert page.get_attribute(reply, "data-finish") == "tool_calls"
    # Nothing hostile survived or ran, the link included once clicked.
    assert page.query_selector_all(f"{reply} script") == []
    assert page.eval_on_selector_all(f"{reply} img", "els => els.filter(e => e.hasAttribute('onerror')).length") == 0
    link = page.query_selector(f"{reply} .content a")  # kept as a link, its javascript: target dropped
    assert not (link.get_attribute("href") or "").startswith("javascript:")
    link.click()
    time.sleep(0.5)
    assert page.evaluate("() => window.__pwned") is None
    # The second layer: an inline handler that reached the page anyway is refused by its CSP.
    page.evaluate("""() => { const i = document.createElement('img');
        i.setAttribute('onerror', 'window.__pwned = "csp"'); i.src = 'x'; document.body.append(i); }""")
    time.sleep(0.5)
    assert page.evaluate("() => window.__pwned") is None
    page.close()
