"""Sampling on device, per slot. Every setting is an array indexed by slot, never a static
argument, so a new value never recompiles.

Precedence of settings (applied by each request type's ``to_sampling_params`` in
``service.protocol``): the request's value, then the server's default, then OpenAI's default.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from service.params import MAX_LOGIT_BIAS, SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSampling:
    """Device arrays, one row per decode slot."""

    temperature: jax.Array  # (B,) f32
    top_p: jax.Array  # (B,) f32
    top_k: jax.Array  # (B,) i32, 0 = off
    min_p: jax.Array  # (B,) f32
    repetition_penalty: jax.Array  # (B,) f32
    presence_penalty: jax.Array  # (B,) f32
    frequency_penalty: jax.Array  # (B,) f32
    min_tokens: jax.Array  # (B,) i32, EOS masked while fewer tokens were generated
    has_bias: jax.Array  # (B,) bool, the row has a logit_bias
    wants_logprobs: jax.Array  # (B,) bool, the request asked for logprobs
    key: jax.Array  # (B, 2) u32, per-request PRNG key
    # Sized for 256 slots x a 152k vocabulary (~80 MiB, not the 334 MiB of dense float32 bias,
    # bool seen and int32 counts): logit_bias as its entries, seen as bits, counts as int16.
    bias_ids: jax.Array  # (B, MAX_LOGIT_BIAS) i32 logit_bias tokens, V (dropped) past the row's last
    bias_values: jax.Array  # (B, MAX_LOGIT_BIAS) f32 their values
    seen: jax.Array  # (B, W) i32 bits (token t: bit t % 32 of word t // 32), prompt + output tokens
    counts: jax.Array  # (B, V) i16 output token counts (presence/frequency), saturating at 32767

    @classmethod
    def empty(cls, slots: int, vocab: int) -> "SlotSampling":
        f = lambda v: jnp.full((slots,), v, jnp.float32)  # noqa: E731
        return cls(temperature=f(0.0), top_p=f(1.0), top_k=jnp.zeros((slots,), jnp.int32),
                   min_p=f(0.0), repetition_penalty=f(1.0), presence_penalty=f(0.0),
                   frequency_penalty=f(0.0), min_tokens=jnp.zeros((slots,), jnp.int32),
                   has_bias=jnp.zeros((slots,), bool), wants_logprobs=jnp.zeros((slots,), bool),
                   key=jnp.zeros((slots, 2), jnp.uint32),
                   bias_ids=jnp.full((slots, MAX_LOGIT_BIAS), vocab, jnp.int32),
                   bias_values=jnp.zeros((slots, MAX_LOGIT_BIAS), jnp.float32),
                   seen=jnp.zeros((slots, mask_words(vocab)), jnp.int32),
                   counts=jnp.zeros((slots, vocab), jnp.int16))


def token_bits(ids: Any, vocab: int) -> np.ndarray:
    """A (W,) int32 bit row with the bits of token ``ids`` set (``mask_words`` layout)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    words = np.zeros((mask_words(vocab),), np.uint32)
    np.bitwise_or.at(words, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return words.view(np.int32)


def row_values(p: SamplingParams, vocab: int, prompt_ids: Any, seed: int) -> dict[str, np.ndarray]:
    """Host-side values of one slot's row, for ``set_row``."""
    bias_ids = np.full((MAX_LOGIT_BIAS,), vocab, np.int32)
    bias_values = np.zeros((MAX_LOGIT_BIAS,), np.float32)
    for i, (token, value) in enumerate(p.logit_bias):  # ids and count checked on submit
        bias_ids[i], bias_values[i] = token, value
    key = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed % 2**32)), dtype=np.uint32)
    return dict(temperature=np.float32(p.temperature), top_p=np.float32(p.top_p),
                top_k=np.int32(min(p.top_k, vocab)), min_p=np.float32(p.min_p),
                repetition_penalty=np.float32(p.repetition_penalty),
                presence_penalty=np.float32(p.presence_penalty),
                frequency_penalty=np.float32(p.frequency_penalty),
                min_tokens=np.int32(0 if p.ignore_eos else p.min_tokens),
                has_bias=np.bool_(bool(p.logit_bias)), wants_logprobs=np.bool_(p.logprobs is not None),
                key=key, bias_ids=bias_ids, bias_values=bias_values, seen=token_bits(prompt_ids, vocab),
                counts=np.zeros((vocab,), np.int16))


def set_row(state: SlotSampling, slot: jax.Array, row: dict[str, jax.Array]) -> SlotSampling:
    """Write one slot's settings (jit this with the state donated)."""
    return SlotSampling(**{name: getattr(state, name).at[slot].set(row[name])
                           for name in row})


