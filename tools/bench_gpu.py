"""GPU figures on a random-init Llama-3-8B-shaped model in bfloat16, weights created on the
device (nothing downloaded), with the device's bounds measured in the same run:

- decode throughput at 1, 64 and 256 streams, each as a fraction of the HBM-bandwidth bound
  (bytes a step reads: weights + the batch's KV) and of the bf16 matmul bound (2 x params
  FLOPs per token);
- TTFT of a 2k-token prompt (prefill calls of --max-chunk tokens);
- the attention kernel against the XLA gather on the same batch: time and max abs difference.

    python tools/bench_gpu.py                 # one GPU
    python tools/bench_gpu.py --tp 8          # a tensor-parallel mesh over 8 GPUs
    JAX_PLATFORMS=cpu python tools/bench_gpu.py --shape tiny   # the script's own check on a CPU

Run by ``tools/gpu_check.sh``. On a CPU (``--shape tiny``) the kernel runs interpreted and the
fractions mean little: that mode only proves the script runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

SHAPES = {
    # Llama-3-8B: 32 layers, d 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16),
}


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` (which blocks until its result is ready) after one warm call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_hbm(gib: float = 2.0) -> float:
    """Bytes/s of an on-device copy (read + write counted)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / timed(lambda: f(x).block_until_ready(), 10)


