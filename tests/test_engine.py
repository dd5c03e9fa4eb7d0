"""Engine behaviour on a tiny random model (fast to compile) with the real tokenizer."""

import asyncio
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.tokenizer import IncrementalDetokenizer, Tokenizer
from model.weights import init_params
from service import sampling as smp
from service.engine import Engine, Request, Sequence, direct
from service.engine.plan import Chunk
from service.engine.output import apply_stop_strings
from service.errors import ContextLengthExceeded, EngineFailed, Overloaded, ServiceError
from service.engine.runner import ModelRunner, compile_count
from service.params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer.from_dir(default_checkpoint)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return cfg, init_params(cfg, seed=0, scale=0.5)


def make_engine(tiny, tokenizer, slots=4, session_len=128, block_size=16, num_blocks=None, backend=None, **kw):
    cfg, params = tiny
    runner = ModelRunner(cfg, params, max_batch_size=slots, session_len=session_len,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=32, block_size=block_size,
                         num_blocks=num_blocks, backend=backend)
    engine = Engine(runner, tokenizer, **kw)
    return engine


async def collect(engine, ids, params, session_id=None):
    toks, text, last = [], "", None
    async for out in engine.generate(ids, params, session_id=session_id):
        toks += out.token_ids
        text += out.text
        last = out
    return toks, text, last


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


def run(engine, coro):
    engine.start()
    try:
        return asyncio.run(coro)
    finally:
        engine.stop()


def test_batched_equals_one_at_a_time_with_joins_and_leaves(tiny, tokenizer):
    reqs = [(prompt(5, 1), 20), (prompt(40, 2), 6), (prompt(17, 3), 30), (prompt(3, 4), 12), (prompt(9, 5), 8)]
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

    engine = make_engine(tiny, tokenizer, slots=1)

    async def sequential():
        return [(await collect(engine, ids, greedy(n)))[0] for ids, n in reqs]

    solo = run(engine, sequential())
    engine = make_engine(tiny, tokenizer, slots=4)  # fewer slots than requests: some wait;
    # 3 live rows run in a 4-row step with one padding row

    async def staggered():
        tasks = []
        for ids, n in reqs:
            tasks.append(asyncio.create_task(collect(engine, ids, greedy(n))))
            await asyncio.sleep(0.05)
        return [(await t)[0] for t in tasks]

    batched = run(engine, staggered())
    assert batched == solo
    # Most steps were queued on the device before the previous step's tokens were read.
    assert engine.stats.chained_steps > engine.stats.decode_steps // 2
    assert [len(t) for t in batched] == [n for _, n in reqs]


@pytest.mark.parametrize("xla", [False, True])
def test_packed_prefill_equals_one_chunk_per_call(tiny, tokenizer, xla):
    """Chunks of three slots in one prefill call (one continuing an earlier chunk) write the
    same KV and sample the same first tokens, with the same logprobs, as one call each: on the
    native kernels and on XLA (which scores each query against every packed sequence)."""
    from model.backends.xla import Xla

    cfg, params = tiny
    p1, p2, p3 = prompt(20, 21), prompt(13, 22), prompt(11, 23)
    lp = SamplingParams(temperature=0, logprobs=5)

    def runner_with_rows():
        r = ModelRunner(cfg, params, max_batch_size=4, session_len=128, max_prefill_chunk=64,
                        backend=Xla(pack_prompts=True) if xla else None)
        for slot, ids in ((0, p2), (1, p1), (3, p3)):
            r.set_slot(slot, lp, ids, seed=0)
        direct.prefill(r, 3, p3[:5], 0, last=False)
        return r

    def chunk(slot, ids, start):
        return Chunk(slot=slot, tokens=tuple(ids), start=start, last=True)

    packed = runner_with_rows()
    assert packed.shapes.prompts_per_call(39, 5) >= 3
    got = direct.prefill_chunks(packed, [chunk(1, p1, 0), chunk(0, p2, 0), chunk(3, p3[5:], 5)]).sampled
    single = runner_with_rows()
    want = [direct.prefill(single, slot, ids, start) for slot, ids, start in ((1, p1, 0), (0, p2, 0), (3, p3[5:], 5))]
    for i, one in enumerate(want):
        assert int(got.tokens[i]) == int(one.tokens[0])
        np.testing.assert_allclose(got.logprobs[i], one.logprobs[0], atol=1e-5)
        np.testing.assert_array_equal(got.top_ids[i], one.top_ids[0])
        np.testing.assert_allclose(got.top_logprobs[i], one.top_logprobs[0], atol=1e-5)
    # Decoding on from there reads the KV each call wrote: the same tokens both ways.
    slots, positions = [1, 0, 3], [20, 13, 11]
    toks_a = toks_b = [int(got.tokens[i]) for i in range(3)]
    for step in range(4):
        toks_a = [int(t) for t in direct.decode(packed, slots, toks_a, positions, [step + 1] * 3).tokens]
        toks_b = [int(t) for t in direct.decode(single, slots, toks_b, positions, [step + 1] * 3).tokens]
        assert toks_a == toks_b
        positions = [p + 1 for p in positions]
    with pytest.raises(ValueError, match="distinct slots"):
        direct.prefill_chunks(packed, [Chunk(slot=1, tokens=tuple(p1[:3]), start=0, last=False),
                                       Chunk(slot=1, tokens=tuple(p1[3:6]), start=3, last=False)])


