"""Multi-turn chats through ``xlaserve serve proxy``: one replica against two, and the prefix-cache
hit rate under each routing strategy.

    python tools/bench_proxy.py [MODEL] --conversations 16 --turns 4

For each setup it starts the replicas (``--pin`` gives each its own cores with taskset) and a
proxy, runs every conversation at once (each sends its turns one after another, the whole
history every time, as chat clients do), and reports wall time, output tokens/s, TTFT
median and p90, and the prefix-cache hit rate (cached / prompt tokens, from the usage of each
answer). The setups run one after another in one sitting, so their figures compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rivers", "volcanoes", "bridges", "owls", "glaciers", "comets", "tea", "violins", "deserts", "bees",
          "castles", "coral", "maps", "trains", "clouds", "ferns", "salt", "kites", "wolves", "lighthouses"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready")


def _spawn(argv: list[str], log: Path, cpus: str | None = None) -> subprocess.Popen:
    prefix = ["taskset", "-c", cpus] if cpus else []
    return subprocess.Popen([*prefix, sys.executable, "-m", "service.cli", "serve", *argv], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "XLA_FLAGS": ""})


async def _conversation(client: httpx.AsyncClient, url: str, model: str, topic: str, turns: int, tokens: int,
                        out: list) -> None:
    messages = [{"role": "user", "content": f"Tell me about {topic}. " +
                 " ".join(f"Note {i} on {topic}." for i in range(12))}]
    for turn in range(turns):
        body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start, first, text, usage = time.monotonic(), None, "", None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.monotonic()
                        text += choice["delta"]["content"]
        out.append((first - start, usage["completion_tokens"], usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"]))
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": f"What else about {topic}? Turn {turn + 1}."}]


async def _workload(url: str, model: str, conversations: int, turns: int, tokens: int) -> dict:
    out: list = []
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.monotonic()
        await asyncio.gather(*(_conversation(client, url, model, TOPICS[i % len(TOPICS)] + f" {i}", turns, tokens,
                                             out) for i in range(conversations)))
        wall = time.monotonic() - start
    ttft = sorted(x[0] for x in out)
    return dict(wall=wall, tok_s=sum(x[1] for x in out) / wall, ttft_p50=statistics.median(ttft),
                ttft_p90=ttft[int(0.9 * (len(ttft) - 1))], hit=sum(x[3] for x in out) / sum(x[2] for x in out))


def _setup(args, replicas: int, policy: str, logs: Path) -> dict:
    cores = os.cpu_count() or 1
    procs, urls = [], []
    try:
        for i in range(replicas):
            cpus = None
            if args.pin and replicas > 1:
                per = max(1, cores // replicas)
                cpus = f"{i * per}-{i * per + per - 1}"
            port = _port()
            urls.append(f"http://127.0.0.1:{port}")
            procs.append(_spawn(["api_server", *([args.model] if args.model else []), "--server-name", "127.0.0.1",
                                 "--server-port", str(port), "--log-level", "WARNING"],
                                logs / f"replica-{replicas}-{policy}-{i}.log", cpus))
        for url, proc in zip(urls, procs):
            _wait(url, proc)
        if policy == "direct":  # the baseline: one replica, no proxy in front
            model = httpx.get(urls[0] + "/v1/models").json()["data"][0]["id"]
            asyncio.run(_workload(urls[0], model, 2, 1, 4))
            return asyncio.run(_workload(urls[0], model, args.conversations, args.turns, args.tokens))
        port = _port()
        proxy = f"http://127.0.0.1:{port}"
        procs.append(_spawn(["proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                             "--routing-strategy", policy, "--log-level", "WARNING", "--worker-urls", *urls],
                            logs / f"proxy-{replicas}-{policy}.log"))
        _wait(proxy, procs[-1])
        while len(httpx.get(proxy + "/nodes/status").json()) < replicas:
            time.sleep(0.2)
        model = httpx.get(proxy + "/v1/models").json()["data"][0]["id"]
        asyncio.run(_workload(proxy, model, 2, 1, 4))  # the first requests' one-off costs
        return asyncio.run(_workload(proxy, model, args.conversations, args.turns, args.tokens))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per turn")
    parser.add_argument("--pin", action="store_true", help="give each of several replicas its own cores")
    parser.add_argument("--setups", default="1:cache_aware,2:cache_aware,2:round_robin",
                        help="REPLICAS:POLICY pairs, comma separated; 1:direct is one replica without the proxy")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    print(f"{args.conversations} conversations x {args.turns} turns, {args.tokens} output tokens a turn, "
          f"{os.cpu_count()} cores{' (replicas pinned)' if args.pin else ' shared by all replicas'}; logs in {logs}")
    print("| replicas | routing | wall s | output tok/s | TTFT p50 s | TTFT p90 s | prefix hit rate |")
    print("|---|---|---|---|---|---|---|")
    for item in args.setups.split(","):
        n, policy = item.split(":")
        r = _setup(args, int(n), policy, logs)
        print(f"| {n} | {policy} | {r['wall']:.1f} | {r['tok_s']:.0f} | {r['ttft_p50']:.2f} | {r['ttft_p90']:.2f} "
              f"| {r['hit']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
