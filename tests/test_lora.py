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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny HF model converted, two PEFT adapters saved beside it, and what transformers
    generates greedily with none, a and b applied."""
    root = tmp_path_factory.mktemp(request.param)
    config_cls, overrides = FAMILIES[request.param]
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


def test_prefix_cache_is_keyed_by_adapter(family):
    root, _ = family
    engine = _engine(root, backend=Xla())
    try:
        async def main():
            return [(await _generate(engine, a))[1].cached_tokens for a in ("a", "b", None, "a", "b")]

        cached = asyncio.run(main())
    finally:
        engine.stop()
    # 40 prompt tokens: two full blocks of 16 are shared by the same adapter's second turn only.
    assert cached == [0, 0, 0, 32, 32]


def test_no_compiles_after_warmup_when_adapters_join_and_leave(family):
    root, want = family
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


def test_bank_writes_only_its_slot(family):
    """Loading into one slot leaves the others' columns as they were (a running request's
    adapter never changes under it)."""
    root, _ = family
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


def test_bad_adapters_are_refused_by_name(family, tmp_path):
    root, _ = family
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


def test_cli_refuses_a_bad_adapter_in_one_line(family, tmp_path):
    root, _ = family
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


def test_routes_models_and_runtime_loading(family, tmp_path):
    root, want = family
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
                assert c.post("/v1/chat/completions", json={**chat, "model": model}).status_code == 200
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
            r = c.post("/v1/embeddings", json={"model": "a", "input": "x"})
            assert r.status_code == 400
            metrics = c.get("/metrics").text
            assert "xlaserve_lora_adapters_loaded 3.0" in metrics
            assert 'xlaserve_lora_requests_total{adapter="a"}' in metrics
    finally:
        engine.stop()
    with TestClient(create_app(State(ServerSettings(model_name="base"), engine))) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": str(root / "a")})
        assert r.status_code == 404 and "--enable-runtime-lora" in r.json()["error"]["message"]


def test_unloading_never_changes_a_running_request(family):
    """An adapter unloaded while its request runs, and a new one loaded at once: the running
    request finishes with its own adapter's tokens (the new one takes another slot)."""
    root, want = family
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


def test_interactive_sessions_keep_their_adapter(family):
    root, _ = family
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
    proc, url = start_server(tmp_path / "server.log", "--adapters", f"sql-lora={tmp_path / 'sql-lora'}")
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
