"""One user against llama.cpp's llama-server, in one sitting: single-stream decode speed over
HTTP on a chat that quotes its context ("hits") and a free-form story ("misses"), greedy,
128 tokens, rounds alternating over every server so a drift of the machine's speed lands on
all of them alike; medians of ``--rounds``.

    python tools/bench_vs_llama.py --llama-server PATH/llama-server --llama-quantize PATH/llama-quantize

Servers (all started first, then measured one at a time; an idle server costs nothing):
- xlaserve float32 and ``--quantize w8a8``, each asked plainly (``"speculative": false``) and
  as its default serves (n-gram speculation, adaptive);
- llama-server on the bundled model's weights requantized to F32 and to Q8_0, each plain and
  with its own n-gram speculation (``--spec-type ngram-simple``, n=3, m=8), ``-t`` the cores.
Prints each configuration's tokens/s (after the first token) and TTFT, and the ratios that
docs/PERFORMANCE.md reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from tools.bench_spec import WORKLOADS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not become ready")


def start(cmd: list[str], log: Path, env=None):
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def chat(url: str, text: str, extra: dict) -> tuple[int, float, float]:
    """(completion tokens, TTFT s, tokens/s after the first) of one streamed greedy chat."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 128, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: {r.status_code} {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    tokens = tokens or chunks
    return tokens, first - t0, (tokens - 1) / (last - first) if last and last > first else 0.0


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--llama-server", required=True)
    a.add_argument("--llama-quantize", required=True)
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--threads", type=int, default=os.cpu_count())
    args = a.parse_args(argv)

    from service.models import default_gguf

    work = Path(tempfile.mkdtemp(prefix="bench-vs-llama-"))
    gguf = default_gguf()
    files = {}
    for kind in ("F32", "Q8_0"):  # the same weights as xlaserve's (the bundled file, dequantized)
        files[kind] = work / f"model-{kind}.gguf"
        subprocess.run([args.llama_quantize, "--allow-requantize", str(gguf), str(files[kind]), kind],
                       check=True, capture_output=True)
    servers = {}
    procs = []
    try:
        for name, extra in (("xlaserve float32", []), ("xlaserve w8a8", ["--quantize", "w8a8"])):
            port = free_port()
            log = work / f"{name.replace(' ', '-')}.log"
            proc = start([sys.executable, "-m", "service.cli", "serve", "api_server", "--server-name", "127.0.0.1",
                          "--server-port", str(port), "--max-batch-size", "4", "--log-level", "WARNING", *extra], log)
            procs.append(proc)
            servers[name] = (f"http://127.0.0.1:{port}", proc, log)
        for kind in ("F32", "Q8_0"):
            for spec in (False, True):
                port = free_port()
                name = f"llama-server {kind}" + (", ngram-simple" if spec else "")
                cmd = [args.llama_server, "-m", str(files[kind]), "--host", "127.0.0.1", "--port", str(port),
                       "-t", str(args.threads), "-np", "1", "-c", "2048"]
                if spec:
                    cmd += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                            "--spec-ngram-simple-size-m", "8"]
                log = work / f"llama-{kind}-{spec}.log"
                proc = start(cmd, log)
                procs.append(proc)
                servers[name] = (f"http://127.0.0.1:{port}", proc, log)
        for url, proc, log in servers.values():
            wait(url, proc, log)
        configs = []
        for name, (url, _, _) in servers.items():
            if name.startswith("xlaserve"):
                configs += [(f"{name}, plain", url, {"speculative": False}), (f"{name}, default", url, {})]
            else:
                configs.append((name, url, {}))
        for _, url, extra in configs:  # one warm-up generation each: caches, first-call costs
            chat(url, WORKLOADS["hits"][0], extra)
        rates = {(c[0], w): [] for c in configs for w in WORKLOADS}
        ttfts = {(c[0], w): [] for c in configs for w in WORKLOADS}
        for _ in range(args.rounds):
            for name, url, extra in configs:
                for workload, prompts in WORKLOADS.items():
                    for text in prompts:
                        n, ttft, rate = chat(url, text, extra)
                        rates[(name, workload)].append(rate)
                        ttfts[(name, workload)].append(ttft)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"1 stream, greedy, up to 128 tokens, {args.threads} threads, medians of {args.rounds} rounds x "
              f"{len(WORKLOADS['hits'])} prompts")
        for name, _, _ in configs:
            print(f"  {name:36s} hits {med[(name, 'hits')]:6.1f} tok/s (TTFT "
                  f"{1000 * statistics.median(ttfts[(name, 'hits')]):4.0f} ms)   misses {med[(name, 'misses')]:6.1f} "
                  f"tok/s (TTFT {1000 * statistics.median(ttfts[(name, 'misses')]):4.0f} ms)")
        print("ratios:")
        for ours, theirs in (("xlaserve float32, default", "llama-server F32"),
                             ("xlaserve float32, default", "llama-server F32, ngram-simple"),
                             ("xlaserve float32, plain", "llama-server F32"),
                             ("xlaserve w8a8, plain", "llama-server Q8_0"),
                             ("xlaserve w8a8, default", "llama-server Q8_0"),
                             ("xlaserve w8a8, default", "llama-server Q8_0, ngram-simple")):
            print(f"  {ours} / {theirs}: hits {med[(ours, 'hits')] / med[(theirs, 'hits')]:.2f}x, misses "
                  f"{med[(ours, 'misses')] / med[(theirs, 'misses')]:.2f}x")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
