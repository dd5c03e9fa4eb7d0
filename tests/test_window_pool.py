"""Sliding-window layers' own KV pool (the block manager's window group) end to end: a
sequence's window layers hold only the blocks their window still reads, and no output changes
for it: greedy and seeded tokens equal those of the same engine without the group (every layer
keeping every position), with prefix hits, a session, preemptions from a tiny window pool,
both device paths and a tp=2 x dp=2 mesh; and a converted Gemma 3 gives transformers' greedy
tokens far past its window."""

import asyncio
import dataclasses

import numpy as np
import pytest

from model.backends import cpu
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.weights import init_params
from service.engine import Engine
from service.engine.blocks import NO_BLOCK
from service.engine.runner import ModelRunner
from service.params import SamplingParams

WINDOW, BLOCK = 16, 16


@pytest.fixture(scope="module")
def model(default_checkpoint):
    tokenizer = Tokenizer.from_dir(default_checkpoint)
    # Layer 0 slides, layer 1 attends to everything (Gemma's mix in two layers).
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=WINDOW,
                      sliding_layers=(True, False))
    return cfg, init_params(cfg, seed=3, scale=0.5), tokenizer


def engine_for(model, window_blocks, backend=None, plan=None, num_blocks=None, slots=4):
    cfg, params, tokenizer = model
    runner = ModelRunner(cfg, params, max_batch_size=slots, session_len=256, eos_ids=tokenizer.eos_ids,
                         max_prefill_chunk=48, block_size=BLOCK, num_blocks=num_blocks, backend=backend,
                         plan=plan, window_blocks=window_blocks)
    return Engine(runner, tokenizer)


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


