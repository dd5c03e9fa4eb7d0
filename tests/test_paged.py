"""The paged KV cache end to end: the bundled model's greedy and seeded tokens equal those the
engine gave before the cache was paged (tests/data/engine_recorded.json, recorded by
tests/data/record_engine.py from the slot-row engine) with prefix hits, a session and a pool
so small that sequences are preempted and recomputed; and, on a tiny model, many short chats
decoding together in a pool sized for a few sessions, a shared system prompt's blocks held
once, the metrics that report them, and requests the pool can never hold."""

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from model.backends import cpu
from service.engine.config import EngineConfig
from service.errors import KVPoolExceeded
from service.params import SamplingParams

RECORDED = json.loads((Path(__file__).parent / "data" / "engine_recorded.json").read_text())


def _replay(engine):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from record_engine import run_workload

    engine.start()
    try:
        return asyncio.run(run_workload(engine, engine.tokenizer))
    finally:
        engine.stop()


@pytest.mark.parametrize("path", ["native CPU kernels", "xla"])
def test_bundled_model_tokens_equal_the_slot_row_engines(default_checkpoint, monkeypatch, path):
    """Greedy and seeded, a prompt repeated (a full prefix hit), prompts sharing a system
    prompt, a three-turn session, over 7 blocks of 32 for 4 slots of sequences of up to ~100
    tokens, so the pool runs dry mid-decode and the newest sequences are preempted and
    recomputed: no output may change. (A pool of whole sessions runs the same workload with
    no preemption; every sequence here that is not preempted runs just so, and the pool's
    sizing is the 64-chats test's.)"""
    from service.engine import Engine
    from service.models import build_runner

    if path == "xla":
        monkeypatch.setattr(cpu, "available", lambda: False)
    elif not cpu.available():
        pytest.skip("the native CPU kernels do not build here")
    runner, tokenizer = build_runner(default_checkpoint, EngineConfig(max_batch_size=4, session_len=512, num_blocks=7))
    assert runner.backend.name == path
    engine = Engine(runner, tokenizer)
    got = _replay(engine)
    want = RECORDED[path]
    assert got["batch"] == want["batch"]
    assert got["session"] == want["session"]
    snap = engine.snapshot()
    assert snap["preemptions"] > 0  # the dry pool was really hit
    assert snap["cached_tokens"] > 0  # the repeated prompt and the system prompt hit blocks


def test_bundled_model_on_a_tp2_dp2_mesh_equals_the_slot_row_engines(default_checkpoint):
    """Each data replica its own pool and block ids, KV heads over ``model``: XLA's recorded
    tokens again, over 4 blocks of 32 per replica for its 2 slots, so sequences are also
    preempted within their replica."""
    from service.engine import Engine
    from service.models import build_runner

    runner, tokenizer = build_runner(default_checkpoint, EngineConfig(max_batch_size=4, session_len=512, tp=2, dp=2,
                                                                      num_blocks=4))
    assert runner.replicas == 2 and runner.cache[0][0].shape[0] == 2
    engine = Engine(runner, tokenizer)
    got = _replay(engine)
    assert got == RECORDED["xla"]
    assert engine.snapshot()["preemptions"] > 0


# -- a tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(default_checkpoint):
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer
    from model.weights import init_params

    tokenizer = Tokenizer.from_dir(default_checkpoint)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return cfg, init_params(cfg, seed=0, scale=0.5), tokenizer


def engine_for(tiny, slots, session_len, num_blocks, block_size=16):
    from service.engine import Engine
    from service.engine.runner import ModelRunner

    cfg, params, tokenizer = tiny
    runner = ModelRunner(cfg, params, max_batch_size=slots, session_len=session_len, eos_ids=tokenizer.eos_ids,
                         max_prefill_chunk=256, block_size=block_size, num_blocks=num_blocks)
    return Engine(runner, tokenizer)


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


async def _serve(engine, prompts, params, watch=None):
    async def one(ids):
        toks, last, first_at = [], None, None
        async for out in engine.generate(ids, params):
            if first_at is None and out.token_ids:
                first_at = len(done)
            toks += out.token_ids
            last = out
        done.append(True)
        return toks, last, first_at

    done: list[bool] = []
    task = asyncio.gather(*(one(p) for p in prompts))
    peak = 0
    while not task.done():
        peak = max(peak, engine.snapshot()["running"])
        if watch is not None:
            watch(engine)
        await asyncio.sleep(0.002)
    return await task, peak


