"""The compiled-program store: a restart reads every step's executable instead of tracing and
compiling it, and the tokens are those of a server that compiled its own."""

import asyncio
import logging
import re

import numpy as np
import pytest

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.weights import init_params
from service.engine import Engine, programs
from service.engine.runner import ModelRunner, compile_count
from service.engine.speculate import Speculation
from service.params import SamplingParams
from sharding import make_mesh, plan_for
from tests.conftest import start_server


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer.from_dir(default_checkpoint)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return cfg, init_params(cfg, seed=0, scale=0.5)


@pytest.fixture
def store(tmp_path):
    programs.enable(tmp_path / "programs")
    try:
        yield tmp_path / "programs"
    finally:
        programs.enable(None)


def runner(tiny, tokenizer, slots=2, tp=1):
    cfg, params = tiny
    plan = None if tp == 1 else plan_for(cfg, make_mesh(tp, 1), slots=slots)
    return ModelRunner(cfg, params, max_batch_size=slots, session_len=128, eos_ids=tokenizer.eos_ids,
                       max_prefill_chunk=32, block_size=16, plan=plan)


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


def workload(r, tokenizer, check_compiles=True):
    """Greedy, seeded and logprob requests (prefill, decode, verify and score programs) on an
    engine over ``r``, warmed up first; their tokens. Nothing compiles after the warm-up."""
    r.warmup(verify_tokens=5)
    engine = Engine(r, tokenizer, speculation=Speculation("ngram", 4))
    before = compile_count()
    engine.start()

    async def go():
        async def one(ids, params):
            toks = []
            async for out in engine.generate(ids, params):
                toks += out.token_ids
            return toks

        quoting = prompt(20, 1) * 3  # n-gram drafts hit: verify calls run
        return await asyncio.gather(
            one(quoting, SamplingParams(temperature=0, max_tokens=24)),
            one(prompt(40, 2), SamplingParams(temperature=0.8, seed=7, max_tokens=16)),
            one(prompt(9, 3), SamplingParams(temperature=0, max_tokens=8, logprobs=3, prompt_logprobs=2)))

    try:
        out = asyncio.run(go())
    finally:
        engine.stop()
    if check_compiles:
        assert compile_count() == before
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_a_restart_reads_every_program_and_gives_the_same_tokens(tiny, tokenizer, store, tp):
    programs.enable(None)
    plain = workload(runner(tiny, tokenizer, tp=tp), tokenizer)  # no store: compiled in memory
    programs.enable(store)

    first = runner(tiny, tokenizer, tp=tp)
    got_first = workload(first, tokenizer)
    loaded, compiled = first.program_counts()
    files = sorted(p.name for p in store.iterdir())
    assert loaded == 0 and compiled == len(files) >= 8

    again = runner(tiny, tokenizer, tp=tp)  # a restart: new programs, the same store
    before = compile_count()
    again.warmup(verify_tokens=5)
    assert compile_count() == before  # nothing traced or compiled
    assert again.program_counts() == (compiled, 0)
    got_again = workload(again, tokenizer)
    assert sorted(p.name for p in store.iterdir()) == files  # serving wrote nothing new
    assert got_first == got_again == plain


def test_another_setting_is_another_program_and_a_bad_file_is_compiled_again(tiny, tokenizer, store, caplog):
    workload(runner(tiny, tokenizer, slots=2), tokenizer)
    two = set(store.iterdir())
    four = runner(tiny, tokenizer, slots=4)  # other shapes and another sampling state
    four.warmup(verify_tokens=5)
    assert four.program_counts()[0] == 0 and set(store.iterdir()) > two

    for path in two:
        path.write_bytes(b"torn")
    with caplog.at_level(logging.INFO, logger="service.engine.programs"):
        r = runner(tiny, tokenizer, slots=2)
        r.warmup(verify_tokens=5)
    assert r.program_counts() == (0, len(two))
    assert "did not load" in caplog.text
    assert all(p.read_bytes() != b"torn" for p in two)
    programs.enable(None)
    assert workload(runner(tiny, tokenizer, slots=2), tokenizer) == workload(r, tokenizer, check_compiles=False)


def test_a_warm_restart_of_the_server_compiles_nothing(default_checkpoint, tmp_path):
    """The CLI keeps programs in its cache: the second start reads them all and says so."""
    starts = []
    for i in range(2):
        log = tmp_path / f"server{i}.log"
        proc, url = start_server(log, log_level="INFO")
        try:
            import httpx

            r = httpx.post(url + "/v1/completions", json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0},
                           timeout=120)
            assert r.status_code == 200
            starts.append((r.json()["choices"][0]["text"], log.read_text()))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    (text0, log0), (text1, log1) = starts
    assert text0 == text1
    # The first start may find what an earlier server of the session stored.
    ready0 = re.search(r"ready [\d.]+ s after launch \(a \w+ start: (\d+) step programs compiled, (\d+) loaded", log0)
    ready1 = re.search(r"ready [\d.]+ s after launch \(a warm start: 0 step programs compiled, (\d+) loaded", log1)
    assert ready0 and ready1, log1[-2000:]
    assert int(ready1.group(1)) == int(ready0.group(1)) + int(ready0.group(2)) > 10
