"""Serving RL rollouts: sleep and wake, weights updated in place (in-process and from disk),
pause and resume, on tiny random models over both device paths and on a tp=2 mesh."""

import asyncio
import json
import threading
import time

import jax
import numpy as np
import pytest

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.weights import WeightsError, init_params
from service.engine import Engine
from service.engine.runner import ModelRunner
from service.errors import Sleeping
from service.params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer.from_dir(default_checkpoint)


@pytest.fixture(scope="module")
def cfg(tokenizer):
    return ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def weights(cfg, seed):
    return init_params(cfg, seed=seed, scale=0.5)


def make_engine(cfg, tokenizer, params, backend=None, tp=1, quantize=None):
    plan = None
    if tp > 1:
        from sharding import make_mesh, plan_for

        plan = plan_for(cfg, make_mesh(tp, 1), slots=4)
    runner = ModelRunner(cfg, params, max_batch_size=4, session_len=128, eos_ids=tokenizer.eos_ids,
                         max_prefill_chunk=32, block_size=16, backend=backend, plan=plan, quantize=quantize)
    engine = Engine(runner, tokenizer)
    engine.start()
    return engine


def prompts(n=3, length=20):
    rng = np.random.default_rng(0)
    shared = [int(x) for x in rng.integers(100, 30000, 16)]  # a prefix the cache can share
    return [shared + [int(x) for x in rng.integers(100, 30000, length - 16)] for _ in range(n)]


async def _collect(engine, ids, params):
    toks, last = [], None
    async for out in engine.generate(ids, params):
        toks += out.token_ids
        last = out
    return toks, last


def generate(engine, ids_list, params=GREEDY):
    """Each prompt's (tokens, final Output), all submitted together."""
    async def main():
        return await asyncio.gather(*(_collect(engine, ids, params) for ids in ids_list))
    return asyncio.run(main())


def tokens(engine, ids_list, params=GREEDY):
    return [t for t, _ in generate(engine, ids_list, params)]


def served_bytes(runner):
    return sum(x.nbytes for x in jax.tree.leaves((runner.params, runner.cache, runner.sampling)))


def live_bytes():
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.fixture(params=["kernels", "xla"])
def backend(request):
    if request.param == "xla":
        from model.backends.xla import Xla

        return Xla()
    return None  # the runner's own choice: the native CPU kernels


@pytest.mark.parametrize("tp", [1, 2])
def test_sleep_frees_device_memory_and_wake_gives_the_same_tokens(cfg, tokenizer, backend, tp):
    if tp > 1 and backend is None:
        pytest.skip("a mesh runs on XLA")
    engine = make_engine(cfg, tokenizer, weights(cfg, 0), backend, tp)
    try:
        ids = prompts()
        greedy, seeded = tokens(engine, ids), tokens(engine, ids, SEEDED)
        held = served_bytes(engine.runner)
        before = live_bytes()
        assert engine.sleep(level=1) == 0 and engine.is_sleeping
        assert before - live_bytes() >= 0.95 * held
        with pytest.raises(Sleeping):
            engine.submit(ids[0], GREEDY, lambda out: None)
        engine.wake_up()
        assert not engine.is_sleeping
        assert tokens(engine, ids) == greedy and tokens(engine, ids, SEEDED) == seeded
    finally:
        engine.stop()