@pytest.mark.parametrize("backend", ["default", "xla packed"])
def test_prompts_arriving_together_share_prefill_calls(tiny, tokenizer, backend):
    """Greedy and seeded tokens of prompts packed into shared prefill calls (decode rows
    riding along) equal those of each prompt alone."""
    from model.backends.xla import Xla

    kw = {"backend": Xla(pack_prompts=True)} if backend == "xla packed" else {}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=6, ignore_eos=True)
    prompts = [prompt(n, 30 + n) for n in (5, 9, 4, 12)]
    engine = make_engine(tiny, tokenizer, slots=4, **kw)

    async def each():
        return [(await collect(engine, ids, p))[0] for ids in prompts for p in (greedy, seeded)]

    solo = run(engine, each())
    engine = make_engine(tiny, tokenizer, slots=8, **kw)

    async def together():
        return [r[0] for r in await asyncio.gather(*[collect(engine, ids, p) for ids in prompts
                                                     for p in (greedy, seeded)])]

    assert run(engine, together()) == solo
    assert engine.runner.shapes.prompts_per_call(32) > 1
    assert engine.stats.prefill_calls < 2 * len(prompts)  # fewer calls than sequences


def test_decode_rows_ride_along_prefill_calls(tiny, tokenizer):
    """Requests decoding while a long prompt is prefilled advance inside its prefill calls,
    with the same tokens (greedy and seeded) as when each runs alone."""
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True)
    jobs = [(prompt(6, 41), greedy), (prompt(8, 42), seeded), (prompt(70, 43), dataclasses.replace(greedy, max_tokens=8))]
    engine = make_engine(tiny, tokenizer, slots=4)

    async def each():
        return [(await collect(engine, ids, p))[0] for ids, p in jobs]

    solo = run(engine, each())
    engine = make_engine(tiny, tokenizer, slots=4)

    async def overlapping():
        started = asyncio.Event()

        async def first():
            toks = []
            async for out in engine.generate(*jobs[0]):
                toks += out.token_ids
                if len(toks) >= 3:
                    started.set()
            return toks

        a = asyncio.create_task(first())
        b = asyncio.create_task(collect(engine, *jobs[1]))
        await started.wait()
        c = await collect(engine, *jobs[2])  # 70 tokens: three prefill calls of 32
        return [await a, (await b)[0], c[0]]

    assert run(engine, overlapping()) == solo
    assert engine.stats.mixed_calls >= 2


def test_seed_gives_same_tokens_whatever_shares_the_batch(tiny, tokenizer):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=42, ignore_eos=True)
    engine = make_engine(tiny, tokenizer)
    alone = run(engine, collect(engine, prompt(8, 9), p))[0]
    engine = make_engine(tiny, tokenizer)

    async def mixed():
        others = [asyncio.create_task(collect(engine, prompt(6, s), dataclasses.replace(p, seed=s)))
                  for s in (1, 2)]
        mine = await collect(engine, prompt(8, 9), p)
        await asyncio.gather(*others)
        return mine[0]

    assert run(engine, mixed()) == alone
    engine = make_engine(tiny, tokenizer)
    other_seed = run(engine, collect(engine, prompt(8, 9), dataclasses.replace(p, seed=43)))[0]
    assert other_seed != alone


