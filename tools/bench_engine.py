"""Engine benchmark on the default (or given) model, with the machine's bounds measured in the
same run so the figures mean something on any machine.

    python tools/bench_engine.py [MODEL] --streams 1 16 --prompt-len 128 --output-len 128
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tools/bench_engine.py --tp 2
    python tools/bench_engine.py --constrained   # also every stream under one JSON schema

Each stream count runs --repeat times (default 3) and the run of median throughput is
reported, with the spread. Reports per stream count: output tokens/s, TTFT and TPOT (median,
p99), and the fraction of the bound: batch 1 decode is memory-bound (weight bytes x tokens/s / streaming bandwidth);
batched decode is compute-bound (2 x params x tokens/s / matmul FLOP/s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np


def measure_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a streaming copy (read + write counted), median of reps."""
    a = np.ones(mb * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / statistics.median(times)


def measure_flops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


_runs = 0


# The constrained mode's schema: one long string, so a stream writes --output-len tokens under
# the grammar as an unconstrained one does without it.
BENCH_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
                "required": ["text"], "additionalProperties": False}


async def run_streams(engine, streams: int, prompt_len: int, output_len: int, grammar: str | None = None):
    from service.params import SamplingParams

    global _runs
    _runs += 1  # new prompts every run: a repeated prompt would be served from the prefix cache
    rng = np.random.default_rng(_runs)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, grammar=grammar)

    async def one(i):
        ids = [int(x) for x in rng.integers(100, 30000, prompt_len)]
        t0 = time.perf_counter()
        stamps = []
        async for out in engine.generate(ids, params):
            stamps.append(time.perf_counter())
        ttft = stamps[0] - t0
        tpot = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        return ttft, tpot, len(stamps)

    t = time.perf_counter()
    results = await asyncio.gather(*[one(i) for i in range(streams)])
    wall = time.perf_counter() - t
    return results, wall


