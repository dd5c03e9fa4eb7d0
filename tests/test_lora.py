"""LoRA adapters: PEFT's adapters on tiny random models against transformers with PEFT applied,
on both device paths and at --tp 2; mixed batches, the prefix cache keyed by adapter, loading
and unloading over HTTP, bad input, and the bundled model served with an adapter."""

import asyncio
import dataclasses
import json
import re
import subprocess
import sys

import httpx
import numpy as np
import peft
import pytest
import torch
import transformers
from litestar.testing import TestClient
from safetensors.numpy import save_file

from conftest import ROOT, start_server
from model import lora
from model.backends.cpu import available as kernels_available
from model.backends.xla import Xla
from model.checkpoint import load_config, load_params
from model.convert import convert
from model.tokenizer import Tokenizer
from service.app import ServerSettings, State, create_app
from service.engine import Engine
from service.engine.config import EngineConfig, EngineConfigError
from service.engine.runner import ModelRunner, compile_count
from service.models import build_runner, read_adapters
from service.params import SamplingParams
from test_parity import BASE, make_hf_checkpoint

FAMILIES = {"llama": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
            "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16))}
# Two adapters of different ranks and targets: all seven projections, and q/v/down with rsLoRA.
ADAPTERS = {"a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]),
            "b": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])}
PROMPT = [int(x) for x in np.random.default_rng(3).integers(3, BASE["vocab_size"], 40)]
TOKENS = 32


def _hf_greedy(model, prompt=PROMPT):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


_BUILT: dict = {}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny HF model converted, two PEFT adapters saved beside it, and what transformers
    generates greedily with none, a and b applied."""
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """``family``'s Llama, for the checks one family shows as well as two."""
    return _built("llama", tmp_path_factory)


def _built(name, tmp_path_factory):
    if name not in _BUILT:
        _BUILT[name] = _build(name, tmp_path_factory)
    return _BUILT[name]


def _build(name, tmp_path_factory):
    root = tmp_path_factory.mktemp(name)
    config_cls, overrides = FAMILIES[name]
    model = make_hf_checkpoint(root / "hf", config_cls, overrides)
    want = {None: _hf_greedy(model)}
    for i, (name, conf) in enumerate(ADAPTERS.items()):
        base = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
        torch.manual_seed(10 + i)
        tuned = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **conf))
        with torch.no_grad():  # updates as large as a fine-tune's, so a wrong layout shows
            for n, p in tuned.named_parameters():
                if "lora_" in n:
                    p.mul_(4.0)
        tuned.save_pretrained(root / name)
        want[name] = _hf_greedy(tuned.eval())
    assert len({tuple(v) for v in want.values()}) == 3  # each adapter changes the answer
    convert(root / "hf", root / "converted", progress=False)
    return root, want


def _engine(root, backend=None, tp=1, **config):
    config = EngineConfig(max_batch_size=4, session_len=128, block_size=16, num_blocks=64, tp=tp,
                          adapters=tuple((n, str(root / n)) for n in ADAPTERS), **config)
    if tp > 1:
        runner, tokenizer = build_runner(root / "converted", config)
    else:
        cfg = load_config(root / "converted")
        spec, adapters = read_adapters(config, cfg)
        runner = ModelRunner(cfg, load_params(root / "converted", cfg), 4, 128, max_prefill_chunk=32, block_size=16,
                             num_blocks=64, backend=backend, adapters=spec)
        for slot, a in enumerate(adapters):
            runner.load_adapter(slot, a)
        tokenizer = Tokenizer.from_dir(root / "converted")
    engine = Engine(runner, tokenizer)
    engine.start()
    return engine


async def _generate(engine, adapter, params=SamplingParams(temperature=0.0), prompt=PROMPT):
    params = dataclasses.replace(params, max_tokens=TOKENS, ignore_eos=True, adapter=adapter)
    toks, last = [], None
    async for out in engine.generate(prompt, params):
        toks += out.token_ids
        last = out
    return toks, last


