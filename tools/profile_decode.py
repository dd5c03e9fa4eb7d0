"""Where a single-stream decode step's time goes: the model's compute against the host's share.

    python tools/profile_decode.py [MODEL] [--quantize w8a8] [--output-len 128] [--repeat 3]

Three measurements on one engine (the default server's settings, speculation off so that every
step is a plain decode step), in one sitting:

1. the decode step alone, dispatched and waited for in turn (no host work in between): the
   model's compute, ``sync``;
2. the runner's own chained loop, step t+1 queued on the device before step t's token is read,
   as the engine does, with nothing else on the host: ``chained``;
3. the engine serving one stream (scheduler, sampling rows, output processing, detokenising,
   the asyncio side), its time per output token: ``engine``.

While (3) runs, a sampler reads the engine thread's and the event loop's Python stacks every
millisecond and sorts each sample by where it is (waiting for the device, the scheduler, the
step's inputs, output processing, ...): the host's share, by part. The report ends with the
engine's per-token time over the model's own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import threading
import time

import numpy as np

# Sampled frames are sorted by the first of these (file fragment, function) pairs found walking
# from the innermost frame outwards; the order puts waits before what waits.
PARTS = (
    ("waiting for the device", ("runner.py", "fetch"), ("runner.py", "_host")),
    ("idle (nothing to run)", ("core.py", "_drain_inbox"), ("queue.py", "get")),
    ("grammar masks", ("structured.py", ""),),
    ("step inputs and dispatch", ("shapes.py", ""), ("programs.py", ""), ("runner.py", "")),
    ("scheduler and KV blocks", ("scheduler.py", ""), ("blocks.py", ""), ("kv.py", ""), ("plan.py", "")),
    ("output processing and detokenising", ("output.py", ""), ("tokenizer.py", ""), ("speculate.py", "")),
    ("engine loop, other", ("core.py", ""),),
)
LOOP_PARTS = (
    ("idle (select)", ("selectors.py", "select"),),
    ("request streaming (engine.generate)", ("core.py", "generate"), ("output.py", "")),
    ("asyncio, other", ("asyncio", ""),),
)


def classify(frame, parts) -> str:
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    for name, *keys in parts:
        for filename, func in stack:
            if any(frag in filename and (not fn or fn == func) for frag, fn in keys):
                return name
    return "other"


class Sampler(threading.Thread):
    """Samples two threads' stacks every ``period`` seconds (the GIL allowing)."""

    def __init__(self, engine_thread: int, loop_thread: int, period: float = 0.001):
        super().__init__(daemon=True)
        self.ids = engine_thread, loop_thread
        self.period = period
        self.counts = (collections.Counter(), collections.Counter())
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            frames = sys._current_frames()
            for i, (tid, parts) in enumerate(zip(self.ids, (PARTS, LOOP_PARTS))):
                f = frames.get(tid)
                if f is not None:
                    self.counts[i][classify(f, parts)] += 1
            time.sleep(self.period)


def runner_loops(runner, steps: int) -> tuple[float, float]:
    """Seconds per 1-row decode step: waited for in turn, and chained as the engine chains them."""
    from service.engine.plan import Decode

    tables = runner.empty_tables()
    tables[0, 0] = np.arange(runner.max_blocks) % runner.num_blocks  # slot 0: the pool's first blocks
    sync = []
    for i in range(steps):
        t = time.perf_counter()
        runner.fetch(runner.dispatch_decode(Decode((0,), (1,), (64 + i,), (i,)), tables))
        sync.append(time.perf_counter() - t)
    t = time.perf_counter()
    handle = runner.dispatch_decode(Decode((0,), (1,), (64,), (0,)), tables)
    for i in range(1, steps):
        nxt = runner.dispatch_decode(Decode((0,), None, (64 + i,), (i,)), tables, inflight=handle)
        runner.fetch(handle)
        handle = nxt
    runner.fetch(handle)
    return statistics.median(sync[2:]), (time.perf_counter() - t) / steps


async def one_stream(engine, prompt_len: int, output_len: int, seed: int) -> float:
    from service.params import SamplingParams

    ids = [int(x) for x in np.random.default_rng(seed).integers(100, 30000, prompt_len)]
    stamps = []
    async for _ in engine.generate(ids, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantize", choices=["int8", "w8a8"], default=None)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    from service.engine.config import EngineConfig
    from service.models import build_engine, resolve

    checkpoint, name = resolve(args.model, args.dtype)
    engine = build_engine(checkpoint, EngineConfig(dtype=args.dtype, quantize=args.quantize,
                                                   speculative_algorithm="none"))
    runner = engine.runner
    print(f"model {name} ({args.quantize or runner.cfg.dtype}) on {runner.backend.describe()}, "
          f"{runner.slots} slots; 1 stream, {args.prompt_len} tokens in, {args.output_len} out")
    try:
        asyncio.run(one_stream(engine, args.prompt_len, 8, 0))  # settle
        engine_tpot, sync, chained = [], [], []
        sampler = None
        for r in range(args.repeat):
            # The engine thread runs no step while the runner is driven directly: it is idle.
            s, c = runner_loops_on_engine(engine, args.output_len)
            sync.append(s)
            chained.append(c)
            if r == args.repeat - 1:  # the stacks of the last run
                sampler = Sampler(engine._thread.ident, threading.get_ident())
                sampler.start()
            engine_tpot.append(asyncio.run(one_stream(engine, args.prompt_len, args.output_len, r + 1)))
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
    finally:
        engine.stop()
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"decode step alone (sync): {ms(sync):.2f} ms; chained on the runner: {ms(chained):.2f} ms; "
          f"the engine, per output token: {ms(engine_tpot):.2f} ms ({1 / statistics.median(engine_tpot):.1f} tok/s)")
    tpot = statistics.median(engine_tpot)
    print(f"host share of the engine's per-token time: {1 - statistics.median(chained) / tpot:.1%} "
          f"over the chained runner, {1 - statistics.median(sync) / tpot:.1%} over the step alone")
    for title, counts in zip(("engine thread", "event loop thread"), sampler.counts):
        total = sum(counts.values()) or 1
        print(f"{title} ({total} samples):")
        for part, n in counts.most_common():
            print(f"  {part:40s} {n / total:6.1%}")
    return 0


def runner_loops_on_engine(engine, steps: int) -> tuple[float, float]:
    """``runner_loops`` on the engine's thread (the runner is the engine thread's alone); the
    blocks it wrote over are then forgotten by the prefix cache."""
    def go():
        out = runner_loops(engine.runner, steps)
        engine.table.forget_all()
        return out

    return engine.on_engine_thread(go).result()


if __name__ == "__main__":
    sys.exit(main())
