"""LoRA adapters' cost: the default (or given) model with random adapters (PEFT files written
here) over every projection, against the same model served without adapters, in one sitting.

    python tools/bench_lora.py [MODEL] --adapters 4 --rank 16 --streams 16
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tools/bench_lora.py --tp 2

Runs, each --repeat times (the run of median throughput reported): on a server without
adapters, 1 stream and N streams on the base model; on one with the adapters, 1 stream on the
base, 1 on an adapter, N on the base, N on one adapter, N spread over all of them. Reports
output tokens/s, decode tokens/s, TTFT median, and each run's ratio to the same stream count
without adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def write_adapter(path: Path, cfg, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter over every projection of every layer (B non-zero)."""
    from safetensors.numpy import save_file

    from model.lora import family_targets, target_sizes

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for t in family_targets(cfg, i):
            fan_in, fan_out = target_sizes(cfg, t)
            key = f"base_model.model.model.layers.{i}.{MODULES[t]}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((fan_out, rank))).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                          "target_modules": list(MODULES.values())}))
    save_file(tensors, str(path / "adapter_model.safetensors"))


_runs = 0


async def run_streams(engine, adapters: list, prompt_len: int, output_len: int):
    """One stream per entry of ``adapters`` (a name, or None for the base model)."""
    from service.params import SamplingParams

    global _runs
    _runs += 1  # new prompts every run: a repeated prompt would be served from the prefix cache
    rng = np.random.default_rng(_runs)

    async def one(adapter):
        ids = [int(x) for x in rng.integers(100, 30000, prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, adapter=adapter)
        t0 = time.perf_counter()
        stamps = []
        async for out in engine.generate(ids, params):
            stamps.append(time.perf_counter())
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), len(stamps)

    t = time.perf_counter()
    results = await asyncio.gather(*[one(a) for a in adapters])
    return results, time.perf_counter() - t


def measure(engine, label: str, adapters: list, args) -> float:
    runs = []
    for _ in range(max(1, args.repeat)):
        results, wall = asyncio.run(run_streams(engine, adapters, args.prompt_len, args.output_len))
        runs.append((sum(r[2] for r in results) / wall, results))
    runs.sort(key=lambda run: run[0])
    rate, results = runs[len(runs) // 2]
    decode = len(adapters) / statistics.median(r[1] for r in results)
    ttft = statistics.median(r[0] for r in results)
    print(f"{label:34s} {rate:7.1f} tokens/s (runs {runs[0][0]:.1f}-{runs[-1][0]:.1f}), decode {decode:7.1f} "
          f"tokens/s, TTFT median {1000 * ttft:7.1f} ms", flush=True)
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)

    from model.checkpoint import load_config
    from service.engine.config import EngineConfig
    from service.models import build_engine, resolve

    checkpoint, name = resolve(args.model)
    cfg = load_config(checkpoint)
    n = args.streams
    base = dict(max_batch_size=n, session_len=256 if args.prompt_len + args.output_len <= 256 else 512, tp=args.tp)
    base["num_blocks"] = n * -(-base["session_len"] // 32)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora{i}" for i in range(args.adapters)]
        for i, a in enumerate(names):
            write_adapter(Path(tmp) / a, cfg, args.rank, seed=i)
        print(f"model {name}, {args.adapters} random adapters of rank {args.rank} over every projection, "
              f"--tp {args.tp}")
        plain = build_engine(checkpoint, EngineConfig(**base))
        try:
            asyncio.run(run_streams(plain, [None], args.prompt_len, 8))  # settle
            ref1 = measure(plain, "no adapters, 1 stream", [None], args)
            refn = measure(plain, f"no adapters, {n} streams", [None] * n, args)
        finally:
            plain.stop()
        del plain
        engine = build_engine(checkpoint, EngineConfig(**base, adapters=tuple((a, str(Path(tmp) / a)) for a in names)))
        try:
            asyncio.run(run_streams(engine, [names[0]], args.prompt_len, 8))
            rows = [("1 stream, base", [None], ref1), ("1 stream, one adapter", [names[0]], ref1),
                    (f"{n} streams, base", [None] * n, refn), (f"{n} streams, one adapter", [names[0]] * n, refn),
                    (f"{n} streams, spread over {len(names)}", [names[i % len(names)] for i in range(n)], refn)]
            for label, mix, ref in rows:
                rate = measure(engine, label, mix, args)
                print(f"{'':34s} {rate / ref:.2f} of the same streams without adapters", flush=True)
        finally:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