PATHS = ["xla", "kernels", "tp2"]


@pytest.mark.parametrize("path", PATHS)
def test_adapters_match_transformers_alone_and_mixed(family, path):
    """Greedy 32 tokens of the base and of each adapter equal transformers with PEFT's adapter
    applied, alone and in one batch {base, a, b, a}; seeded samples are the same alone and mixed."""
    root, want = family
    if path == "kernels" and not kernels_available():
        pytest.skip("the CPU kernels do not build here")
    engine = _engine(root, backend=Xla() if path == "xla" else None, tp=2 if path == "tp2" else 1)
    try:
        async def main():
            alone = {a: (await _generate(engine, a))[0] for a in want}
            mixed = await asyncio.gather(*(_generate(engine, a) for a in (None, "a", "b", "a")))
            seeded = SamplingParams(temperature=1.0, seed=7)
            seeded_alone = {a: (await _generate(engine, a, seeded))[0] for a in want}
            seeded_mixed = await asyncio.gather(*(_generate(engine, a, seeded) for a in (None, "a", "b", "a")))
            return alone, [m[0] for m in mixed], seeded_alone, [m[0] for m in seeded_mixed]

        alone, mixed, seeded_alone, seeded_mixed = asyncio.run(main())
    finally:
        engine.stop()
    assert alone == want
    assert mixed == [want[None], want["a"], want["b"], want["a"]]
    assert seeded_mixed == [seeded_alone[None], seeded_alone["a"], seeded_alone["b"], seeded_alone["a"]]
    assert len({tuple(v) for v in seeded_alone.values()}) == 3


def test_prefix_cache_is_keyed_by_adapter(llama):
    root, _ = llama
    engine = _engine(root, backend=Xla())
    try:
        async def main():
            return [(await _generate(engine, a))[1].cached_tokens for a in ("a", "b", None, "a", "b")]

        cached = asyncio.run(main())
    finally:
        engine.stop()
    # 40 prompt tokens: two full blocks of 16 are shared by the same adapter's second turn only.
    assert cached == [0, 0, 0, 32, 32]


def test_no_compiles_after_warmup_when_adapters_join_and_leave(llama):
    root, want = llama
    engine = _engine(root, backend=Xla())
    engine.runner.warmup(verify_tokens=0)
    before = compile_count()
    try:
        async def main():
            for mix in ((None,), ("a", None), ("a", "b", None, "b"), ("b",), (None, None)):
                await asyncio.gather(*(_generate(engine, a) for a in mix))

        asyncio.run(main())
    finally:
        engine.stop()
    assert compile_count() == before


def test_bank_writes_only_its_slot(llama):
    """Loading into one slot leaves the others' columns as they were (a running request's
    adapter never changes under it)."""
    root, _ = llama
    cfg = load_config(root / "converted")
    a = lora.load_adapter(root / "a", "a", cfg)
    b = lora.load_adapter(root / "b", "b", cfg)
    spec = lora.BankSpec(3, 8, ("q", "k", "v", "o", "gate", "up", "down"))
    bank = lora.write_slot(spec.empty(cfg), 0, 8, spec.columns(a, cfg))
    first = np.asarray(bank[0]["q"].a).copy()
    bank = lora.write_slot(bank, 2, 8, spec.columns(b, cfg))
    assert np.array_equal(np.asarray(bank[0]["q"].a)[:, :8], first[:, :8])
    assert np.array_equal(np.asarray(bank[0]["q"].a)[:, 16:20], b.weights[(0, "q")][0])
    assert not np.asarray(bank[0]["q"].a)[:, 8:16].any()


# -- bad adapters ------------------------------------------------------------------------------


def _write_adapter(path, conf, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **conf}))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _pair(module, r, fan_in, fan_out):
    rng = np.random.default_rng(0)
    return {f"base_model.model.{module}.lora_A.weight": rng.standard_normal((r, fan_in)).astype(np.float32),
            f"base_model.model.{module}.lora_B.weight": rng.standard_normal((fan_out, r)).astype(np.float32)}


