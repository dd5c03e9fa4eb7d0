"""The chat page (`xlaserve serve gradio URL`) end to end in headless Chromium against the live
api_server on the default model: a streamed answer, a stop that frees the server's slot,
readable errors. Chromium comes from Debian's package (.ci/run installs it)."""

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


@pytest.fixture(scope="module")
def ui(server):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "gradio", server,
                             "--server-name", "127.0.0.1", "--server-port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
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
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _set_slider(page, id_, value):
    page.eval_on_selector(f"#{id_}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def test_chat_streams_an_answer_and_stop_frees_the_request(ui, server, browser, tmp_path):
    page = browser.new_page()
    page.goto(ui)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')")
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
    page.wait_for_function("document.querySelectorAll('.assistant')[1]?.textContent.length > 0",
                           timeout=120_000)
    assert _metric(server, "xlaserve_requests_running") == 1
    page.click("#stop")
    page.wait_for_function("document.querySelectorAll('.assistant')[1].dataset.state === 'stopped'")
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
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')")
    _set_slider(page, "max_tokens", 4000)  # more than the api_server's 256-token session
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#error", state="visible")
    assert "maximum context length is 256 tokens" in page.inner_text("#error")
    assert "Traceback" not in page.content()
    page.close()


def test_unreachable_api_server_is_a_readable_message(browser):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "gradio", "http://127.0.0.1:1",
                             "--server-name", "127.0.0.1", "--server-port", str(port)], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#error", state="visible")
        assert "cannot reach the api_server" in page.inner_text("#error")
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