def measure_matmul(n: int = 8192) -> float:
    """bf16 matmul FLOP/s (float32 accumulation), on random values: a matrix of ones toggles
    few bits, so the units draw less power and clock higher than on real weights."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / timed(lambda: f(a).block_until_ready(), 10)


def device_params(cfg, shardings=None):
    """Random weights made on the device(s), in place (sharded when ``shardings`` is given): one
    compiled maker per distinct (shape, initialiser, placement), each leaf its own key, so an
    8B model compiles about ten small programs, not one per leaf."""
    import jax
    import jax.numpy as jnp

    from model.weights import is_spec, param_specs

    specs = param_specs(cfg)
    leaves, tree = jax.tree.flatten(specs, is_leaf=is_spec)
    outs = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    makers: dict = {}

    def maker(shape, init, out):
        key = (shape, init, out)
        if key not in makers:
            def make(k):
                if init == "ones":
                    return jnp.ones(shape, cfg.dtype)
                if init == "zeros":
                    return jnp.zeros(shape, cfg.dtype)
                return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(cfg.dtype)
            makers[key] = jax.jit(make, out_shardings=out)
        return makers[key]

    made = [maker(tuple(spec.shape), spec.init, o)(jax.random.fold_in(jax.random.PRNGKey(0), i))
            for i, (spec, o) in enumerate(zip(leaves, outs))]
    print(f"weights made by {len(makers)} compiled makers for {len(leaves)} tensors")
    return jax.tree.unflatten(tree, made)


def versions() -> None:
    """What the machine runs: JAX and its CUDA plugin, the CUDA and driver versions, the devices."""
    import importlib.metadata as md

    import jax

    have = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                 "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime", "flax", "orbax-checkpoint"):
        try:
            have[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    print("versions: " + ", ".join(f"{k} {v}" for k, v in have.items()))
    try:
        from jax.extend import backend as jax_backend

        backend = jax_backend.get_backend()
        print(f"backend: {backend.platform} {backend.platform_version}")
    except Exception as e:  # the figure is informative only
        print(f"backend: version unknown ({e})")
    print(f"devices: {jax.devices()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=256, help="each stream's context during the decode steps")
    ap.add_argument("--prompt", type=int, default=2048, help="the TTFT prompt's tokens")
    ap.add_argument("--max-chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parts", default="bounds,decode,ttft,kernel",
                    help="comma-separated, in this order: versions, bounds, decode, ttft, kernel (the kernel "
                         "against the XLA gather at the shape's attention sizes; needs no weights)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"versions", "bounds", "decode", "ttft", "kernel"}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")

    import jax

    from model.config import ModelConfig

    cfg = ModelConfig(family="llama", dtype="bfloat16", **SHAPES[args.shape])
    platform = jax.devices()[0].platform
    interpret = platform != "gpu"
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind} ({platform}); "
          f"shape {args.shape}, tp {args.tp}")
    if "versions" in parts:
        versions()
    hbm = flops = 0.0
    if parts & {"bounds", "decode", "ttft"}:
        gpu = platform == "gpu"
        hbm, flops = measure_hbm(2.0 if gpu else 0.25), measure_matmul(8192 if gpu else 1024)
        print(f"bounds (per device): HBM copy {hbm / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s")
    if parts & {"decode", "ttft"}:
        model_parts(args, cfg, parts, platform, hbm, flops)
    if "kernel" in parts:
        kernel_part(cfg, platform, interpret)
    return 0


def model_parts(args, cfg, parts, platform, hbm, flops) -> None:
    """Decode throughput and TTFT on the random model."""
    import jax

    from model.backends import select
    from model.backends.gpu import GpuKernels
    from service.engine import direct
    from service.engine.plan import Decode
    from service.engine.runner import ModelRunner
    from service.params import SamplingParams


    plan = None
    if args.tp > 1:
        from sharding import make_mesh, plan_for

        plan = plan_for(cfg, make_mesh(args.tp, 1), slots=max(args.streams))
    params = device_params(cfg, None if plan is None else plan.param_shardings(cfg))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # What a decode step streams: every weight but the input embedding, of which it gathers a
    # row per token (unless the head is tied to it, and read whole as the head).
    read_weights = weight_bytes - (0 if cfg.tie_word_embeddings else params["embed"].nbytes)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    interpret = platform != "gpu"
    greedy = SamplingParams(temperature=0, max_tokens=args.steps)
    backend = select(sharded=plan is not None, cfg=cfg, plan=plan)
    if interpret:
        backend = GpuKernels(interpret=True)  # the script's own check on a CPU
    print(f"model: {n_params / 1e9:.2f} B params, {weight_bytes / 2**30:.1f} GiB; backend {backend.describe()}")

    # -- decode throughput ----------------------------------------------------------------------
    devices = args.tp
    slots = max(args.streams) if "decode" in parts else 1
    session = args.context + args.steps + 16
    runner = ModelRunner(cfg, params, max_batch_size=slots, session_len=session, plan=plan, backend=backend,
                         block_size=32)
    for s in range(slots):
        runner.set_slot(s, greedy, [1], seed=s)
    for b in args.streams if "decode" in parts else ():
        decode = Decode(tuple(range(b)), (1,) * b, (args.context,) * b, (1,) * b)
        tables = direct.identity_tables(runner)

        def steps():
            # The KV the steps read is whatever the pool holds (zeros): the work is the same.
            for i in range(args.steps):
                out = runner.dispatch_decode(dataclasses.replace(
                    decode, positions=(args.context + i,) * b, steps=(i + 1,) * b), tables)
            runner.fetch(out)

        t = timed(steps, 3) / args.steps
        tok_s = b / t
        read = read_weights + b * (args.context + args.steps // 2) * kv_per_token
        print(f"decode {b:4d} streams: {tok_s:9.1f} tok/s, step {1000 * t:6.2f} ms; HBM bound "
              f"{read / t / (hbm * devices):5.1%}, matmul bound {2 * n_params * tok_s / (flops * devices):5.1%}")
    runner = None  # frees its KV pool before the next one

    # -- TTFT of a long prompt ------------------------------------------------------------------
    if "ttft" not in parts:
        return
    runner = ModelRunner(cfg, params, max_batch_size=1, session_len=args.prompt + 16, plan=plan, backend=backend,
                         max_prefill_chunk=args.max_chunk, block_size=32)
    prompt = [int(x) for x in np.random.default_rng(0).integers(10, cfg.vocab_size, args.prompt)]

    def ttft():
        runner.set_slot(0, greedy, prompt, seed=0)
        for start in range(0, args.prompt, args.max_chunk):
            chunk = prompt[start:start + args.max_chunk]
            out = direct.prefill(runner, 0, chunk, start, last=start + len(chunk) == args.prompt)
        return out

    t0 = time.perf_counter()
    ttft()
    cold = time.perf_counter() - t0
    t = timed(ttft, 3)
    print(f"TTFT {args.prompt}-token prompt: {1000 * t:.0f} ms warm ({1000 * cold:.0f} ms with compiles), "
          f"{args.prompt / t:.0f} prompt tok/s; matmul bound {2 * n_params * args.prompt / t / (flops * devices):5.1%}")


def kernel_part(cfg, platform, interpret) -> None:
    """The attention kernel against the XLA gather on the same batch, at the shape's heads."""
    import jax
    import jax.numpy as jnp

    from model.backends.gpu import GpuKernels
    from model.backends.xla import Xla
    from model.config import AttentionSpec

    rng = np.random.default_rng(1)
    block, context = 32, 1024 if platform == "gpu" else 96
    rows = 256 if platform == "gpu" else 8
    max_blocks = context // block + 1
    blocks = rows * max_blocks
    shape = (1, blocks + 1, block, cfg.num_kv_heads, cfg.head_dim)
    k_pool = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.bfloat16)
    v_pool = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(blocks).reshape(rows, max_blocks).astype(np.int32))
    spec = AttentionSpec(scale=cfg.head_dim ** -0.5)
    span = max_blocks * block
    n_prefill = 512 if platform == "gpu" else 64
    start = context - n_prefill
    q_decode = jax.random.normal(jax.random.PRNGKey(3), (rows, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    q_prefill = jax.random.normal(jax.random.PRNGKey(4), (1, n_prefill, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    calls = {
        f"decode, {rows} rows at {context}": (q_decode, jnp.arange(rows, dtype=jnp.int32),
                                              jnp.full((rows, 1), context, jnp.int32)),
        f"prefill, {n_prefill} tokens from {start}": (q_prefill, jnp.asarray([0], jnp.int32),
                                                       (start + jnp.arange(n_prefill, dtype=jnp.int32))[None]),
    }
    kernel = GpuKernels(interpret=interpret)
    for name, (q, r, pos) in calls.items():
        fk = jax.jit(lambda q, k, v, r, p, t: kernel.attend(q, (k, v), r, p, span, spec, t))
        fx = jax.jit(lambda q, k, v, r, p, t: Xla().attend(q, (k, v), r, p, span, spec, t))
        a = (q, k_pool, v_pool, r, pos, tables)
        diff = float(jnp.max(jnp.abs(fk(*a).astype(jnp.float32) - fx(*a).astype(jnp.float32))))
        tk = timed(lambda: fk(*a).block_until_ready(), 10)
        tx = timed(lambda: fx(*a).block_until_ready(), 10)
        print(f"attention, {name}: kernel {1e6 * tk:8.0f} us, XLA gather {1e6 * tx:8.0f} us "
              f"({tx / tk:4.2f}x), max abs diff {diff:.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
