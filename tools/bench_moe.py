"""One mixture-of-experts MLP layer, its two ways of computing the chosen experts
(``backends.xla.Experts``: grouped tiles, or dense over every expert), timed at decode and
prefill sizes on this machine, with the bound of each: the bytes of the experts a step must
read (memory) and the FLOPs of the chosen experts only (compute).

    python tools/bench_moe.py                      # Qwen3-MoE-shaped: 8 experts of 768 x 1152, top 2
    python tools/bench_moe.py --experts 128 --top 8 --expert-size 768 --hidden 2048   # Qwen3-30B-A3B's layer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1152)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.backends.xla import Experts
    from tools.bench_engine import measure_bandwidth, measure_flops

    d, e, k, f = args.hidden, args.experts, args.top, args.expert_size
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)  # noqa: E731
    router, gate, up, down = w(d, e), w(e, d, f), w(e, d, f), w(e, f, d)
    bw, flops = measure_bandwidth(), measure_flops()
    print(f"layer: hidden {d}, {e} experts of {f}, top {k}; machine: {bw / 1e9:.1f} GB/s, {flops / 1e9:.0f} GFLOP/s")
    expert_bytes = 3 * d * f * 4
    for m in args.tokens:
        x = w(m, d) * 50
        probs = jax.nn.softmax(x @ router, axis=-1)
        top, chosen = jax.lax.top_k(probs, k)
        used = len(set(np.asarray(chosen).reshape(-1).tolist()))
        row = []
        outs = {}
        for grouped in (True, False):
            experts = Experts(router, gate, up, down, grouped=grouped)
            fn = jax.jit(lambda x, t, c, ex=experts: ex.apply(x, t, c, jax.nn.silu))
            outs[grouped] = np.asarray(fn(x, top, chosen))
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn(x, top, chosen).block_until_ready()
                times.append(time.perf_counter() - t)
            s = statistics.median(times)
            mem = used * expert_bytes / bw
            comp = 2 * m * k * 3 * d * f / flops
            row.append(f"{'grouped' if grouped else 'dense'} {1000 * s:7.2f} ms ({max(mem, comp) / s:.2f} of bound)")
        diff = np.abs(outs[True] - outs[False]).max()
        print(f"tokens {m:4d} ({used} experts used): " + " | ".join(row) + f" | max diff {diff:.1e}")


if __name__ == "__main__":
    main()