def test_no_compilation_after_warmup(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=2, session_len=128)
    engine.runner.warmup()
    before = compile_count()

    async def workload():
        jobs = [
            collect(engine, prompt(3, 1), SamplingParams(temperature=0, max_tokens=5)),
            collect(engine, prompt(70, 2), SamplingParams(temperature=0.7, top_k=5, max_tokens=20,
                                                           stop=("the",), seed=3)),
            collect(engine, prompt(33, 3), SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1,
                                                           repetition_penalty=1.3, presence_penalty=0.5,
                                                           logit_bias=((5, 3.0),), logprobs=4,
                                                           max_tokens=60, min_tokens=10)),
            collect(engine, prompt(120, 4), SamplingParams(temperature=0, max_tokens=7)),
        ]
        return await asyncio.gather(*jobs)

    results = run(engine, workload())
    assert all(r[2].finish_reason in ("stop", "length") for r in results)
    assert compile_count() == before


def test_abort_frees_the_slot(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=1, session_len=512)

    async def go():
        await collect(engine, prompt(4, 3), SamplingParams(temperature=0, max_tokens=3))  # compile
        gen = engine.generate(prompt(4, 1), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the client goes away
        for _ in range(500):
            if engine.running_count == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.running_count == 0
        # and the slot serves the next request
        return await collect(engine, prompt(4, 2), SamplingParams(temperature=0, max_tokens=3))

    assert run(engine, go())[2].completion_tokens == 3


def test_queue_overflow_and_context_length_raise_typed_errors(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=1, session_len=64, max_queue=1)  # not started
    engine.submit([1, 2, 3], SamplingParams(max_tokens=4), lambda o: None)
    with pytest.raises(Overloaded):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=4), lambda o: None)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens; the request has 80"):
        engine.limits.prompt(50, SamplingParams(max_tokens=30))
    with pytest.raises(ContextLengthExceeded, match="the request has 70 tokens"):
        engine.limits.prompt(70, SamplingParams())


def test_stop_strings_spanning_tokens_are_never_leaked():
    req = Sequence(Request("r", [1], SamplingParams(stop=("STOP here",)), lambda o: None))
    pieces = ["Hello ", "wor", "ld ST", "OP h", "ere and more"]
    emitted, stopped = [], False
    for piece in pieces:
        text, stopped = apply_stop_strings(req, piece, final=False)
        emitted.append(text)
        if stopped:
            break
    assert stopped and "".join(emitted) == "Hello world "
    assert emitted[2] == "ld " and emitted[3] == ""  # "ST", "ST" + "OP h" held back
    req = Sequence(Request("r", [1], SamplingParams(stop=("xyz",)), lambda o: None))
    assert apply_stop_strings(req, "xyz...", final=False) == ("", True)  # very first token
    req = Sequence(Request("r", [1], SamplingParams(stop=("xyz",)), lambda o: None))
    assert apply_stop_strings(req, "ab x", final=False) == ("ab ", False)
    assert apply_stop_strings(req, "y", final=True) == ("xy", False)  # released at the end


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "Emoji 🎉🚀👍🏽, CJK 中文测试，日本語 and ascii."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# -- the sampler against numpy references on fixed logits ------------------------------------

V = 50


def _state(rows, **kw):
    s = smp.SlotSampling.empty(len(rows), V)
    for i, p in enumerate(rows):
        s = smp.set_row(s, jnp.int32(i), smp.row_values(p, V, kw.get("prompt", [3, 4]), seed=i))
    return s


def _logits(b=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 3, (b, V)).astype(np.float32))


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = _logits()
    eos = jnp.zeros((V,), bool)
    steps = jnp.zeros((3,), jnp.int32)
    greedy = np.asarray(logits).argmax(-1)
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1)):
        toks = smp.sample(logits, _state([p] * 3), steps, eos)[0]
        np.testing.assert_array_equal(np.asarray(toks), greedy)