def _penalize(logits: jax.Array, s: Any, small: Any = None) -> jax.Array:
    """Penalties and logit_bias; ``s`` has the rows' bias/seen/counts, ``small`` (default
    ``s``) their per-row settings."""
    small = s if small is None else small
    b, v = logits.shape
    rep = small.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(_bits(s.seen, v), penalized, logits)
    counts = s.counts.astype(jnp.float32)
    logits = logits - small.frequency_penalty[:, None] * counts
    logits = logits - small.presence_penalty[:, None] * (counts > 0)
    return logits.at[jnp.arange(b)[:, None], s.bias_ids].add(s.bias_values, mode="drop")


def argmax(x: jax.Array) -> jax.Array:
    """First index of each row's maximum (B, V) -> (B,) int32. Two plain reductions: XLA's
    CPU argmax (one reduction over value-index pairs) is slower at serving shapes."""
    v = x.shape[-1]
    m = jnp.max(x, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x == m, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a row with a NaN matches nowhere


CANDIDATES = 256  # top-k/top-p/min-p are decided among this many best tokens when exact


def _threshold(sorted_logits: jax.Array, s: Any, lse: jax.Array) -> jax.Array:
    """Per-row logit threshold of top-k, top-p and min-p, from (a prefix of) the logits sorted
    descending (B, C) and the full log-sum-exp (B, 1). Returns (B, 1)."""
    c = sorted_logits.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, c), c)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # (B, 1)
    probs = jnp.exp(sorted_logits - lse)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < s.top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    # min_p: drop tokens with p < min_p * p_max, i.e. logit < max + log(min_p).
    min_p_cut = sorted_logits[:, :1] + jnp.log(jnp.maximum(s.min_p[:, None], 1e-30))
    return jnp.where(s.min_p[:, None] > 0, jnp.maximum(threshold, min_p_cut), threshold)


def _filter(logits: jax.Array, s: Any) -> jax.Array:
    """top-k, top-p, min-p on temperature-scaled logits (B, V); excluded entries -> -inf.

    A full sort of the vocabulary costs far more than the model's step on a CPU, so the
    threshold is first found among the ``CANDIDATES`` best tokens; only when some row's kept
    set might reach past them (a flat distribution with top_p near 1 and no top_k) is the
    whole vocabulary sorted. Both paths give the same threshold.
    """
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    c = min(CANDIDATES, vocab)
    cand = jax.lax.top_k(logits, c)[0]  # (B, C) descending
    threshold = _threshold(cand, s, lse)
    limited_by_k = (s.top_k > 0) & (s.top_k <= c)
    exact = (c == vocab) | limited_by_k | (threshold[:, 0] > cand[:, -1])
    threshold = jax.lax.cond(
        jnp.all(exact), lambda: threshold,
        lambda: _threshold(jnp.sort(logits, axis=-1)[:, ::-1], s, lse))
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _sample_random(logits: jax.Array, s: Any, steps: jax.Array) -> jax.Array:
    temp = jnp.maximum(s.temperature, 1e-6)[:, None]
    scaled = logits / temp
    needs_filter = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0) | (s.min_p > 0)))
    scaled = jax.lax.cond(needs_filter, lambda: _filter(scaled, s), lambda: scaled)
    # Per-slot key folded with the step: the same seed gives the same tokens whatever else
    # shares the batch.
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.key), steps)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(keys)
    return argmax(scaled + gumbel)


# Per-row fields small enough to gather for every step; the large ones (bias, seen, counts)
# are gathered only inside the branch that reads them.
_SMALL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "min_tokens", "has_bias", "wants_logprobs", "key")
_LARGE = ("bias_ids", "bias_values", "seen", "counts")


def mask_words(vocab: int) -> int:
    """int32 words of one row's token bitmask (bit ``t % 32`` of word ``t // 32``: token t)."""
    return (vocab + 31) // 32


def _bits(words: jax.Array, vocab: int) -> jax.Array:
    """(B, W) int32 bit rows -> (B, vocab) bool."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # (B, W, 32)
    return bits.reshape(words.shape[0], -1)[:, :vocab] != 0


def _allow(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Tokens whose bit is clear in ``allowed`` (B, W) -> -inf."""
    return jnp.where(_bits(allowed, logits.shape[1]), logits, -jnp.inf)