def test_bad_adapters_are_refused_by_name(llama, tmp_path):
    root, _ = llama
    cfg = load_config(root / "converted")
    d = cfg.hidden_size
    q = "model.layers.0.self_attn.q_proj"
    cases = {
        "missing": (None, "no such adapter directory"),
        "dora": (({"use_dora": True}, _pair(q, 4, d, d)), "DoRA"),
        "saved": (({"modules_to_save": ["lm_head"]}, _pair(q, 4, d, d)), "modules_to_save"),
        "bias": (({"bias": "all"}, _pair(q, 4, d, d)), "bias='all'"),
        "embed": (({}, _pair("model.embed_tokens", 4, d, d)), "embedding or lm_head"),
        "foreign": (({}, _pair("model.layers.0.self_attn.c_attn", 4, d, d)), "'model.layers.0.self_attn.c_attn'"),
        "shape": (({}, _pair(q, 4, d + 1, d)), "does not fit"),
        "rank": (({"r": 32}, _pair(q, 32, d, cfg.num_heads * cfg.head_dim)), "above --max-lora-rank 16"),
    }
    for name, (files, message) in cases.items():
        if files is not None:
            _write_adapter(tmp_path / name, *files)
        with pytest.raises(lora.AdapterError, match=re.escape(message)):
            lora.load_adapter(tmp_path / name, name, cfg, max_rank=16)
    with pytest.raises(EngineConfigError, match=r"--adapters x=.*missing.*no such adapter directory"):
        read_adapters(EngineConfig(adapters=(("x", str(tmp_path / "missing")),)), cfg)


def test_cli_refuses_a_bad_adapter_in_one_line(llama, tmp_path):
    root, _ = llama
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_server", str(root / "converted"),
                        "--adapters", f"x={tmp_path / 'nothing'}", "--session-len", "64", "--max-batch-size", "2",
                        "--log-level", "ERROR"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "--adapters x=" in lines[0] and "no such adapter directory" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "api_server", str(root / "converted"),
                        "--adapters", "no-path"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "NAME=PATH" in r.stderr


# -- HTTP ------------------------------------------------------------------------------------


def test_routes_models_and_runtime_loading(llama, tmp_path):
    root, want = llama
    engine = _engine(root, backend=Xla(), max_loras=3, runtime_lora=True)
    app = create_app(State(ServerSettings(model_name="base", runtime_lora=True), engine))
    chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    try:
        with TestClient(app) as c:
            cards = c.get("/v1/models").json()["data"]
            assert [(m["id"], m.get("parent")) for m in cards] == [("base", None), ("a", "base"), ("b", "base")]
            assert c.get("/v1/models/a").json()["parent"] == "base"
            got = c.post("/v1/completions", json=dict(model="a", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                                      ignore_eos=True)).json()
            assert got["model"] == "a"
            for model in ("a", "b", "base"):
                assert c.post("/v1/chat/completions", json={**chat, "model": model}).json()["model"] == model
            # every generation route takes the adapter by model
            r = c.post("/v1/responses", json={"model": "b", "input": "hi", "max_output_tokens": 4})
            assert r.status_code == 200 and r.json()["model"] == "b"
            r = c.post("/v1/messages", json={"model": "b", "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["model"] == "b"
            r = c.post("/v1/chat/completions", json={**chat, "model": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            # a third adapter fills the last slot; a fourth is refused naming --max-loras
            assert c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(root / "a")}).status_code == 200
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(root / "a")})
            assert r.status_code == 400 and "--max-loras 3" in r.json()["error"]["message"]
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "a")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": str(tmp_path / "none")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
            # a2 is a's weights under another name: the same tokens
            same = c.post("/v1/completions", json=dict(model="a2", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                                       ignore_eos=True)).json()
            assert same["choices"][0]["text"] == got["choices"][0]["text"]
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
            assert c.post("/v1/chat/completions", json={**chat, "model": "a"}).status_code == 404
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
            assert "a" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
            # the freed slot takes a new adapter
            assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "a")}).status_code == 200
            again = c.post("/v1/completions", json=dict(model="a", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                                        ignore_eos=True)).json()
            assert again["choices"][0]["text"] == got["choices"][0]["text"]
            metrics = c.get("/metrics").text
            assert "xlaserve_lora_adapters_loaded 3.0" in metrics
            assert 'xlaserve_lora_requests_total{adapter="a"}' in metrics
    finally:
        engine.stop()
    with TestClient(create_app(State(ServerSettings(model_name="base"), engine))) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": str(root / "a")})
        assert r.status_code == 404 and "--enable-runtime-lora" in r.json()["error"]["message"]
        # an embedding server's base model embeds; an adapter's name is refused there, naming it
        c.app.state.xla.settings.embedding = ("last", True)
        r = c.post("/v1/embeddings", json={"model": "a", "input": "x"})
        assert r.status_code == 400 and "LoRA adapter" in r.json()["error"]["message"], r.json()