def test_sleep_level_2_needs_new_weights_or_a_reload(cfg, tokenizer, tmp_path):
    from model.convert.build import save_checkpoint

    a = weights(cfg, 0)
    save_checkpoint(tmp_path / "a", cfg, jax.tree.map(np.asarray, a), source="test")
    engine = make_engine(cfg, tokenizer, a)
    try:
        ids = prompts()
        want_a = tokens(engine, ids)
        engine.sleep(level=2)
        engine.wake_up(("kv_cache",))  # the cache back, the weights not: still asleep
        assert engine.is_sleeping and not engine.runner.has_weights
        with pytest.raises(Sleeping):
            engine.submit(ids[0], GREEDY, lambda out: None)
        with pytest.raises(Exception, match="no checkpoint to reload"):
            engine.wake_up(("weights",))
        engine.checkpoint = tmp_path / "a"  # what build_engine sets: the served checkpoint
        engine.wake_up(("weights",))  # reloaded from the checkpoint
        assert not engine.is_sleeping and tokens(engine, ids) == want_a
        # Asleep at level 2, new weights take the place of a reload.
        b = weights(cfg, 1)
        fresh = make_engine(cfg, tokenizer, b)
        want_b = tokens(fresh, ids)
        fresh.stop()
        engine.sleep(level=2)
        bad = weights(cfg, 1)
        bad["embed"] = bad["embed"][:-1]
        with pytest.raises(WeightsError, match="embed has shape"):  # no weights at all, and it stays so
            engine.update_weights(bad)
        assert engine.is_sleeping and not engine.runner.has_weights
        engine.update_weights(b)
        assert engine.is_sleeping  # the KV cache is still freed
        engine.wake_up()
        assert tokens(engine, ids) == want_b
    finally:
        engine.stop()


@pytest.mark.parametrize("tp", [1, 2])
def test_update_in_process_equals_a_fresh_engine_on_the_new_weights(cfg, tokenizer, backend, tp):
    if tp > 1 and backend is None:
        pytest.skip("a mesh runs on XLA")
    engine = make_engine(cfg, tokenizer, weights(cfg, 0), backend, tp)
    fresh = make_engine(cfg, tokenizer, weights(cfg, 1), backend, tp)
    try:
        ids = prompts()
        old = tokens(engine, ids)
        want, want_seeded = tokens(fresh, ids), tokens(fresh, ids, SEEDED)
        assert want != old
        variants = engine.runner.compiled_variants()
        # A trainer's arrays, wherever they are: here placed on another device than the server's.
        new = jax.device_put(weights(cfg, 1), jax.devices()[-1])
        assert engine.update_weights(new) == "1" and engine.weight_version == "1"
        # The compiled steps take the new weights as they are (preparing them may compile its own).
        assert engine.runner.compiled_variants() == variants
        del new  # the server holds its own copy
        (first, out), *_ = generate(engine, ids[:1])
        assert out.cached_tokens == 0 and out.weight_version == "1"  # nothing the old weights computed
        assert first == want[0]
        assert tokens(engine, ids) == want and tokens(engine, ids, SEEDED) == want_seeded
        assert engine.update_weights(weights(cfg, 0), version="step-0") == "step-0"
        assert tokens(engine, ids) == old
    finally:
        engine.stop()
        fresh.stop()


def test_an_update_rebuilds_quantized_weights(cfg, tokenizer):
    """int8 weights on the CPU kernels: quantized anew from the update, as a fresh server would."""
    engine = make_engine(cfg, tokenizer, weights(cfg, 0), quantize="int8")
    fresh = make_engine(cfg, tokenizer, weights(cfg, 1), quantize="int8")
    try:
        ids = prompts()
        want = tokens(fresh, ids)
        assert tokens(engine, ids) != want
        engine.update_weights(weights(cfg, 1))
        assert tokens(engine, ids) == want
    finally:
        engine.stop()
        fresh.stop()


def test_bad_weights_are_refused_by_name_and_the_old_ones_keep_serving(cfg, tokenizer):
    engine = make_engine(cfg, tokenizer, weights(cfg, 0))
    try:
        ids = prompts()
        want = tokens(engine, ids)
        bad = weights(cfg, 1)
        bad["layers"][1]["wq"] = bad["layers"][1]["wq"][:, :2]
        with pytest.raises(WeightsError, match=r"layers\.1\.wq has shape"):
            engine.update_weights(bad)
        missing = weights(cfg, 1)
        del missing["layers"][0]["w_up"]
        with pytest.raises(WeightsError, match=r"layers\.0\.w_up is missing"):
            engine.update_weights(missing)
        extra = weights(cfg, 1)
        extra["layers"][0]["w_gate_proj"] = extra["layers"][0]["w_up"]
        with pytest.raises(WeightsError, match=r"layers\.0\.w_gate_proj is not a weight"):
            engine.update_weights(extra)
        ints = weights(cfg, 1)
        ints["final_norm"] = np.ones((32,), np.int32)
        with pytest.raises(WeightsError, match="final_norm has dtype int32"):
            engine.update_weights(ints)
        assert engine.weight_version == "0" and tokens(engine, ids) == want
    finally:
        engine.stop()


