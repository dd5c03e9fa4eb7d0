"""HTTP load benchmark of a running (or here started) `xlaserve serve api_server`: what many
users at once see.

    python tools/bench_http.py                      # starts the default server, runs, stops it
    python tools/bench_http.py --tree /path/to/other/checkout   # the same, from another checkout
    python tools/bench_http.py --url http://127.0.0.1:23333     # a server already running

Reports, each a median over --repeat runs (fresh prompts every run):
- burst: --chats short chats sent at once (--output-len tokens each): wall time, output tokens/s,
  TTFT p50 and p90, and how many got their first token before the first chat finished;
- shared prefix: --shared-chats chats behind one system prompt of about --shared-len tokens,
  against as many with system prompts of the same length all different: TTFT of each and
  their ratio (a prefix cache serves the shared ones' system prompt once);
- memory: the server's resident set (when this script started it) and its KV cache's
  bytes per token, from the log line and /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water room mother area money story month lot right study "
         "book word business issue side kind head house service friend father power hour game line end member law "
         "car city community name president team minute idea kid body information back parent face others level "
         "office door health art war history party result change morning reason research girl guy moment air "
         "teacher force education").split()


def text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


MODEL = ["default"]  # the served model's name, read from /v1/models


async def chat(client: httpx.AsyncClient, url: str, messages: list, max_tokens: int, clock: dict, key):
    body = {"model": MODEL[0], "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"content"' in line and first is None:
                first = time.perf_counter()
                clock.setdefault("firsts", []).append((first, key))
            m = re.search(r'"completion_tokens":\s*(\d+)', line)
            if m:
                tokens = int(m.group(1))
    done = time.perf_counter()
    clock.setdefault("dones", []).append(done)
    return (first or done) - t0, tokens


async def burst(url: str, chats: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    clock: dict = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=chats + 4)) as client:
        t = time.perf_counter()
        results = await asyncio.gather(*(
            chat(client, url, [{"role": "user", "content": f"Question {i}: {text(rng, 12)}?"}], output_len, clock, i)
            for i in range(chats)))
        wall = time.perf_counter() - t
    ttfts = [r[0] for r in results]
    first_done = min(clock["dones"])
    before = sum(1 for f, _ in clock["firsts"] if f < first_done)
    return dict(wall=wall, tok_s=sum(r[1] for r in results) / wall, ttft50=np.percentile(ttfts, 50),
                ttft90=np.percentile(ttfts, 90), before_first_finish=before)


async def shared_prefix(url: str, chats: int, shared_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    words = int(shared_len / 1.35)  # about 1.35 tokens a word with this vocabulary
    out = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=chats + 4)) as client:
        for kind in ("distinct", "shared"):
            system = text(rng, words)
            msgs = [[{"role": "system", "content": system if kind == "shared" else text(rng, words)},
                     {"role": "user", "content": f"Question {i}: {text(rng, 8)}?"}] for i in range(chats)]
            results = await asyncio.gather(*(chat(client, url, m, 8, {}, i) for i, m in enumerate(msgs)))
            out[kind] = statistics.median(r[0] for r in results)
    out["ratio"] = out["shared"] / out["distinct"]
    return out


def metric(url: str, name: str) -> float | None:
    body = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}\s+([0-9.e+-]+)$", body, re.M)
    return float(m.group(1)) if m else None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(tree: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "api_server", "--server-name",
                             "127.0.0.1", "--server-port", str(port), *extra],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tree, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not become ready")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a server already running")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose server to start (default: this one)")
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--shared-chats", type=int, default=16)
    parser.add_argument("--shared-len", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("server_args", nargs="*", help="extra api_server flags (after --)")
    args = parser.parse_args(argv)

    proc = None
    url = args.url
    if url is None:
        log = Path("/tmp") / f"bench_http_{os.getpid()}.log"
        proc, url = start(args.tree, log, args.server_args)
    try:
        MODEL[0] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(burst(url, 4, 4, 0))  # settle
        idle_rss = rss_mib(proc.pid) if proc else None
        bursts = [asyncio.run(burst(url, args.chats, args.output_len, 1 + i)) for i in range(args.repeat)]
        med = {k: statistics.median(b[k] for b in bursts) for k in bursts[0]}
        print(f"burst of {args.chats} chats x {args.output_len} tokens: wall {med['wall']:.2f} s, "
              f"{med['tok_s']:.0f} tok/s, TTFT p50 {med['ttft50']:.2f} s p90 {med['ttft90']:.2f} s, "
              f"{med['before_first_finish']:.0f} of {args.chats} had their first token before the first finished "
              f"(runs: wall {', '.join('%.2f' % b['wall'] for b in bursts)})")
        shared = [asyncio.run(shared_prefix(url, args.shared_chats, args.shared_len, 100 + i))
                  for i in range(args.repeat)]
        print(f"{args.shared_chats} chats behind one ~{args.shared_len}-token system prompt: TTFT median "
              f"{statistics.median(s['shared'] for s in shared):.2f} s; distinct system prompts "
              f"{statistics.median(s['distinct'] for s in shared):.2f} s; ratio "
              f"{statistics.median(s['ratio'] for s in shared):.3f} "
              f"(runs {', '.join('%.3f' % s['ratio'] for s in shared)})")
        if proc:
            print(f"server RSS: {idle_rss:.0f} MiB after start, {rss_mib(proc.pid):.0f} MiB after the runs")
            kv = re.findall(r"KV cache [^\n]*", log.read_text())
            if kv:
                print("log:", kv[0])
        used = metric(url, 'xlaserve_kv_cache_blocks{state="used"}')
        total = metric(url, 'xlaserve_kv_cache_blocks{state="total"}')
        if used is not None:
            print(f"KV blocks in use now: {used:.0f} of {total:.0f}")
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