def test_penalties_match_numpy_reference():
    logits = _logits(1, seed=1)
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.3,
                       logit_bias=((7, 2.0), (9, -5.0)))
    s = _state([p], prompt=[3, 4])
    s = smp.record(s, jnp.asarray([10]))
    s = smp.record(s, jnp.asarray([10]))
    s = smp.record(s, jnp.asarray([4]))
    got = np.asarray(smp._penalize(logits, s))[0]
    want = np.asarray(logits)[0].copy()
    for t in (3, 4, 10):  # prompt + output tokens: repetition penalty (HF style)
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    counts = {10: 2, 4: 1}
    for t, c in counts.items():  # output tokens only: OpenAI's presence/frequency
        want[t] -= 0.3 * c + 0.7
    want[7] += 2.0
    want[9] -= 5.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_top_p_and_min_p_keep_the_expected_sets():
    logits = _logits(1, seed=2)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    keep_p = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)]
    s = _state([SamplingParams(top_p=0.6)])
    kept = np.flatnonzero(np.isfinite(np.asarray(smp._filter(logits, s))[0]))
    assert set(kept) == set(keep_p)
    s = _state([SamplingParams(min_p=0.2)])
    kept = np.flatnonzero(np.isfinite(np.asarray(smp._filter(logits, s))[0]))
    assert set(kept) == set(np.flatnonzero(probs >= 0.2 * probs.max()))


def test_sampling_frequencies_follow_softmax():
    logits = jnp.asarray(np.log(np.array([0.5, 0.3, 0.2] + [1e-9] * (V - 3), np.float32)))[None]
    s = _state([SamplingParams(temperature=1.0)])
    eos = jnp.zeros((V,), bool)
    draws = jax.jit(jax.vmap(lambda st: smp.sample(logits, s, st[None], eos)[0][0]))(jnp.arange(4000))
    freq = np.bincount(np.asarray(draws), minlength=3)[:3] / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("scale, top_p, top_k, min_p", [
    (3.0, 0.9, 0, 0.0),  # peaked: the nucleus lies among the candidates
    (0.05, 0.95, 0, 0.0),  # flat: the nucleus reaches past them, the full sort decides
    (0.05, 0.95, 1000, 0.0),  # top_k past the candidates
    (0.05, 1.0, 0, 0.9),  # min_p alone on a flat distribution
])
def test_filter_on_a_large_vocab_matches_numpy(scale, top_p, top_k, min_p):
    vocab = 4 * smp.CANDIDATES + 7
    rng = np.random.default_rng(3)
    logits = (rng.normal(0, 1, (2, vocab)) * scale).astype(np.float32)
    p = SamplingParams(top_p=top_p, top_k=top_k, min_p=min_p)
    s = smp.SlotSampling.empty(2, vocab)
    for i in range(2):
        s = smp.set_row(s, jnp.int32(i), smp.row_values(p, vocab, [1], seed=i))
    got = np.isfinite(np.asarray(jax.jit(smp._filter)(jnp.asarray(logits), s)))
    for row in range(2):
        x = logits[row].astype(np.float64)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-x, kind="stable")
        keep = np.ones(vocab, bool)
        if top_k:
            keep &= x >= x[order[top_k - 1]]
        before = np.cumsum(probs[order]) - probs[order]
        keep &= x >= x[order][before < top_p].min()
        if min_p:
            keep &= probs >= min_p * probs.max()
        assert got[row].sum() == keep.sum() > 0
        np.testing.assert_array_equal(got[row], keep)


