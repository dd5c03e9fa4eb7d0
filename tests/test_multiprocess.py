"""One mesh over two processes (jax.distributed, gloo collectives on CPU): two processes with
2 emulated devices each serve the default model at --tp 2 --dp 2 and produce the same tokens
as one process on one device."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Name three primary colors."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(extra, devices, **popen):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "service.cli", "generate", "--prompt", PROMPT, "--max-tokens", "16",
           "--log-level", "WARNING", *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_two_processes_generate_what_one_does(default_checkpoint):
    single = _generate([], 1)
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err
    want = out.strip()
    assert want

    port = _free_port()
    common = ["--tp", "2", "--dp", "2", "--nnodes", "2", "--coordinator-address", f"127.0.0.1:{port}"]
    follower = _generate([*common, "--node-rank", "1"], 2)
    leader = _generate([*common, "--node-rank", "0"], 2)
    try:
        out, err = leader.communicate(timeout=600)
        assert leader.returncode == 0, err[-3000:]
        f_out, f_err = follower.communicate(timeout=120)
        assert follower.returncode == 0, f_err[-3000:]
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
    # gloo's connection messages go to stderr: stdout holds exactly the generated text.
    assert out.strip() == want
    assert f_out == ""  # the follower only computes


def test_bad_rank_and_missing_coordinator_are_one_line_errors(default_checkpoint):
    for extra, message in ((["--nnodes", "2", "--node-rank", "2", "--coordinator-address", "127.0.0.1:1"],
                            "--node-rank must be in [0, 2)"),
                           (["--nnodes", "2"], "--coordinator-address HOST:PORT is required")):
        p = _generate(extra, 1)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1
        assert err.strip().splitlines()[-1] == f"xlaserve: error: {message}" or message in err
        assert "Traceback" not in err


def test_sigterm_on_process_0_stops_the_followers_cleanly(default_checkpoint, tmp_path):
    """A two-process server answers; SIGTERM to process 0 during a long stream drains it (the
    stream is aborted at --drain-timeout with a finish reason and [DONE]); the follower is
    released (no collective failure) and both exit 0 without a traceback."""
    import json
    import signal
    import threading

    import httpx

    from conftest import wait_ready

    port, http_port = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    common = [sys.executable, "-m", "service.cli", "serve", "api_server", "--tp", "2", "--nnodes", "2",
              "--coordinator-address", f"127.0.0.1:{port}", "--session-len", "128", "--max-batch-size", "2",
              "--drain-timeout", "1", "--log-level", "WARNING"]
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = []
    for rank in (1, 0):
        extra = ["--server-name", "127.0.0.1", "--server-port", str(http_port)] if rank == 0 else []
        with open(logs[rank], "w") as f:
            procs.append(subprocess.Popen([*common, "--node-rank", str(rank), *extra], env=env, cwd=ROOT,
                                          stdout=f, stderr=subprocess.STDOUT))
    follower, leader = procs
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url, procs, logs[0])
        r = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                     "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        lines, started = [], threading.Event()

        def stream():
            body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        leader.send_signal(signal.SIGTERM)
        reader.join(120)
        assert leader.wait(timeout=120) == 0, logs[0].read_text()[-3000:]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert follower.wait(timeout=120) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