PROMPTS = [prompt(n, i) for i, n in enumerate((50, 23, 75, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True)


def workload(engine, watch=None, batch_only=False):
    """Four prompts at once (greedy and seeded), then a repeat of the longest (a prefix hit
    while nothing else runs) and a two-turn session. ``watch(engine)`` runs after every plan,
    on the engine thread."""
    if watch is not None:
        schedule = engine.scheduler.schedule

        def watched(*a, **kw):
            plan = schedule(*a, **kw)
            watch(engine)
            return plan

        engine.scheduler.schedule = watched

    async def one(ids, params, session_id=None):
        toks = []
        async for out in engine.generate(ids, params, session_id=session_id):
            toks += out.token_ids
        return toks

    async def run():
        batch = await asyncio.gather(*(one(p, GREEDY if i % 2 else SEEDED) for i, p in enumerate(PROMPTS)))
        if batch_only:
            return batch
        repeat = await one(PROMPTS[2], GREEDY)
        first = await one(PROMPTS[0], GREEDY, session_id=5)
        second = await one(PROMPTS[0] + first + prompt(9, 9), GREEDY, session_id=5)
        return batch, repeat, first, second

    engine.start()
    try:
        return asyncio.run(run())
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def reference(model):
    """Every layer keeping every position (no window group), on XLA; and the programs that
    engine compiled."""
    from model.backends.xla import Xla

    engine = engine_for(model, 0, backend=Xla())
    out = workload(engine)
    return out, engine.runner.compiled_variants()


def decode_bound(engine):
    """After each plan: a decoding sequence's window layers hold at most the window and one
    block of KV (the window is a whole number of blocks here)."""
    def check(_):
        blocks = engine.blocks
        for s in engine.table.running.values():
            held = [b for b in blocks.held[s.slot].ids[1] if b != NO_BLOCK]
            if s.prefilled > len(s.seq) and not s.preempted:
                assert len(held) * BLOCK <= WINDOW + BLOCK, (s.prefilled, blocks.held[s.slot].ids[1])
                seen.append(s.prefilled)
    seen: list[int] = []
    return check, seen


@pytest.mark.parametrize("path", ["native CPU kernels", "xla"])
def test_window_layers_hold_their_window_and_outputs_do_not_change(model, reference, path):
    from model.backends.xla import Xla

    if path == "native CPU kernels" and not cpu.available():
        pytest.skip("the native CPU kernels do not build here")
    engine = engine_for(model, 24, backend=None if path != "xla" else Xla())
    assert engine.runner.backend.name == path and engine.blocks.window == WINDOW
    # The sliding layer's pools are the window group's 24 blocks (and padding's), the full
    # layer's the first group's whole sessions.
    assert engine.runner.cache[0][0].shape[1] == 25 and engine.runner.cache[1][0].shape[1] == 4 * 16 + 1
    check, seen = decode_bound(engine)
    got = workload(engine, check)
    assert got == reference[0]
    if path == "xla":  # the window group's tables are one more array axis, not more programs
        assert engine.runner.compiled_variants() == reference[1]
    assert max(seen) > 110  # sequences decoded far past their windows
    snap = engine.snapshot()
    assert snap["cached_tokens"] > 0 and snap["preemptions"] == 0
    # The session holds its window blocks between turns, and the metrics say so.
    held = engine.blocks.groups[1].used()
    assert held > 0
    text = engine.metrics.render(engine).decode()
    metric = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert metric['xlaserve_kv_cache_blocks{state="window_used"}'] == held
    assert metric['xlaserve_kv_cache_blocks{state="window_total"}'] == 24
    assert metric["xlaserve_kv_cache_usage_ratio"] == pytest.approx(
        max(held / 24, engine.blocks.used_blocks() / engine.blocks.total_blocks()))


def test_a_tiny_window_pool_preempts_and_loses_nothing(model, reference):
    """7 window blocks for 4 sequences whose windows need 2-3 each (and their prefill chunks):
    the window pool runs dry, newer sequences are preempted and recomputed."""
    engine = engine_for(model, 7)
    got = workload(engine)
    assert got == reference[0]
    assert engine.snapshot()["preemptions"] > 0


def test_window_pool_on_a_tp2_dp2_mesh(model, reference):
    """Each data replica its own pools of both groups."""
    from sharding import make_mesh, plan_for

    cfg = model[0]
    engine = engine_for(model, 12, plan=plan_for(cfg, make_mesh(2, 2), slots=4))
    assert engine.runner.cache[0][0].shape[:2] == (2, 13)
    assert workload(engine) == reference[0]


def test_every_layer_sliding_needs_no_first_pool_memory(model):
    """Mistral's shape (every layer slides): every layer's pools are the window group's 10
    blocks, the first group only keeps account of positions; four prompts' tokens (one slot,
    so one at a time: fewer programs to compile; XLA) are those of one group of whole sessions."""
    cfg, params, tokenizer = model
    every = (dataclasses.replace(cfg, sliding_layers=()), params, tokenizer)
    from model.backends.xla import Xla

    want = workload(engine_for(every, 0, backend=Xla(), slots=1), batch_only=True)
    engine = engine_for(every, 10, backend=Xla(), slots=1)
    assert [pool[0].shape[1] for pool in engine.runner.cache] == [11, 11]
    assert workload(engine, batch_only=True) == want


def test_gemma3_far_past_its_window_gives_transformers_greedy_tokens(tmp_path):
    """A converted Gemma 3 (window 6 on two of three layers) served with the window group: 80
    greedy tokens after an 11-token prompt equal transformers' generate."""
    import torch

    from model.checkpoint import load_config, load_params
    from model.convert import convert
    from test_parity import BASE, CASES, make_hf_checkpoint

    config_cls, overrides = CASES["gemma3"]
    hf = make_hf_checkpoint(tmp_path / "hf", config_cls, overrides)
    ids = [int(x) for x in np.random.default_rng(3).integers(0, BASE["vocab_size"], 11)]
    with torch.no_grad():
        t = torch.tensor([ids])
        want = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=80, min_new_tokens=80,
                           do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    convert(tmp_path / "hf", tmp_path / "converted", progress=False)
    cfg = load_config(tmp_path / "converted")
    runner = ModelRunner(cfg, load_params(tmp_path / "converted", cfg), max_batch_size=2, session_len=128,
                         max_prefill_chunk=16, block_size=16, window_blocks=4)
    assert runner.window == 6
    engine = Engine(runner, Tokenizer.from_dir(tmp_path / "converted"))

    async def run():
        toks = []
        async for out in engine.generate(ids, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)):
            toks += out.token_ids
        return toks

    engine.start()
    try:
        got = asyncio.run(run())
    finally:
        engine.stop()
    assert got == want
    assert engine.blocks.groups[1].used() == 0 and engine.blocks.used_blocks() == 0


def test_a_memory_budget_goes_to_the_full_layers_beyond_the_window_pool():
    """--cache-max-entry-count as a fraction: the sliding layers' pool is sized for the slots'
    windows, and the rest of the budget (in every layer's positions) feeds the full layers."""
    from service.engine.config import window_pool_blocks, window_rest

    cfg = ModelConfig(family="gemma", vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=6,
                      num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=512,
                      sliding_layers=(True,) * 5 + (False,))
    own = window_pool_blocks(512, 16, 32, 8192) * 32
    assert own == (16 * (16 + 2) + 2 * 17) * 32  # 16 windows of 512 and a block, two chunks of 512
    budget = 200_000
    full = window_rest(cfg, budget, own, 16 * 8192)
    # Bytes: budget x 6 layers = full x 1 layer + own x 5 layers.
    assert full == budget + (budget - own) * 5
    every = dataclasses.replace(cfg, sliding_layers=())  # every layer slides: the first pool keeps account only
    assert window_rest(every, budget, own, 16 * 8192) == 16 * 8192
    assert window_rest(cfg, own - 1, own, 16 * 8192) == own - 1  # a pool too small to split: one group
    assert window_rest(cfg, budget, 0, 16 * 8192) == budget  # no window pool: every layer shares the first