def test_concurrent_samples_of_one_prompt_prefill_it_once(tiny, tokenizer):
    ids = prompt(49, 11)  # two chunks of 32; three blocks of 16 and one token
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = make_engine(tiny, tokenizer, slots=4)
    solo = run(engine, collect(engine, ids, greedy))[0]
    engine = make_engine(tiny, tokenizer, slots=4)

    async def three():
        return await asyncio.gather(*[collect(engine, ids, greedy) for _ in range(3)])

    results = run(engine, three())
    assert [r[0] for r in results] == [solo] * 3
    # The first computes the prompt; the others share its blocks and compute only the last token.
    assert engine.stats.prompt_tokens == len(ids) + 2
    assert sorted(r[2].cached_tokens for r in results) == [0, len(ids) - 1, len(ids) - 1]
    seeded = [dataclasses.replace(greedy, temperature=1.0, seed=s) for s in (1, 2)]
    engine = make_engine(tiny, tokenizer, slots=4)

    async def two_seeds():
        return await asyncio.gather(*[collect(engine, ids, p) for p in seeded])

    a, b = run(engine, two_seeds())
    assert a[0] != b[0]  # shared prefill, own sampling


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_cached_prefix_and_session_turn_equal_a_cold_prefill(tiny, tokenizer, kv):
    """A prompt that starts with a finished request's prompt and output prefills only the rest
    (cached_tokens), and a session's second turn prefills only its own tokens: both give the
    tokens a fresh engine gives for the whole sequence. Also over an int8 KV cache, whose
    reused entries are the stored values and scales."""
    from model.backends import cpu

    if kv == "int8" and not cpu.available():
        pytest.skip("an int8 KV cache needs the native CPU kernels")
    cfg, params = tiny
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

    def fresh():
        runner = ModelRunner(cfg, params, max_batch_size=2, session_len=128, eos_ids=tokenizer.eos_ids,
                             max_prefill_chunk=32, kv_cache_dtype=kv, block_size=16)
        return Engine(runner, tokenizer)

    first, extra = prompt(40, 21), prompt(9, 22)
    engine = fresh()

    async def warm():
        a = await collect(engine, first, greedy(6))
        b = await collect(engine, first + a[0] + extra, greedy(10))
        turn1 = await collect(engine, first, greedy(6), session_id=5)
        turn2 = await collect(engine, extra, greedy(10), session_id=5)
        return a[0], b, turn1[0], turn2

    a, reused, turn1, turn2 = run(engine, warm())
    # A finished request's full blocks stay cached; a session keeps all its KV, the partly
    # filled last block too.
    assert reused[2].cached_tokens == (len(first) + len(a) - 1) // 16 * 16
    assert turn2[2].cached_tokens >= len(first) + len(turn1) - 1
    for history, got in ((first + a, reused), (first + turn1, turn2)):
        cold = fresh()
        want = run(cold, collect(cold, history + extra, greedy(10)))
        assert want[2].cached_tokens == 0
        assert got[0] == want[0]


def test_argmax_takes_the_first_maximum():
    x = np.random.default_rng(4).integers(0, 5, (6, 40)).astype(np.float32)  # many ties
    x[2] = -np.inf
    np.testing.assert_array_equal(np.asarray(smp.argmax(jnp.asarray(x))), x.argmax(-1))


def test_sampling_by_slot_rows_skips_nothing_a_row_needs():
    """``rows`` picks each batch row's slot from the whole state: a penalised, biased row with
    logprobs next to a plain greedy one gives what the gathered state gives, and the plain
    row's logprobs are computed too (cheap passes are skipped only when no row needs them)."""
    plain = SamplingParams(temperature=0)
    fancy = SamplingParams(temperature=0, repetition_penalty=3.0, logit_bias=((5, 9.0),), logprobs=3)
    s = _state([plain, fancy, plain], prompt=[0, 1, 2, 3])
    logits = _logits(2, seed=5)
    rows = jnp.asarray([1, 2], jnp.int32)
    eos = jnp.zeros((V,), bool)
    steps = jnp.zeros((2,), jnp.int32)
    got = smp.sample(logits, s, steps, eos, top_n=3, rows=rows)
    want = smp.sample(logits, smp.gather_rows(s, rows), steps, eos, top_n=3)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got[0][0]) == 5  # the bias won
    lse = jax.nn.logsumexp(logits[1])
    np.testing.assert_allclose(float(got[1][1]), float(logits[1, int(got[0][1])] - lse), rtol=1e-5)
    # No row asks for logprobs: they are not computed.
    s = _state([plain, plain])
    out = smp.sample(logits, s, steps, eos, top_n=3)
    assert not np.asarray(out[1]).any() and not np.asarray(out[3]).any()
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(logits).argmax(-1))


def test_positions_past_the_rope_table_are_an_error_not_clipped(tiny, tokenizer):
    """The step reads RoPE rows with clipping (for padding); a real token past --session-len
    would silently reuse the last row, so the runner refuses it."""
    engine = make_engine(tiny, tokenizer, session_len=64)
    runner = engine.runner
    direct.prefill(runner, 0, [5, 6, 7], start=61)  # positions 61..63: the table's last rows
    with pytest.raises(ValueError, match="position 64 is past the 64 positions"):
        direct.prefill(runner, 0, [5, 6], start=63)
    with pytest.raises(ValueError, match="position 64"):
        direct.decode(runner, [0], [5], [64], [1])