def test_an_update_under_load_mixes_no_weights_into_one_request(cfg, tokenizer):
    """Requests run while weights change: each one's tokens are wholly one version's (equal to a
    fresh engine's on those weights), none is lost, and those that arrive meanwhile wait."""
    a, b = weights(cfg, 0), weights(cfg, 1)
    engine = make_engine(cfg, tokenizer, a)
    refs = {"0": make_engine(cfg, tokenizer, a), "1": make_engine(cfg, tokenizer, b)}
    try:
        ids = prompts(8)
        long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        want = {v: tokens(r, ids, long) for v, r in refs.items()}

        async def main():
            first = [asyncio.ensure_future(_collect(engine, x, long)) for x in ids[:4]]
            await asyncio.sleep(0.05)
            update = asyncio.ensure_future(asyncio.to_thread(engine.update_weights, b))
            await asyncio.sleep(0.01)
            later = [asyncio.ensure_future(_collect(engine, x, long)) for x in ids[4:]]
            await update
            return await asyncio.gather(*first, *later)

        results = asyncio.run(main())
        versions = [out.weight_version for _, out in results]
        assert all(out.finish_reason == "length" for _, out in results)
        assert set(versions) <= {"0", "1"} and versions[4:] == ["1"] * 4
        for i, (toks, out) in enumerate(results):
            assert toks == want[out.weight_version][i]
    finally:
        engine.stop()
        for r in refs.values():
            r.stop()


