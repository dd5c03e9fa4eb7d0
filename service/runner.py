"""Device state and the jitted steps: the KV cache, per-slot sampling state, prefill and decode.

Shapes are bucketed so the number of compiled variants is bounded: prefill chunks are padded
to a power of two (``PREFILL_BUCKETS``) and attention reads a power-of-two span of the cache
(``span_buckets``). The cache and sampling state are donated to every step, so XLA updates
them in place.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import llama
from model.config import ModelConfig
from service import sampling as smp

log = logging.getLogger(__name__)

MIN_SPAN = 128


def prefill_buckets(max_chunk: int) -> list[int]:
    out, b = [], 16
    while b < max_chunk:
        out.append(b)
        b *= 2
    return out + [max_chunk]


def span_buckets(session_len: int) -> list[int]:
    out, s = [], MIN_SPAN
    while s < session_len:
        out.append(s)
        s *= 2
    return out + [session_len]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: Any, max_batch_size: int, session_len: int,
                 eos_ids: frozenset[int] = frozenset(), max_prefill_chunk: int = 512,
                 top_logprobs: int = smp.MAX_TOP_LOGPROBS):
        self.cfg = cfg
        mask = np.zeros((cfg.vocab_size,), bool)
        mask[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
        self.eos_mask = jnp.asarray(mask)  # (V,) tokens held back until min_tokens
        self.params = params
        self.slots = max_batch_size
        self.session_len = session_len
        self.max_chunk = min(max_prefill_chunk, session_len)
        self.prefill_sizes = prefill_buckets(self.max_chunk)
        self.spans = span_buckets(session_len)
        self.top_n = top_logprobs
        # Committed to the device like every later (jit-output) value of them: otherwise the
        # second call of each step sees new input shardings and compiles all over again.
        device = jax.devices()[0]
        self.cache = jax.device_put(llama.init_cache(cfg, max_batch_size, session_len), device)
        self.sampling = jax.device_put(smp.SlotSampling.empty(max_batch_size, cfg.vocab_size), device)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("span",), donate_argnums=(1, 2))
        self._decode = jax.jit(self._decode_fn, static_argnames=("span",), donate_argnums=(1, 2))
        self._set_row = jax.jit(smp.set_row, donate_argnums=(0,))

    # -- jitted bodies -------------------------------------------------------------------------

    def _prefill_fn(self, params, cache, sampling, tokens, start, length, slot, last, span):
        """tokens (1, T) padded; the real ones are tokens[0, :length] at positions start...

        Returns the first sampled token of this chunk's last real position (used only when
        the chunk ends the prompt) with its logprobs.
        """
        t = tokens.shape[1]
        positions = (start + jnp.arange(t, dtype=jnp.int32))[None, :]  # (1, T)
        hidden, cache = llama.forward(params, self.cfg, tokens, positions, cache, span=span,
                                      rows=slot[None])
        final = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, axis=0, keepdims=True)  # (1, D)
        logits = llama.logits(params, self.cfg, final)  # (1, V)
        row = jax.tree.map(lambda x: x[slot][None], sampling)
        token, lp, top_ids, top_lp = smp.sample(logits, row, jnp.zeros((1,), jnp.int32),
                                                self.eos_mask, self.top_n)
        # Only a chunk that ends the prompt really emits its token; account it for penalties.
        seen = sampling.seen.at[slot, token[0]].set(sampling.seen[slot, token[0]] | last)
        counts = sampling.counts.at[slot, token[0]].add(last.astype(jnp.int32))
        sampling = dataclasses.replace(sampling, seen=seen, counts=counts)
        return cache, sampling, (token, lp, top_ids, top_lp)

    def _decode_fn(self, params, cache, sampling, tokens, positions, steps, span):
        """One token for every slot: tokens, positions, steps (B,)."""
        hidden, cache = llama.forward(params, self.cfg, tokens[:, None], positions[:, None], cache,
                                      span=span)
        logits = llama.logits(params, self.cfg, hidden[:, 0])  # (B, V)
        out = smp.sample(logits, sampling, steps, self.eos_mask, self.top_n)
        sampling = smp.record(sampling, out[0])
        return cache, sampling, out

    # -- host API (engine thread only) ----------------------------------------------------------

    def set_slot(self, slot: int, params: smp.SamplingParams, prompt_ids, seed: int) -> None:
        row = smp.row_values(params, self.cfg.vocab_size, prompt_ids, seed)
        self.sampling = self._set_row(self.sampling, jnp.int32(slot), row)

    def prefill(self, slot: int, tokens: list[int], start: int, last: bool = True):
        """Prefill one chunk (len <= max_chunk) of a slot's sequence at ``start``."""
        n = len(tokens)
        size = bucket_for(n, self.prefill_sizes)
        span = bucket_for(min(start + size, self.session_len), self.spans)
        padded = np.zeros((1, size), np.int32)
        padded[0, :n] = tokens
        self.cache, self.sampling, out = self._prefill(
            self.params, self.cache, self.sampling, padded, jnp.int32(start), jnp.int32(n),
            jnp.int32(slot), jnp.bool_(last), span=span)
        return out

    def decode(self, tokens: np.ndarray, positions: np.ndarray, steps: np.ndarray, live_len: int):
        """One step for all slots; ``live_len`` bounds the positions of the live ones."""
        span = bucket_for(int(live_len), self.spans)
        self.cache, self.sampling, out = self._decode(
            self.params, self.cache, self.sampling, tokens, positions, steps, span=span)
        return out

    def compiled_variants(self) -> int:
        return sum(f._cache_size() for f in (self._prefill, self._decode, self._set_row))

    def warmup(self, progress=None) -> None:
        """Compile every prefill/decode shape now, so serving never compiles."""
        shapes = [("decode", s) for s in self.spans]
        shapes += [("prefill", n, s) for n in self.prefill_sizes for s in self.spans if s >= n]
        self.set_slot(0, smp.SamplingParams(), [0], 0)
        for i, shape in enumerate(shapes):
            if progress:
                progress(i, len(shapes), shape)
            if shape[0] == "decode":
                z = np.zeros((self.slots,), np.int32)
                self.decode(z, np.full((self.slots,), shape[1] - 1, np.int32), z, shape[1])
            else:
                n, span = shape[1], shape[2]
                self.prefill(0, [0] * n, span - n)
        jax.block_until_ready(self.cache)