def test_compact_sampling_state_penalises_like_dense_arrays():
    """logit_bias as entries, seen tokens as bits and int16 counts give the logits that dense
    per-vocabulary arrays give (OpenAI's formulas, in numpy), and the state of 256 slots over a
    152k vocabulary stays under 100 MiB."""
    vocab, rng = 1000, np.random.default_rng(0)
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                             logit_bias=((7, 2.0), (999, -5.0), (31, 1.5))),
              SamplingParams(repetition_penalty=1.0, frequency_penalty=-0.5)]
    prompts = [[1, 31, 32, 500, 999], [4, 4, 63]]
    state = smp.SlotSampling.empty(2, vocab)
    for slot, (p, ids) in enumerate(zip(params, prompts)):
        state = smp.set_row(state, slot, smp.row_values(p, vocab, ids, seed=0))
    outputs = [[31, 31, 64, 999], [63, 5, 5, 5]]
    for t in range(4):
        state = smp.record(state, jnp.asarray([outputs[0][t], outputs[1][t]]))
    logits = rng.standard_normal((2, vocab)).astype(np.float32) * 3
    got = np.asarray(smp._penalize(jnp.asarray(logits), state))
    for row, (p, ids, out) in enumerate(zip(params, prompts, outputs)):
        want = logits[row].copy()
        seen = sorted(set(ids) | set(out))
        want[seen] = np.where(want[seen] > 0, want[seen] / p.repetition_penalty, want[seen] * p.repetition_penalty)
        counts = np.bincount(out, minlength=vocab).astype(np.float32)
        want -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for token, value in p.logit_bias:
            want[token] += value
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-6)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda: smp.SlotSampling.empty(256, 152064))))
    assert size < 100 * 2**20, size / 2**20


def test_counts_saturate_instead_of_wrapping():
    state = smp.SlotSampling.empty(1, 10)
    state = dataclasses.replace(state, counts=state.counts.at[0, 3].set(32766))
    for _ in range(3):
        state = smp.record(state, jnp.asarray([3]))
    assert int(state.counts[0, 3]) == 32767


@pytest.mark.parametrize("backend", ["xla", "default"])
def test_a_step_that_fails_after_donating_the_cache_fails_its_requests_and_the_engine_serves_on(
        tiny, tokenizer, backend):
    from model.backends.xla import Xla

    engine = make_engine(tiny, tokenizer, backend=Xla() if backend == "xla" else None)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    p = prompt(20, 3)

    async def go():
        before = await collect(engine, p, greedy)
        engine.runner.fault = RuntimeError("injected device failure")
        with pytest.raises(ServiceError, match="failed while generating"):
            await collect(engine, p, greedy)
        after = await collect(engine, p, greedy)
        return before, after

    cache = engine.runner.cache
    before, after = run(engine, go())
    # The donated cache was consumed by the failed step and made anew; nothing of it was reused
    # (the prompt's cached blocks were forgotten), so the tokens are computed afresh and equal.
    assert any(x.is_deleted() for x in jax.tree.leaves(cache))
    assert after[0] == before[0] and after[2].finish_reason == "length" and after[2].cached_tokens == 0
    assert engine.failed is None and engine.is_alive() is False  # stopped by run(); alive while it ran


def test_an_engine_that_cannot_recover_says_so_on_health_and_refuses_requests(tiny, tokenizer, monkeypatch):
    engine = make_engine(tiny, tokenizer)

    def broken():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "recover", broken)

    async def go():
        engine.runner.fault = RuntimeError("injected device failure")
        with pytest.raises(ServiceError, match="failed while generating"):
            await collect(engine, prompt(10, 1), SamplingParams(max_tokens=4, temperature=0))
        deadline = time.monotonic() + 10
        while engine._thread_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    run(engine, go())
    assert not engine.is_alive() and "device lost" in engine.failed
    with pytest.raises(EngineFailed, match="restart the server"):
        engine.submit([1, 2, 3], SamplingParams(), lambda o: None)