def test_pause_aborts_or_waits_and_resume_admits_what_waited(cfg, tokenizer):
    engine = make_engine(cfg, tokenizer, weights(cfg, 0))
    try:
        ids = prompts(2)
        long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        want = tokens(engine, ids[1:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        done = {}

        async def main():
            running = asyncio.ensure_future(_collect(engine, ids[0], long))
            while not engine.table.running:
                await asyncio.sleep(0.005)
            aborted = await asyncio.to_thread(engine.pause, "abort")
            queued = asyncio.ensure_future(_collect(engine, ids[1], GREEDY))
            await asyncio.sleep(0.3)
            done["queued_while_paused"] = not queued.done() and engine.waiting.count == 1
            engine.resume()
            return aborted, await running, await queued

        aborted, (_, run_out), (queued_toks, queued_out) = asyncio.run(main())
        assert aborted == 1 and run_out.finish_reason == "abort"
        assert done["queued_while_paused"] and queued_toks == want[0] and queued_out.finish_reason == "length"
        with pytest.raises(Exception, match="mode must be"):
            engine.pause("keep")
    finally:
        engine.stop()


def _hf_llama(path, seed, layers=2):
    """A tiny Llama saved as Hugging Face saves it (safetensors, config.json, a tokenizer)."""
    import torch
    import transformers

    from conftest import write_tiny_tokenizer

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():  # larger than the init's, so two seeds' greedy tokens differ
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(path)
    write_tiny_tokenizer(path, 96)
    return path


def _engine_on(checkpoint):
    from model.checkpoint import load_config, load_params

    cfg = load_config(checkpoint)
    runner = ModelRunner(cfg, load_params(checkpoint, cfg), max_batch_size=4, session_len=128, max_prefill_chunk=32,
                         block_size=16)
    engine = Engine(runner, Tokenizer.from_dir(checkpoint))
    engine.checkpoint = checkpoint
    engine.start()
    return engine


def test_update_from_disk_equals_a_fresh_server_on_those_files(tmp_path):
    from model.convert import convert
    from model.convert.update import UpdateError

    a, b = _hf_llama(tmp_path / "hf-a", 0), _hf_llama(tmp_path / "hf-b", 1)
    engine, fresh = _engine_on(convert(a, tmp_path / "a", progress=False)), None
    try:
        ids = [[int(x) for x in np.random.default_rng(i).integers(3, 96, 12)] for i in range(3)]
        old = tokens(engine, ids)
        fresh = _engine_on(convert(b, tmp_path / "b", progress=False))
        want = tokens(fresh, ids)
        assert want != old
        assert engine.update_weights_from_path(str(b)) == "1"  # a Hugging Face directory, read in memory
        assert tokens(engine, ids) == want and tokens(engine, ids, SEEDED) == tokens(fresh, ids, SEEDED)
        assert engine.update_weights_from_path(str(tmp_path / "a"), "xlaserve", version="a") == "a"  # converted
        assert tokens(engine, ids) == old
        with pytest.raises(UpdateError, match="no such file"):
            engine.update_weights_from_path(str(tmp_path / "nothing"))
        with pytest.raises(UpdateError, match="load_format 'pt'"):
            engine.update_weights_from_path(str(b), "pt")
        deeper = _hf_llama(tmp_path / "hf-3", 2, layers=3)
        with pytest.raises(UpdateError, match="another architecture: num_layers is 3, the served model's is 2"):
            engine.update_weights_from_path(str(deeper))
        assert engine.weight_version == "a" and tokens(engine, ids) == old
    finally:
        engine.stop()
        if fresh is not None:
            fresh.stop()


# -- the routes ----------------------------------------------------------------------------------


def _client(engine, **settings):
    from litestar.testing import TestClient

    from service.app import ServerSettings, State, create_app

    return TestClient(create_app(State(ServerSettings(model_name="tiny", **settings), engine)))


CHAT = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
        "messages": [{"role": "user", "content": "hello there"}]}


def test_routes_are_off_without_their_flags(cfg, tokenizer):
    engine = make_engine(cfg, tokenizer, weights(cfg, 0))
    try:
        with _client(engine) as c:
            for method, path, flag in [("post", "/sleep", "--enable-sleep-mode"),
                                       ("post", "/wakeup", "--enable-sleep-mode"),
                                       ("get", "/is_sleeping", "--enable-sleep-mode"),
                                       ("post", "/pause", "--enable-weight-updates"),
                                       ("post", "/resume", "--enable-weight-updates")]:
                r = getattr(c, method)(path)
                assert r.status_code == 404 and flag in r.json()["error"]["message"]
            r = c.post("/update_weights", json={"model_path": "/x"})
            assert r.status_code == 404 and "--enable-weight-updates" in r.json()["error"]["message"]
            assert not engine.is_sleeping and not engine.paused
    finally:
        engine.stop()


def test_sleep_wake_and_update_over_http(cfg, tokenizer, tmp_path):
    from model.convert.build import save_checkpoint

    b = weights(cfg, 1)
    save_checkpoint(tmp_path / "b", cfg, jax.tree.map(np.asarray, b), source="test")
    small = ModelConfig(**{**cfg.to_json(), "num_layers": 1})
    save_checkpoint(tmp_path / "other", small, jax.tree.map(np.asarray, weights(small, 0)), source="test")
    engine = make_engine(cfg, tokenizer, weights(cfg, 0))
    fresh = make_engine(cfg, tokenizer, b)
    try:
        with _client(fresh) as c:
            want_b = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["token_ids"]
        with _client(engine, sleep_mode=True, weight_updates=True) as c:
            before = c.post("/v1/chat/completions", json=CHAT).json()
            assert before["choices"][0]["weight_version"] == "0"
            assert c.get("/v1/models").json()["data"][0]["weight_version"] == "0"
            r = c.post("/sleep?level=1")
            assert r.status_code == 200 and r.json() == {"is_sleeping": True, "level": 1, "aborted": 0}
            assert c.get("/health").json() == {"status": "sleeping"}
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "sleeping"
            assert c.post("/sleep?level=3").status_code == 400
            assert c.post("/wakeup?tags=weights&tags=gpu").json()["error"]["param"] == "tags"
            assert c.post("/wakeup?tags=weights&tags=kv_cache").json()["is_sleeping"] is False
            assert c.get("/is_sleeping").json()["is_sleeping"] is False
            assert c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["token_ids"] == \
                before["choices"][0]["token_ids"]
            # Bad updates: 400 naming the field, and the old weights keep serving.
            for body, param, words in [({"model_path": str(tmp_path / "nothing")}, "model_path", "no such file"),
                                       ({"model_path": str(tmp_path / "b"), "load_format": "pt"}, "load_format",
                                        "load_format 'pt'"),
                                       ({"model_path": str(tmp_path / "other")}, "model_path",
                                        "num_layers is 1"),
                                       ({"model_path": str(tmp_path / "b"), "flush_cache": False}, "flush_cache",
                                        "unknown field")]:
                r = c.post("/update_weights", json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param and \
                    words in r.json()["error"]["message"], r.json()
            r = c.post("/update_weights", json={"model_path": str(tmp_path / "b"), "weight_version": "v-b"})
            assert r.status_code == 200 and r.json()["weight_version"] == "v-b"
            assert c.get("/get_weight_version").json() == {"weight_version": "v-b"}
            after = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
            assert after["token_ids"] == want_b and after["weight_version"] == "v-b"
    finally:
        engine.stop()
        fresh.stop()


def test_token_ids_in_and_out_and_abort_by_request_id(cfg, tokenizer):
    engine = make_engine(cfg, tokenizer, weights(cfg, 0))
    try:
        with _client(engine, weight_updates=True) as c:
            r = c.post("/v1/chat/completions", json=CHAT).json()
            prompt = c.post("/v1/tokenize", json={"messages": CHAT["messages"]}).json()["tokens"]
            assert r["prompt_token_ids"] == prompt and len(r["choices"][0]["token_ids"]) == 6
            # The prompt as token ids gives the same answer; streamed, the same ids chunk by chunk.
            by_ids = {**CHAT, "messages": [], "prompt_token_ids": prompt}
            assert c.post("/v1/chat/completions", json=by_ids).json()["choices"][0]["token_ids"] == \
                r["choices"][0]["token_ids"]
            both = {**CHAT, "prompt_token_ids": prompt}
            assert c.post("/v1/chat/completions", json=both).json()["error"]["param"] == "prompt_token_ids"
            with c.stream("POST", "/v1/chat/completions", json={**by_ids, "stream": True}) as s:
                chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            assert chunks[0]["prompt_token_ids"] == prompt
            assert [t for ch in chunks for c_ in ch["choices"] for t in c_.get("token_ids", [])] == \
                r["choices"][0]["token_ids"]
            assert chunks[-1]["choices"][0]["weight_version"] == "0"
            # Completions: each choice its prompt's ids and its own.
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": [prompt, prompt[:5]], "max_tokens": 4,
                                                "temperature": 0, "return_token_ids": True, "logprobs": 1}).json()
            assert [ch["prompt_token_ids"] for ch in r["choices"]] == [prompt, prompt[:5]]
            for ch in r["choices"]:
                assert [tokenizer.decode([t]) for t in ch["token_ids"]] == ch["logprobs"]["tokens"]
            # Aborted by the id the request gave: every choice of it ends with "abort" (here while
            # they wait, admission paused).
            assert c.post("/pause").json() == {"is_paused": True, "aborted": 0, "waiting": 0}
            answer = {}
            long = {**CHAT, "max_tokens": 90, "n": 2, "request_id": "rollout-7"}
            waiter = threading.Thread(target=lambda: answer.update(c.post("/v1/chat/completions", json=long).json()))
            waiter.start()
            while engine.waiting.count < 2:
                time.sleep(0.01)
            assert c.post("/abort_request", json={"rid": "rollout-7"}).json() == {"aborted": 2}
            waiter.join()
            assert answer["id"] == "rollout-7"
            assert [ch["finish_reason"] for ch in answer["choices"]] == ["abort", "abort"]
            assert c.post("/resume").json()["is_paused"] is False
            assert c.post("/abort_request", json={}).json()["error"]["param"] == "rid"
    finally:
        engine.stop()


def test_rollout_example_reports_the_logprobs_a_forward_pass_gives(default_checkpoint, capsys):
    """tools/rollout_example.py on the bundled model: seeded rollouts, an in-process update per
    step, every reported logprob within 2e-3 of a plain forward pass of the weights then."""
    from tools import rollout_example

    assert rollout_example.main(["--steps", "2", "--rollouts", "2", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "step 1: weights step-1" in out and out.strip().splitlines()[-1].startswith("ok")