def context_sweep(checkpoint, contexts: list[int], reps: int = 10, dtype: str | None = None,
                  quantize: str | None = None, kv_cache_dtype: str | None = None) -> None:
    """Decode-step time of one slot at each context length (session sized for the longest):
    attention reads a bucketed span, so the step should grow with the context, not with the
    session length."""
    from model.checkpoint import load_config, load_params
    import dataclasses

    from service.engine import direct
    from service.engine.runner import ModelRunner

    cfg = load_config(checkpoint)
    cfg = dataclasses.replace(cfg, dtype=dtype or cfg.dtype)
    runner = ModelRunner(cfg, load_params(checkpoint, cfg), 1, max(contexts) + 1, quantize=quantize,
                         kv_cache_dtype=kv_cache_dtype)
    for n in contexts:
        direct.decode(runner, [0], [1], [n], [1])  # compile this span
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            direct.decode(runner, [0], [1], [n], [1])
            times.append(time.perf_counter() - t)
        print(f"context {n:6d} tokens (session {runner.session_len}): decode step "
              f"{1000 * statistics.median(times):.1f} ms median")
    del runner


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantize", choices=["int8", "w8a8"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "int8"], default=None)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per stream count; the run of median throughput is reported, "
                             "with the spread of all runs")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--context", type=int, nargs="*", default=[256, 4096],
                        help="also time a 1-slot decode step with this many tokens of context")
    parser.add_argument("--constrained", action="store_true",
                        help="also run every stream count with each stream under one JSON schema, "
                             "alternating with the unconstrained runs, and report the ratio")
    args = parser.parse_args(argv)


    from model.backends import param_bytes
    from service.engine.config import EngineConfig
    from service.models import build_engine, resolve

    checkpoint, name = resolve(args.model, args.dtype)
    if args.context:
        context_sweep(checkpoint, args.context, dtype=args.dtype, quantize=args.quantize,
                      kv_cache_dtype=args.kv_cache_dtype)
    session_len = 256 if args.prompt_len + args.output_len <= 256 else 512
    # A whole session per slot: every stream count runs without preemption.
    engine = build_engine(checkpoint, EngineConfig(
        max_batch_size=max(args.streams), session_len=session_len, dtype=args.dtype, tp=args.tp, dp=args.dp,
        quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype,
        num_blocks=max(args.streams) // args.dp * -(-session_len // 32)))
    cfg = engine.runner.cfg
    # The bytes a decode step streams: the weights as the runner holds them.
    weight_bytes = param_bytes(engine.runner.params)
    weight_kind = args.quantize or cfg.dtype
    bw = measure_bandwidth()
    flops = measure_flops(dtype=cfg.dtype)
    # A mixture of experts' token reads and computes with its chosen experts only: the bounds
    # below count the active parameters (at batch 1, the bytes of those).
    active = cfg.active_params / cfg.num_params
    moe = f", {cfg.active_params / 1e6:.1f}M active per token" if cfg.num_experts else ""
    print(f"model {name}: {cfg.num_params / 1e6:.1f}M params{moe}, {weight_bytes / 2**20:.0f} MiB weights "
          f"({weight_kind}) on {engine.runner.backend.describe()}")
    print(f"machine: streaming bandwidth {bw / 1e9:.1f} GB/s, matmul {flops / 1e9:.1f} GFLOP/s")
    grammar = None
    if args.constrained:
        import json

        from service.structured import json_schema_grammar

        grammar = json_schema_grammar(BENCH_SCHEMA)
        t = time.perf_counter()
        engine.grammars.check(grammar)
        first = time.perf_counter() - t
        t = time.perf_counter()
        engine.grammars.check(grammar)
        engine.grammars.matcher(grammar)
        cached = time.perf_counter() - t
        print(f"schema {json.dumps(BENCH_SCHEMA)}: compiled in {1000 * first:.1f} ms; cached, check + matcher "
              f"{1000 * cached:.3f} ms")
    try:
        asyncio.run(run_streams(engine, 1, args.prompt_len, 8))  # settle
        for streams in args.streams:
            modes = [("free", None)] + ([("json", grammar)] if grammar else [])
            runs: dict = {m: [] for m, _ in modes}
            for _ in range(max(1, args.repeat)):
                for mode, g in modes:  # alternating, so drift hits both alike
                    results, wall = asyncio.run(run_streams(engine, streams, args.prompt_len, args.output_len, g))
                    runs[mode].append((sum(r[2] for r in results) / wall, results))
            rates = {}
            for mode, _ in modes:
                mode_runs = sorted(runs[mode], key=lambda run: run[0])
                rate, results = mode_runs[len(mode_runs) // 2]
                rates[mode] = rate
                ttfts = [r[0] for r in results]
                tpots = [r[1] for r in results]
                decode_rate = streams / statistics.median(tpots)
                mem_frac = active * weight_bytes * (1 / statistics.median(tpots)) / bw
                compute_frac = 2 * cfg.active_params * decode_rate / flops
                spread = f" (runs {mode_runs[0][0]:.1f}-{mode_runs[-1][0]:.1f})" if len(mode_runs) > 1 else ""
                label = f" {mode}" if grammar else ""
                print(f"streams={streams:3d}{label}: {rate:7.1f} output tokens/s overall{spread}, decode {decode_rate:7.1f} tokens/s | "
                      f"TTFT median {1000 * statistics.median(ttfts):7.1f} ms p99 {1000 * pct(ttfts, 99):7.1f} ms | "
                      f"TPOT median {1000 * statistics.median(tpots):6.1f} ms p99 {1000 * pct(tpots, 99):6.1f} ms | "
                      f"memory-bound fraction {mem_frac:.2f}, compute-bound fraction {compute_frac:.2f}")
            if grammar:
                print(f"streams={streams:3d}: constrained / unconstrained throughput {rates['json'] / rates['free']:.2f}")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
