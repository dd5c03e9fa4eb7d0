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