def test_64_short_chats_all_decode_together_in_a_pool_for_8_sessions(tiny):
    """64 slots over a pool of 8 whole sessions: every chat is admitted at once and gets its
    first token before any of them finishes; none is preempted."""
    session_len = 512
    engine = engine_for(tiny, 64, session_len, num_blocks=8 * session_len // 16)
    prompts = [prompt(12 + i % 7, i) for i in range(64)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine.start()
    try:
        results, peak = asyncio.run(_serve(engine, prompts, greedy))
    finally:
        engine.stop()
    assert peak == 64  # the running gauge: all 64 at once
    assert all(first_at == 0 for _, _, first_at in results)  # every first token before any finish
    assert all(len(toks) == 24 for toks, _, _ in results)
    assert engine.snapshot()["preemptions"] == 0


def test_a_shared_system_prompt_is_held_once_and_reported_as_hits(tiny):
    """Eight chats behind one 160-token system prompt hold its 10 blocks once: the used-block
    count proves it, and cached_tokens, the hit-rate and KV-usage metrics report the hits."""
    engine = engine_for(tiny, 8, 512, num_blocks=200)
    system = prompt(160, 99)
    prompts = [system + prompt(5 + i, 100 + i) for i in range(8)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    peak_used = [0]
    distinct = sum(-(-(len(p) + 40) // 16) for p in prompts)  # blocks without sharing, at the end

    def watch(e):
        peak_used[0] = max(peak_used[0], e.snapshot()["kv_blocks_used"])

    engine.start()
    try:
        results, _ = asyncio.run(_serve(engine, prompts, greedy, watch))
        # After them, one more with the same system prompt: its blocks are still cached.
        _, last = asyncio.run(_serve(engine, [system + [7, 8, 9]], greedy))[0][0][:2]
        text = engine.metrics.render(engine).decode()
    finally:
        engine.stop()
    assert peak_used[0] <= distinct - 7 * 10  # the 10 system blocks once, not 8 times
    hits = sorted(r[1].cached_tokens for r in results)
    assert hits[0] == 0 and hits[1:] == [160] * 7
    assert last.cached_tokens == 160
    snap = engine.snapshot()
    prompt_total = sum(map(len, prompts)) + 163
    assert snap["cached_tokens"] == 8 * 160 and snap["prompt_tokens"] == prompt_total - 8 * 160
    metric = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert metric["xlaserve_prefix_cache_hit_rate"] == pytest.approx(8 * 160 / prompt_total)
    # Nothing runs now: the blocks in use are none; the cached ones are free to take.
    assert metric["xlaserve_kv_cache_usage_ratio"] == 0.0
    assert metric['xlaserve_kv_cache_blocks{state="total"}'] == 200


def test_a_request_the_pool_can_never_hold_is_refused_with_the_numbers(tiny):
    engine = engine_for(tiny, 4, 512, num_blocks=4)  # 64 tokens in all
    with pytest.raises(KVPoolExceeded, match="more than the 64 the server's KV cache holds"):
        engine.submit(prompt(40, 1), SamplingParams(max_tokens=30), lambda o: None)
    with pytest.raises(KVPoolExceeded):
        engine.submit(prompt(64, 1), SamplingParams(), lambda o: None)
    # One that fits alone runs, to the pool's end at most.
    engine.start()
    try:
        (toks, last, _), = asyncio.run(_serve(engine, [prompt(40, 2)],
                                              SamplingParams(temperature=0, ignore_eos=True)))[0]
    finally:
        engine.stop()
    assert last.finish_reason == "length" and 40 + len(toks) == 64


def test_many_chats_over_a_dry_pool_lose_nothing(tiny):
    """More sequences than the pool holds at once: they are preempted and recomputed, and
    each gets what it gets alone."""
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [prompt(20 + 3 * i, 50 + i) for i in range(6)]
    alone = engine_for(tiny, 1, 256, num_blocks=None)
    alone.start()
    try:
        want = [asyncio.run(_serve(alone, [p], greedy))[0][0][0] for p in prompts]
    finally:
        alone.stop()
    engine = engine_for(tiny, 6, 256, num_blocks=12)  # 192 tokens for ~6 x 60
    engine.start()
    try:
        results, _ = asyncio.run(_serve(engine, prompts, greedy))
    finally:
        engine.stop()
    assert [r[0] for r in results] == want
    assert all(r[1].finish_reason == "length" for r in results)
    assert engine.snapshot()["preemptions"] > 0