def test_unloading_never_changes_a_running_request(llama):
    """An adapter unloaded while its request runs, and a new one loaded at once: the running
    request finishes with its own adapter's tokens (the new one takes another slot)."""
    root, want = llama
    engine = _engine(root, backend=Xla(), max_loras=2, runtime_lora=True)
    cfg = engine.runner.cfg
    try:
        async def main():
            task = asyncio.create_task(_generate(engine, "a"))
            await asyncio.sleep(0)
            while not engine.table.running:
                await asyncio.sleep(0.001)
            engine.adapters.remove("a")
            with pytest.raises(Exception, match="adapter slots are taken"):
                await asyncio.wrap_future(engine.load_adapter(lora.load_adapter(root / "b", "c", cfg)))
            return (await task)[0]

        toks = asyncio.run(main())
    finally:
        engine.stop()
    assert toks == want["a"]


def test_interactive_sessions_keep_their_adapter(llama):
    root, _ = llama
    engine = _engine(root, backend=Xla())
    app = create_app(State(ServerSettings(model_name="base"), engine))
    turn = dict(session_id=5, interactive_mode=True, request_output_len=4, temperature=0)
    try:
        with TestClient(app) as c:
            first = c.post("/v1/chat/interactive", json={**turn, "prompt": "one", "adapter_name": "b"}).json()
            assert first["finish_reason"] in ("stop", "length")
            assert engine.table.session_adapter(5) == "b"
            c.post("/v1/chat/interactive", json={**turn, "prompt": "two"})
            assert engine.table.session_adapter(5) == "b"
            r = c.post("/v1/chat/interactive", json={**turn, "prompt": "x", "adapter_name": "nope"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_name"
    finally:
        engine.stop()


# -- the bundled model ---------------------------------------------------------------------------


def _readme_lora_snippet():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## LoRA adapters"):]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_bundled_model_serves_an_adapter_and_the_readme_snippet_runs(default_checkpoint, tmp_path):
    """A random rank-8 adapter over every projection of the bundled model: the README's openai
    snippet picks it by model and gets its answer; the base model's answer is unchanged by it."""
    cfg = load_config(default_checkpoint)
    rng = np.random.default_rng(0)
    tensors = {}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(cfg.num_layers):
        for t, module in names.items():
            fan_in, fan_out = lora.target_sizes(cfg, t)
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((8, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.05 * rng.standard_normal((fan_out, 8))).astype(np.float32)
    _write_adapter(tmp_path / "sql-lora", {"r": 8, "lora_alpha": 16, "target_modules": list(names.values())}, tensors)
    # A small server: warm-up compiles each shape twice (with and without adapter rows).
    proc, url = start_server(tmp_path / "server.log", "--adapters", f"sql-lora={tmp_path / 'sql-lora'}",
                             "--session-len", "128", "--max-batch-size", "2")
    try:
        chat = dict(messages=[{"role": "user", "content": "Name three colours."}], max_tokens=16, temperature=0)
        base = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()
        tuned = httpx.post(url + "/v1/chat/completions", json={**chat, "model": "sql-lora"}, timeout=120).json()
        assert tuned["model"] == "sql-lora"
        assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
        code = _readme_lora_snippet().replace("http://localhost:23333", url)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == tuned["choices"][0]["message"]["content"].strip().splitlines()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# -- what composes with adapters ---------------------------------------------------------------


def test_speculation_and_preemption_keep_each_adapters_tokens(family):
    """n-gram drafts are checked by the adapter's model, and a pool too small for every
    sequence preempts and recomputes them: the tokens stay transformers'."""
    from service.engine.speculate import Speculation

    root, want = family
    cfg = load_config(root / "converted")
    config = EngineConfig(adapters=tuple((n, str(root / n)) for n in ADAPTERS))
    spec, adapters = read_adapters(config, cfg)
    # 10 blocks of 16: four sequences of 72 positions need 20, so some are preempted.
    runner = ModelRunner(cfg, load_params(root / "converted", cfg), 4, 128, max_prefill_chunk=32, block_size=16,
                         num_blocks=10, backend=Xla(), adapters=spec)
    for slot, a in enumerate(adapters):
        runner.load_adapter(slot, a)
    engine = Engine(runner, Tokenizer.from_dir(root / "converted"), speculation=Speculation("ngram", 4, 4))
    engine.start()
    try:
        async def main():
            return [t for t, _ in await asyncio.gather(*(_generate(engine, a) for a in (None, "a", "b", "a")))]

        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == [want[None], want["a"], want["b"], want["a"]]
    assert engine.scheduler.preemptions > 0
    assert engine.stats.spec_drafted > 0


def test_data_parallel_replicas_serve_adapters(llama):
    root, want = llama
    config = EngineConfig(max_batch_size=4, session_len=128, block_size=16, num_blocks=32, dp=2,
                          adapters=tuple((n, str(root / n)) for n in ADAPTERS))
    runner, tokenizer = build_runner(root / "converted", config)
    engine = Engine(runner, tokenizer)
    engine.start()
    try:
        async def main():
            return [t for t, _ in await asyncio.gather(*(_generate(engine, a) for a in ("a", "b", None, "b")))]

        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == [want["a"], want["b"], want[None], want["b"]]


def _converted_adapter_logits(tmp_path, tokens, want, slots: int, slot: int, rank: int):
    """Convert tmp_path/hf, put the adapter tmp_path/ad in slot ``slot`` of a bank, and check
    the forward pass's logits with every token on it against ``want`` (1e-4). Returns the adapter."""
    import jax.numpy as jnp

    from model import transformer

    convert(tmp_path / "hf", tmp_path / "conv", progress=False)
    cfg = load_config(tmp_path / "conv")
    adapter = lora.load_adapter(tmp_path / "ad", "a", cfg)
    spec = lora.BankSpec(slots, rank, lora.ATTENTION + lora.MLP)
    bank = lora.write_slot(spec.empty(cfg), slot, rank, spec.columns(adapter, cfg))
    params = Xla().prepare(load_params(tmp_path / "conv", cfg), cfg)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    cache = transformer.init_cache(cfg, 1, tokens.shape[1])
    select = lora.select(jnp.full(tokens.shape, slot, jnp.int32), slots, rank, jnp.float32)
    hidden, _ = transformer.forward(params, cfg, jnp.asarray(tokens), positions, cache, span=tokens.shape[1],
                                    lora=(bank, select))
    assert np.abs(np.asarray(transformer.logits(params, cfg, hidden)) - want).max() <= 1e-4
    return adapter


def test_packed_projections_take_their_adapters(tmp_path):
    """Phi-3's packed qkv_proj and gate_up_proj against transformers with PEFT (logits), and
    InternLM2's grouped wqkv laid out as the converter lays out the merged weight."""

    from model.families import internlm2

    model = make_hf_checkpoint(tmp_path / "hf", transformers.Phi3Config,
                               dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    torch.manual_seed(1)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                       target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                       "down_proj"]))
    tuned.save_pretrained(tmp_path / "ad")
    tokens = np.asarray([PROMPT])
    with torch.no_grad():
        want = tuned(torch.tensor(tokens)).logits.numpy()
    adapter = _converted_adapter_logits(tmp_path, tokens, want, slots=2, slot=1, rank=8)
    assert adapter.targets == {"q", "k", "v", "o", "gate", "up", "down"}

    # InternLM2 (no transformers class): W + B·A·scale of wqkv, converted, equals the base's
    # converted q/k/v plus the adapter's A·B as we lay it out.
    from model.config import ModelConfig

    icfg = ModelConfig(family="internlm2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8 * 8, 32)).astype(np.float32)  # (G + 2) * K * H rows
    a, b = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    _write_adapter(tmp_path / "intern", {"r": 4, "lora_alpha": 8},
                   {"base_model.model.model.layers.0.attention.wqkv.lora_A.weight": a,
                    "base_model.model.model.layers.0.attention.wqkv.lora_B.weight": b})
    got = lora.load_adapter(tmp_path / "intern", "i", icfg).weights
    m = re.fullmatch(internlm2.LAYER + r"attention\.wqkv\.weight", "model.layers.0.attention.wqkv.weight")
    merged = dict((p[2], x) for p, x in internlm2.wqkv(w + 2.0 * b @ a, icfg, m))
    plain = dict((p[2], x) for p, x in internlm2.wqkv(w, icfg, m))
    for name, target in (("wq", "q"), ("wk", "k"), ("wv", "v")):
        la, lb = got[(0, target)]
        np.testing.assert_allclose(plain[name].reshape(32, -1) + la @ lb, merged[name].reshape(32, -1), atol=1e-4)


def test_gguf_base_with_an_adapter_matches_transformers(default_checkpoint, tmp_path):
    """The bundled model is converted from its GGUF (q/k un-permuted): a random adapter over
    q/k/v/o gives transformers' greedy tokens (its GGUF loader, PEFT applying the adapter)."""
    from model.chat_template import render
    from service.models import default_gguf

    cfg = load_config(default_checkpoint)
    rng = np.random.default_rng(1)
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    tensors = {}
    for i in range(cfg.num_layers):
        for t, module in names.items():
            fan_in, fan_out = lora.target_sizes(cfg, t)
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((8, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.05 * rng.standard_normal((fan_out, 8))).astype(np.float32)
    _write_adapter(tmp_path / "ad", {"r": 8, "lora_alpha": 16, "target_modules": list(names.values()),
                                     "task_type": "CAUSAL_LM"}, tensors)
    path = default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    tok = Tokenizer.from_dir(default_checkpoint)
    ids = tok.encode(render(tok.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                            bos_token=tok.bos_token), add_special_tokens=False)
    with torch.no_grad():
        want = tuned.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              min_new_tokens=16, pad_token_id=0)[0, len(ids):].tolist()
    config = EngineConfig(adapters=(("ad", str(tmp_path / "ad")),))
    spec, adapters = read_adapters(config, cfg)
    runner = ModelRunner(cfg, load_params(default_checkpoint, cfg), 2, 128, adapters=spec)
    runner.load_adapter(0, adapters[0])
    engine = Engine(runner, tok)
    engine.start()
    try:
        got = asyncio.run(_generate(engine, "ad", SamplingParams(temperature=0.0, max_tokens=16), ids))[0]
    finally:
        engine.stop()
    assert got[:16] == want


def test_tp_adds_no_collective_for_adapters():
    """Under --tp 2, A and B are split with the projection they feed: o/down's partial
    products ride in the base product's all-reduce, so a step with adapters has as many
    collectives as one without."""
    from model.config import ModelConfig
    from model.weights import init_params
    from service.engine import direct
    from service.engine.step_io import DecodeInputs
    from sharding import make_mesh, plan_for

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    runner = ModelRunner(cfg, init_params(cfg), max_batch_size=4, session_len=64,
                         plan=plan_for(cfg, make_mesh(2, 1), slots=4),
                         adapters=lora.BankSpec(2, 8, lora.ATTENTION + lora.MLP))
    z = np.zeros((4,), np.int32)
    counts = []
    for adapters in (None, z):
        inputs = DecodeInputs(z, z, z, np.arange(4, dtype=np.int32), adapters, runner.shapes.allowed(4, [], None),
                              np.int32(4), runner.shapes.spans[0])
        hlo = runner._decode.lower(runner.params, runner.cache, runner.sampling, runner.rope, runner.eos_mask,
                                   direct.identity_tables(runner), runner.bank, inputs).compile().as_text()
        counts.append({op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ("all-reduce", "all-gather")})
    assert counts[0]["all-reduce"] > 0 and counts[1] == counts[0], counts


def test_rank_and_alpha_patterns_scale_each_module(llama, tmp_path):
    """Per-module ranks (rank_pattern: read from the shapes) and alphas (alpha_pattern), and
    rsLoRA's alpha / sqrt(r): B comes out scaled by each module's own."""
    root, _ = llama
    cfg = load_config(root / "converted")
    d, nh = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"
    tensors = {**_pair(q, 4, d, nh), **_pair(o, 2, nh, d)}
    _write_adapter(tmp_path / "p", {"r": 4, "lora_alpha": 8, "rank_pattern": {"o_proj": 2},
                                    "alpha_pattern": {"o_proj": 6}}, tensors)
    _write_adapter(tmp_path / "rs", {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"o_proj": 2},
                                     "alpha_pattern": {"o_proj": 6}}, tensors)
    plain, rs = lora.load_adapter(tmp_path / "p", "p", cfg), lora.load_adapter(tmp_path / "rs", "rs", cfg)
    b_q, b_o = tensors[f"base_model.model.{q}.lora_B.weight"], tensors[f"base_model.model.{o}.lora_B.weight"]
    np.testing.assert_allclose(plain.weights[(0, "q")][1], (b_q * 8 / 4).T, rtol=1e-6)
    np.testing.assert_allclose(plain.weights[(1, "o")][1], (b_o * 6 / 2).T, rtol=1e-6)
    np.testing.assert_allclose(rs.weights[(1, "o")][1], (b_o * 6 / np.sqrt(2)).T, rtol=1e-6)
    assert plain.rank == 4 and set(plain.weights) == {(0, "q"), (1, "o")}


@pytest.mark.parametrize("case, targets", [("qwen3_moe", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                           ("gemma2", ["q_proj", "o_proj", "gate_proj", "down_proj"])])
def test_other_families_take_their_adapters(tmp_path, case, targets):
    """A mixture of experts' attention (its experts are no target) and Gemma 2's soft-capped,
    post-normed layers, with an adapter: logits equal transformers with PEFT's."""

    from test_parity import CASES

    config_cls, overrides = CASES[case]
    model = make_hf_checkpoint(tmp_path / "hf", config_cls, overrides)
    torch.manual_seed(2)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=targets))
    tuned.save_pretrained(tmp_path / "ad")
    tokens = np.asarray([PROMPT])
    with torch.no_grad():
        want = tuned(torch.tensor(tokens)).logits.numpy()
        with tuned.disable_adapter():
            base = tuned(torch.tensor(tokens)).logits.numpy()
    assert np.abs(base - want).max() > 1e-2  # the adapter changes the answer
    _converted_adapter_logits(tmp_path, tokens, want, slots=1, slot=0, rank=4)
