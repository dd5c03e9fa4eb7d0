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
    tables = llama.identity_tables(3, span)[:, ::-1]  # each row's blocks somewhere else in the pool
    slot = jnp.asarray([2], jnp.int32)  # a table row other than 0, as the engine uses slots
    got, start = [], 0
    for n in chunks:  # chunked prefill
        pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
        hidden, cache = llama.forward(params, cfg, jnp.asarray(tokens[:, start:start + n]), pos,
                                      cache, span=span, rows=slot, tables=tables)
        got.extend(np.asarray(llama.logits(params, cfg, hidden))[0])
        start += n
    for t in range(start, total):  # one token at a time
        hidden, cache = llama.forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]),
                                      jnp.asarray([[t]], jnp.int32), cache, span=span, rows=slot, tables=tables)
        got.append(np.asarray(llama.logits(params, cfg, hidden))[0, 0])
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4, rtol=0)


def test_decode_all_rows_uses_each_rows_own_history():
    """Batched decode over all cache rows (rows=None) matches per-sequence forwards."""
    cfg = CFG
    params = llama.prepare(init_params(cfg, seed=1, scale=0.2), cfg)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, (n,)).astype(np.int32) for n in (9, 4, 13)]
    cache = llama.init_cache(cfg, rows=3, length=32)
    tables = llama.identity_tables(3, 32)
    for r, s in enumerate(seqs[:]):
        _, cache = llama.forward(params, cfg, jnp.asarray(s[None, :-1]),
                                 jnp.arange(len(s) - 1, dtype=jnp.int32)[None], cache, span=32,
                                 rows=jnp.asarray([r], jnp.int32), tables=tables)
    last = jnp.asarray([[s[-1]] for s in seqs])
    pos = jnp.asarray([[len(s) - 1] for s in seqs], jnp.int32)
    hidden, _ = llama.forward(params, cfg, last, pos, cache, span=32, tables=tables)
    got = np.asarray(llama.logits(params, cfg, hidden))[:, 0]
    for r, s in enumerate(seqs):
        want = np.asarray(llama.full_logits(params, cfg, jnp.asarray(s[None])))[0, -1]
        np.testing.assert_allclose(got[r], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("t, rows", [(1, None), (1, [2, 0, 5]), (6, [1])], ids=["decode_all_rows", "decode_slots",
                                                                              "prefill_chunk"])
def test_xla_windowed_attention_reads_only_the_window(t, rows):
    """A windowed layer on XLA reads the blocks of window + T - 1 positions per row, not the
    span: positions before the block every query's window starts in hold NaN and the output
    still equals the masked attention over clean caches, padding rows (a slot out of range, a
    position past the span) included."""
    from model.backends.xla import Xla
    from model.config import AttentionSpec

    rng = np.random.default_rng(t)
    slots, span, window, k, g, h = 5, 64, 9, 2, 3, 8
    clean = [rng.standard_normal((slots, span, k, h)).astype(np.float32) for _ in range(2)]
    b = slots if rows is None else len(rows)
    first = np.array([40, 29, 50, 33, 45][:b])  # each row's first query position
    positions = first[:, None] + np.arange(t)[None, :]
    if rows is not None and t == 1:
        positions[-1] = span + 3  # a padding row
    q = jnp.asarray(rng.standard_normal((b, t, k * g, h)).astype(np.float32))
    poisoned = [c.copy() for c in clean]
    for c in poisoned:
        c[:, :16] = np.nan  # before the block of every row's window (the earliest starts at 29 - 9 + 1)
    spec = AttentionSpec(scale=h ** -0.5, window=window)
    r = None if rows is None else jnp.asarray(rows, jnp.int32)
    tables = np.random.default_rng(0).permutation(slots * span // 16).reshape(slots, span // 16).astype(np.int32)
    pools = []
    for c in poisoned:  # row r's block i at tables[r, i] of one replica's pool
        pool = np.zeros((1, slots * span // 16, 16, k, h), np.float32)
        pool[0, tables.reshape(-1)] = c.reshape(-1, 16, k, h)
        pools.append(jnp.asarray(pool))
    got = np.asarray(Xla().attend(q, tuple(pools), r, jnp.asarray(positions), span, spec, jnp.asarray(tables)))
    want = _masked(q, clean, rows, positions, span, window)
    live = [i for i in range(b) if positions[i, 0] < span]
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


def _masked(q, caches, rows, positions, span, window):
    """softmax(q k / sqrt(H)) v over each row's window, by hand (numpy)."""
    q = np.asarray(q)
    b, t, n, h = q.shape
    k_cache, v_cache = caches
    out = np.zeros_like(q)
    for i in range(b):
        row = i if rows is None else min(rows[i], k_cache.shape[0] - 1)
        for j in range(t):
            p = positions[i, j]
            lo = max(0, p - window + 1)
            keys, values = k_cache[row, lo:p + 1], v_cache[row, lo:p + 1]  # (L, K, H)
            g = n // keys.shape[1]
            for head in range(n):
                s = keys[:, head // g] @ q[i, j, head] / np.sqrt(h)
                w = np.exp(s - s.max())
                out[i, j, head] = (w / w.sum()) @ values[:, head // g]
    return out