def sample(logits: jax.Array, s: SlotSampling, steps: jax.Array, eos_mask: jax.Array,
           top_n: int = 0, rows: jax.Array | None = None, allowed: jax.Array | None = None):
    """logits (B, V) f32, steps (B,) tokens generated so far per row, eos_mask (V,).

    ``allowed`` (B, W) int32: each row's token bitmask (``mask_words``), all ones (-1) for a
    row that no grammar constrains; the pass that applies it is skipped when no row is.

    ``s`` holds the rows' sampling state, or with ``rows`` (B,) the state of every slot, of
    which row b uses slot ``rows[b]`` (out of range: padding, reads the last slot).

    Returns tokens (B,), the chosen tokens' logprobs (B,), and when ``top_n`` > 0 the top
    alternatives (B, top_n) ids and logprobs. Logprobs are of the model's distribution after
    penalties and bias, before temperature and filtering (as OpenAI reports them); they are
    zeros when no row asked for logprobs. Each pass over the vocabulary that no row needs
    this step (penalties, min_tokens masking, noise and filtering, logprobs) is skipped.
    """
    small = s if rows is None else _padding_greedy(gather_rows(s, rows, _SMALL), rows, s.temperature.shape[0])
    needs_penalty = jnp.any((small.repetition_penalty != 1) | (small.presence_penalty != 0)
                            | (small.frequency_penalty != 0) | small.has_bias)
    logits = jax.lax.cond(
        needs_penalty,
        lambda: _penalize(logits, s if rows is None else gather_rows(s, rows, _LARGE),
                          small),
        lambda: logits)
    if allowed is not None:  # a grammar's mask acts like a bias of -inf on what it forbids
        logits = jax.lax.cond(jnp.any(allowed != -1), lambda: _allow(logits, allowed), lambda: logits)
    hold_eos = steps < small.min_tokens
    logits = jax.lax.cond(jnp.any(hold_eos),
                          lambda: jnp.where(eos_mask[None, :] & hold_eos[:, None], -jnp.inf, logits),
                          lambda: logits)
    greedy = argmax(logits)
    sampled = jax.lax.cond(jnp.any(small.temperature > 0), lambda: _sample_random(logits, small, steps),
                           lambda: greedy)
    tokens = jnp.where(small.temperature > 0, sampled, greedy)

    def with_logprobs():
        lse = jax.nn.logsumexp(logits, axis=-1)  # (B,)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
        if not top_n:
            return chosen, None, None
        top_logits, top_ids = jax.lax.top_k(logits, top_n)
        return chosen, top_ids.astype(jnp.int32), top_logits - lse[:, None]

    def without():
        b = logits.shape[0]
        zeros = jnp.zeros((b,), jnp.float32)
        if not top_n:
            return zeros, None, None
        return zeros, jnp.zeros((b, top_n), jnp.int32), jnp.zeros((b, top_n), jnp.float32)

    chosen, top_ids, top_lps = jax.lax.cond(jnp.any(small.wants_logprobs), with_logprobs, without)
    return tokens, chosen, top_ids, top_lps


def _padding_greedy(small, rows: jax.Array, slots: int):
    """Padding rows (out of range: they read the last slot's settings) as plain greedy rows,
    so they never turn on a pass over the vocabulary (noise, penalties, logprobs) that no
    real row needs."""
    pad = rows >= slots
    small.temperature = jnp.where(pad, 0.0, small.temperature)
    small.wants_logprobs = small.wants_logprobs & ~pad
    small.has_bias = small.has_bias & ~pad
    small.min_tokens = jnp.where(pad, 0, small.min_tokens)
    small.repetition_penalty = jnp.where(pad, 1.0, small.repetition_penalty)
    small.presence_penalty = jnp.where(pad, 0.0, small.presence_penalty)
    small.frequency_penalty = jnp.where(pad, 0.0, small.frequency_penalty)
    return small


def gather_rows(s: SlotSampling, rows: jax.Array, fields=None):
    """The state of slots ``rows`` (b,); out-of-range rows (padding) read the last slot. With
    ``fields``, only those (a namespace with just them)."""
    if fields is None:
        return jax.tree.map(lambda x: x.at[rows].get(mode="clip"), s)
    return types.SimpleNamespace(**{f: getattr(s, f).at[rows].get(mode="clip") for f in fields})


def record(s: SlotSampling, tokens: jax.Array, rows: jax.Array | None = None) -> SlotSampling:
    """Account sampled tokens (b,) of slots ``rows`` for the penalties; out-of-range rows
    (padding) are dropped."""
    if rows is None:
        rows = jnp.arange(tokens.shape[0])
    word, bit = tokens // 32, jnp.left_shift(jnp.int32(1), tokens % 32)
    seen = s.seen.at[rows, word].set(s.seen.at[rows, word].get(mode="fill", fill_value=0) | bit, mode="drop")
    count = s.counts.at[rows, tokens].get(mode="fill", fill_value=0).astype(jnp.int32)
    counts = s.counts.at[rows, tokens].set(jnp.minimum(count + 1, 32767).astype(jnp.int16), mode="drop")
    return dataclasses.replace(s, seen=seen, counts=counts)
