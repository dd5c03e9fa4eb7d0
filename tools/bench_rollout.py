"""What a training loop waits for: the time of sleep, wake and a weight update on a served
model, and the device bytes before and after sleep (``jax.live_arrays``). Medians of
``--repeats`` runs, engine in this process (the routes add only an HTTP round trip).

    python tools/bench_rollout.py                    # the bundled model, the server's defaults
    python tools/bench_rollout.py MODEL --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402


def live_mib() -> float:
    return sum(x.nbytes for x in jax.live_arrays()) / 2**20


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def one_request(engine) -> None:
    from service.params import SamplingParams

    async for _ in engine.generate([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4)):
        pass


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("model", nargs="?", default=None, help="MODEL (default: the bundled model)")
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--max-batch-size", type=int, default=64)
    args = a.parse_args(argv)

    from model.checkpoint import load_params
    from service.engine.config import EngineConfig
    from service.models import build_engine, default_gguf, resolve

    checkpoint, name = resolve(args.model)
    engine = build_engine(checkpoint, EngineConfig(max_batch_size=args.max_batch_size), warmup=False)
    try:
        asyncio.run(one_request(engine))
        memory = {"awake": live_mib()}  # the engine's arrays alone: nothing else holds any yet
        engine.sleep(1)
        memory["asleep, level 1"] = live_mib()
        engine.wake_up()
        engine.sleep(2)
        memory["asleep, level 2"] = live_mib()
        engine.wake_up()
        trainer = load_params(checkpoint, engine.runner.cfg)  # a trainer's arrays, on the device
        gguf = default_gguf() if args.model is None else None
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            times.setdefault("sleep level 1", []).append(timed(lambda: engine.sleep(1)))
            times.setdefault("wake up from level 1", []).append(timed(engine.wake_up))
            times.setdefault("sleep level 2", []).append(timed(lambda: engine.sleep(2)))
            times.setdefault("wake up from level 2 (reload the checkpoint)", []).append(timed(engine.wake_up))
            times.setdefault("update in-process (device arrays)", []).append(
                timed(lambda: engine.update_weights(trainer)))
            times.setdefault("update from disk: converted checkpoint", []).append(
                timed(lambda: engine.update_weights_from_path(str(checkpoint), "xlaserve")))
            if gguf is not None:
                times.setdefault("update from disk: GGUF file (Q4_1)", []).append(
                    timed(lambda: engine.update_weights_from_path(str(gguf), "gguf")))
            times.setdefault("first request after an update", []).append(timed(lambda: asyncio.run(one_request(engine))))
        r = engine.runner
        print(f"{name}: {r.backend.describe()}, weights {sum(x.nbytes for x in jax.tree.leaves(r.params)) / 2**20:.0f} "
              f"MiB, KV cache {sum(x.nbytes for x in jax.tree.leaves(r.cache)) / 2**20:.0f} MiB; medians of "
              f"{args.repeats}")
        for what, values in times.items():
            print(f"  {what:50s} {statistics.median(values) * 1000:8.1f} ms")
        for what, mib in memory.items():
            print(f"  device bytes {what:37s} {mib:8.1f} MiB")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
