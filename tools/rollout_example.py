"""A training loop's rollouts against a server in the same process.

Each step generates seeded rollouts (sampled at temperature 1, each token's logprob reported),
checks that every reported logprob equals the one a plain forward pass of the current weights
gives (the policy's own logprob, as a trainer recomputes it), then changes the weights (a
random perturbation stands in for the optimizer's step) and hands them to the engine with
``Engine.update_weights``: device to device, swapped between steps, the KV cache that the old
weights computed forgotten. Every rollout reports the ``weight_version`` that produced it.

    python tools/rollout_example.py                  # the bundled model, 3 steps
    python tools/rollout_example.py MODEL --steps 5 --rollouts 8

Exits non-zero when a reported logprob differs from the forward pass by more than
``--tolerance`` or a rollout names another weight version than the step's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PROMPTS = ["Write a haiku about rivers.", "What is 17 times 23?", "Name three uses of copper.",
           "Explain recursion in one sentence.", "Give a synonym for quick.", "Why is the sky blue?",
           "List two prime numbers above 50.", "Describe a cat to someone who has never seen one."]


def parse(argv=None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("model", nargs="?", default=None, help="MODEL (default: the bundled model)")
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--rollouts", type=int, default=4, help="prompts per step (one rollout each)")
    a.add_argument("--max-tokens", type=int, default=16)
    a.add_argument("--scale", type=float, default=0.01, help="the perturbation's size, relative to each weight's RMS")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--tolerance", type=float, default=2e-3, help="largest |reported - recomputed| logprob allowed")
    a.add_argument("--session-len", type=int, default=256)
    return a.parse_args(argv)


def prompt_ids(engine, n: int) -> list[list[int]]:
    from model.chat_template import render

    tok = engine.tokenizer
    return [tok.encode(render(tok.chat_template, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                              add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token),
                       add_special_tokens=False) for i in range(n)]


async def rollouts(engine, prompts: list[list[int]], max_tokens: int, seed: int):
    """Each prompt's sampled tokens, their reported logprobs and the weight version."""
    from service.params import SamplingParams

    async def one(i: int, ids: list[int]):
        params = SamplingParams(temperature=1.0, seed=seed + i, max_tokens=max_tokens, logprobs=0)
        toks, lps, version = [], [], None
        async for out in engine.generate(ids, params):
            toks += out.token_ids
            lps += [lp.logprob for lp in out.logprobs]
            version = out.weight_version or version
        return toks, lps, version

    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))


def recompute(cfg, params, prompts, results, length: int) -> list[np.ndarray]:
    """Each rollout's token logprobs under ``params`` by a plain forward pass (no cache, no
    batching with others, XLA): log_softmax of the logits at the position before each token."""
    from model.transformer import full_logits, prepare

    @jax.jit
    def logprobs(params, tokens):
        return jax.nn.log_softmax(full_logits(prepare(params, cfg), cfg, tokens).astype(jnp.float32), axis=-1)

    rows = np.zeros((len(prompts), length), np.int32)  # padded after each sequence: causal, so harmless
    for r, (ids, (toks, _, _)) in enumerate(zip(prompts, results)):
        seq = ids + toks
        rows[r, :len(seq)] = seq
    lp = np.asarray(logprobs(params, jnp.asarray(rows)))
    out = []
    for r, (ids, (toks, _, _)) in enumerate(zip(prompts, results)):
        at = np.arange(len(ids) - 1, len(ids) - 1 + len(toks))
        out.append(lp[r, at, np.asarray(toks, np.int64)])
    return out


def perturb(params, key, scale: float):
    """A stand-in for an optimizer step: each weight moved by ``scale`` times its RMS."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [w + scale * jnp.sqrt(jnp.mean(jnp.square(w))) * jax.random.normal(k, w.shape, w.dtype)
             for w, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


def main(argv=None) -> int:
    args = parse(argv)
    from model.checkpoint import load_params
    from service.engine.config import EngineConfig
    from service.models import build_engine, resolve

    checkpoint, name = resolve(args.model)
    config = EngineConfig(max_batch_size=max(4, args.rollouts), session_len=args.session_len)
    engine = build_engine(checkpoint, config, warmup=False)
    try:
        cfg = engine.runner.cfg
        params = load_params(checkpoint, cfg)  # the trainer's own copy of the weights
        prompts = prompt_ids(engine, args.rollouts)
        length = max(map(len, prompts)) + args.max_tokens
        key = jax.random.PRNGKey(args.seed)
        worst, wrong_version = 0.0, 0
        print(f"{name}: {args.steps} steps of {args.rollouts} rollouts, up to {args.max_tokens} tokens each")
        for step in range(args.steps):
            t0 = time.perf_counter()
            results = asyncio.run(rollouts(engine, prompts, args.max_tokens, args.seed + 1000 * step))
            gen = time.perf_counter() - t0
            wrong_version += sum(v != engine.weight_version for _, _, v in results)
            ref = recompute(cfg, params, prompts, results, length)
            diff = max(float(np.max(np.abs(np.asarray(lps) - r))) for (_, lps, _), r in zip(results, ref))
            worst = max(worst, diff)
            tokens = sum(len(t) for t, _, _ in results)
            mean_lp = float(np.mean([x for _, lps, _ in results for x in lps]))
            key, sub = jax.random.split(key)
            params = perturb(params, sub, args.scale)
            t0 = time.perf_counter()
            version = engine.update_weights(params, version=f"step-{step + 1}")
            update = time.perf_counter() - t0
            print(f"step {step}: weights {results[0][2]}, {tokens} tokens in {gen:.2f}s, mean logprob {mean_lp:.3f}, "
                  f"max |reported - recomputed| {diff:.2e}; updated to {version} in {update:.2f}s")
        ok = worst <= args.tolerance and not wrong_version
        print(f"{'ok' if ok else 'FAILED'}: largest logprob difference {worst:.2e} (tolerance {args.tolerance:g}), "
              f"{wrong_version} rollouts of another weight version")
        return 0 if ok else 1
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
