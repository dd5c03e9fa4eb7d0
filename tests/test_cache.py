"""Cached prefill + decode steps equal the uncached full forward at every position."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer as llama
from model.config import ModelConfig
from model.weights import init_params

CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=10000.0)


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, family="qwen2", qkv_bias=True)],
                         ids=["llama", "qwen2"])
@pytest.mark.parametrize("chunks", [[12], [5, 7]], ids=["one_chunk", "two_chunks"])
def test_prefill_then_decode_equals_full_forward(cfg, chunks):
    params = llama.prepare(init_params(cfg, seed=0, scale=0.2), cfg)
    total = 20
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, total)).astype(np.int32)
    want = np.asarray(llama.full_logits(params, cfg, jnp.asarray(tokens)))[0]  # (T, V)

    span = 32
    cache = llama.init_cache(cfg, rows=3, length=span)
    slot = jnp.asarray([2], jnp.int32)  # a cache row other than 0, as the engine uses slots
    got, start = [], 0
    for n in chunks:  # chunked prefill
        pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
        hidden, cache = llama.forward(params, cfg, jnp.asarray(tokens[:, start:start + n]), pos,
                                      cache, span=span, rows=slot)
        got.extend(np.asarray(llama.logits(params, cfg, hidden))[0])
        start += n
    for t in range(start, total):  # one token at a time
        hidden, cache = llama.forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]),
                                      jnp.asarray([[t]], jnp.int32), cache, span=span, rows=slot)
        got.append(np.asarray(llama.logits(params, cfg, hidden))[0, 0])
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4, rtol=0)


def test_decode_all_rows_uses_each_rows_own_history():
    """Batched decode over all cache rows (rows=None) matches per-sequence forwards."""
    cfg = CFG
    params = llama.prepare(init_params(cfg, seed=1, scale=0.2), cfg)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, (n,)).astype(np.int32) for n in (9, 4, 13)]
    cache = llama.init_cache(cfg, rows=3, length=32)
    for r, s in enumerate(seqs[:]):
        _, cache = llama.forward(params, cfg, jnp.asarray(s[None, :-1]),
                                 jnp.arange(len(s) - 1, dtype=jnp.int32)[None], cache, span=32,
                                 rows=jnp.asarray([r], jnp.int32))
    last = jnp.asarray([[s[-1]] for s in seqs])
    pos = jnp.asarray([[len(s) - 1] for s in seqs], jnp.int32)
    hidden, _ = llama.forward(params, cfg, last, pos, cache, span=32)
    got = np.asarray(llama.logits(params, cfg, hidden))[:, 0]
    for r, s in enumerate(seqs):
        want = np.asarray(llama.full_logits(params, cfg, jnp.asarray(s[None])))[0, -1]
        np.testing.assert_allclose(got[r], want, atol=1e-4, rtol=0)
