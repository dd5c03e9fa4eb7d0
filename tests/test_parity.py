"""Parity against transformers on tiny random configs (fp32, max abs logit diff <= 1e-4),
through the real converter: HF dir -> converted dir -> load -> logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from conftest import write_tiny_tokenizer
from model.checkpoint import load_config, load_params
from model import transformer
from model.backends import cpu as cpu_kernels
from model.transformer import full_logits
from model.convert import convert

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "llama_mha": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama_tied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    # head_dim 32 apart from hidden / heads = 16; q/k norms before rope
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "qwen3_tied": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                                  tie_word_embeddings=True)),
    # q/k/v in one qkv_proj, gate/up in one gate_up_proj
    "phi3": (transformers.Phi3Config, dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    # longrope past its original 16 positions (the test's 40 take the long factors)
    "phi3_longrope": (transformers.Phi3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.1, 5.0, 6.0],
                         "long_factor": [1.0, 2.0, 4.0, 7.0, 11.0, 16.0, 24.0, 32.0]})),
    # windows shorter than the test's sequences: every layer (Mistral), or layer 1 only
    # (Qwen2's max_window_layers, an older config without layer_types)
    "mistral_window": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                        sliding_window=7)),
    "qwen2_window_layers": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                                           use_sliding_window=True, sliding_window=5,
                                                           max_window_layers=1)),
    # soft-capped scores and logits, alternating sliding (5) and global layers, pre/post norms
    "gemma2": (transformers.Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                               query_pre_attn_scalar=20, sliding_window=5,
                                               attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    # q/k norms, the sliding layers' own rope base, a linearly scaled global rope; 3 layers, one global
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})),
    # 4 experts, 2 per token, renormalised; a window of 6 on every layer
    "mixtral": (transformers.MixtralConfig, dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2, sliding_window=6)),
    # 6 experts of hidden 40, 3 per token, not renormalised; layer 1 dense (mlp_only_layers)
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=40, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1)),
    "qwen3_moe_norm": (transformers.Qwen3MoeConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_experts=5, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1)),
    "smollm2_scaled": (transformers.LlamaConfig, dict(
        hidden_size=144, intermediate_size=384, num_attention_heads=9, num_key_value_heads=3,
        rope_theta=100000.0, tie_word_embeddings=True)),
}


def make_hf_checkpoint(path, config_cls, overrides, seed=0):
    cfg = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norms and biases, so a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model = model.eval().float()
    model.save_pretrained(path)
    write_tiny_tokenizer(path, cfg.vocab_size)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def ours(tmp_path, src, tokens, kernels=False):
    """Our logits through XLA, or (``kernels``) the way one CPU device serves: packed
    weights, native matmul and attention kernels."""
    dst = tmp_path / "converted"
    if not dst.exists():
        convert(src, dst, progress=False)
    cfg = load_config(dst)
    backend = cpu_kernels.CpuKernels() if kernels else transformer.XLA
    params = backend.prepare(load_params(dst, cfg), cfg)
    return np.asarray(full_logits(params, cfg, jnp.asarray(tokens), backend=backend))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    config_cls, overrides = CASES[case]
    src = tmp_path / "hf"
    model = make_hf_checkpoint(src, config_cls, overrides)
    tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], (2, 40))
    want = hf_logits(model, tokens)
    if "experts" in str(model.state_dict().keys()):  # the tokens spread over the experts
        with torch.no_grad():
            routed = model(torch.tensor(tokens), output_router_logits=True).router_logits
        first_choice = {int(e) for layer in routed for e in layer.reshape(-1, layer.shape[-1]).argmax(-1)}
        assert len(first_choice) >= 3, first_choice
    diff = np.abs(ours(tmp_path, src, tokens) - want).max()
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"
    if not cpu_kernels.available():  # the XLA half passed; say the other was not run
        pytest.skip("the CPU kernels do not build here: their half of this check did not run")
    diff = np.abs(ours(tmp_path, src, tokens, kernels=True) - want).max()
    assert diff <= 1e-4, f"{case}, CPU kernels: max abs logit diff {diff}"


@pytest.mark.parametrize("case", ["llama3_rope_scaling", "smollm2_scaled", "qwen3"])
def test_served_steps_rope_table_matches_transformers(tmp_path, case):
    """Serving steps look rope cos/sin up in a table made once (``rope_table``) instead of
    computing them in the step; the logits must still be transformers', scaled rope too."""
    import jax

    from model import layers, transformer

    config_cls, overrides = CASES[case]
    src = tmp_path / "hf"
    model = make_hf_checkpoint(src, config_cls, overrides)
    tokens = np.random.default_rng(2).integers(0, BASE["vocab_size"], (2, 40))
    dst = tmp_path / "converted"
    convert(src, dst, progress=False)
    cfg = load_config(dst)
    params = transformer.prepare(load_params(dst, cfg), cfg)
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    rope = jax.tree.map(jnp.asarray, layers.rope_tables(cfg, 64))
    hidden, _ = jax.jit(lambda p, c: transformer.forward(p, cfg, jnp.asarray(tokens), positions, c, span=40,
                                                         rope=rope, tables=transformer.identity_tables(2, 40)))(
        params, transformer.init_cache(cfg, 2, 40))
    diff = np.abs(np.asarray(transformer.logits(params, cfg, hidden)) - hf_logits(model, tokens)).max()
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"


def test_transformers4_config_style_matches(tmp_path):
    """rope_theta / rope_scaling at the top level (transformers 4) read like rope_parameters."""
    config_cls, overrides = CASES["llama3_rope_scaling"]
    src = tmp_path / "hf"
    model = make_hf_checkpoint(src, config_cls, overrides)
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", overrides["rope_theta"])
    cfg["rope_scaling"] = {k: v for k, v in overrides["rope_scaling"].items()}
    (src / "config.json").write_text(json.dumps(cfg))
    tokens = np.random.default_rng(2).integers(0, BASE["vocab_size"], (1, 40))
    assert np.abs(ours(tmp_path, src, tokens) - hf_logits(model, tokens)).max() <= 1e-4


def test_longrope_takes_short_factors_within_its_original_context(tmp_path):
    """Phi-3's longrope from a transformers 4 config (rope_scaling "type", the original length
    at the top level): a sequence within the original 16 positions takes the short factors
    (and one past them the long, in test_logits_match_transformers); so does a server sized
    within them, and one sized past them the long factors at every position. Factor lists
    that do not fit the head are refused by name."""
    from model.config import UnsupportedConfigError, from_hf_config

    config_cls, overrides = CASES["phi3_longrope"]
    src = tmp_path / "hf"
    model = make_hf_checkpoint(src, config_cls, overrides)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope["rope_theta"], original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    (src / "config.json").write_text(json.dumps(cfg))
    tokens = np.random.default_rng(2).integers(0, BASE["vocab_size"], (1, 12))
    assert np.abs(ours(tmp_path, src, tokens) - hf_logits(model, tokens)).max() <= 1e-4
    ours_cfg = from_hf_config(cfg)
    assert not ours_cfg.uses_long_rope(16) and ours_cfg.uses_long_rope(17)
    with pytest.raises(UnsupportedConfigError, match="long_factor has 3 entries; head_dim 16 needs 8"):
        from_hf_config({**cfg, "rope_scaling": {**cfg["rope_scaling"], "long_factor": [1.0, 2.0, 3.0]}})
    short, long = ours_cfg.inv_freq(context=16), ours_cfg.inv_freq(context=64)
    np.testing.assert_allclose(short[1:] / long[1:], np.asarray(rope["long_factor"][1:]) / rope["short_factor"][1:],
                               rtol=1e-6)


def test_gemma3_vision_language_checkpoint_serves_its_language_model(tmp_path):
    """Gemma 3 4B-27B ship as vision-language checkpoints (model_type gemma3, the text config
    nested, the language model under language_model.): converted, its language model gives
    transformers' text-only logits; the vision tower is left out, and text fields the nested
    config omits take Gemma 3's defaults."""
    from model.config import from_hf_config

    text = {**BASE, **CASES["gemma3"][1]}
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=159, boi_token_index=157, eoi_token_index=158)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))
    src = tmp_path / "hf"
    model.save_pretrained(src)
    write_tiny_tokenizer(src, BASE["vocab_size"])
    tokens = np.random.default_rng(6).integers(0, 150, (2, 30))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
    assert np.abs(ours(tmp_path, src, tokens) - want).max() <= 1e-4
    # The fields a real checkpoint's nested config leaves out take transformers' own defaults.
    given = {"hidden_size": 2560, "num_hidden_layers": 34, "sliding_window": 1024}
    sparse = from_hf_config({"model_type": "gemma3", "text_config": given})
    ref = transformers.Gemma3TextConfig(**given)
    assert (sparse.num_heads, sparse.num_kv_heads, sparse.head_dim, sparse.vocab_size) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.vocab_size)
    assert [sparse.is_sliding(i) for i in range(34)] == [t == "sliding_attention" for t in ref.layer_types]
    rope = getattr(ref, "rope_parameters", None)  # transformers 5: per attention kind
    full, local = ((rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"]) if rope
                   else (ref.rope_theta, ref.rope_local_base_freq))
    assert (sparse.rope_theta, sparse.rope_local_theta, sparse.query_pre_attn_scalar) == (
        full, local, ref.query_pre_attn_scalar)


def test_internlm2_packed_wqkv_matches_llama_reference(tmp_path):
    """Pack a Llama reference's q/k/v into InternLM2's wqkv layout, convert, compare."""
    overrides = dict(num_attention_heads=4, num_key_value_heads=2)
    ref_dir = tmp_path / "ref"
    model = make_hf_checkpoint(ref_dir, transformers.LlamaConfig, overrides)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    n, k, h, d = 4, 2, BASE["hidden_size"] // 4, BASE["hidden_size"]
    g = n // k
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(BASE["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wq = sd[p + "self_attn.q_proj.weight"].reshape(k, g, h, d)
        wk = sd[p + "self_attn.k_proj.weight"].reshape(k, 1, h, d)
        wv = sd[p + "self_attn.v_proj.weight"].reshape(k, 1, h, d)
        out[q + "attention.wqkv.weight"] = np.concatenate([wq, wk, wv], axis=1).reshape(-1, d)
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    src = tmp_path / "internlm2"
    src.mkdir()
    save_file({k_: np.ascontiguousarray(v) for k_, v in out.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
        "vocab_size": BASE["vocab_size"], "hidden_size": d, "intermediate_size": BASE["intermediate_size"],
        "num_hidden_layers": BASE["num_hidden_layers"], "num_attention_heads": n,
        "num_key_value_heads": k, "rms_norm_eps": BASE["rms_norm_eps"], "rope_theta": 10000.0,
        "max_position_embeddings": 256, "bias": False, "tie_word_embeddings": False,
        "hidden_act": "silu"}))
    write_tiny_tokenizer(src, BASE["vocab_size"])
    tokens = np.random.default_rng(3).integers(0, BASE["vocab_size"], (2, 24))
    assert np.abs(ours(tmp_path, src, tokens) - hf_logits(model, tokens)).max() <= 1e-4


@pytest.mark.parametrize("case, kernels", [
    (case, kernels) for case in ["qwen3", "qwen3_tied", "phi3", "mistral_window", "qwen2_window_layers", "gemma2",
                                 "gemma3", "mixtral", "qwen3_moe"]
    for kernels in (False, True)])
def test_cached_prefill_and_decode_give_transformers_greedy_tokens(tmp_path, case, kernels):
    """The serving path (a prompt prefilled into the cache, then one token per decode step,
    each position attended from the cache) gives transformers' greedy continuation."""
    from service.engine import direct
    from service.engine.runner import ModelRunner
    from service.params import SamplingParams

    if kernels and not cpu_kernels.available():
        pytest.skip("the CPU kernels do not build here")
    config_cls, overrides = CASES[case]
    src = tmp_path / "hf"
    model = make_hf_checkpoint(src, config_cls, overrides)
    prompt = [int(x) for x in np.random.default_rng(3).integers(0, BASE["vocab_size"], 11)]
    with torch.no_grad():
        ids = torch.tensor([prompt])  # (an explicit mask: token 0 is not padding here)
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    dst = tmp_path / "converted"
    convert(src, dst, progress=False)
    cfg = load_config(dst)
    backend = cpu_kernels.CpuKernels() if kernels else transformer.XLA
    runner = ModelRunner(cfg, load_params(dst, cfg), max_batch_size=2, session_len=64, max_prefill_chunk=16,
                         backend=backend)
    runner.set_slot(1, SamplingParams(temperature=0), prompt, seed=0)
    tokens = [int(direct.prefill(runner, 1, prompt, 0).tokens[0])]
    for i in range(11):
        tokens.append(int(direct.decode(runner, [1], [tokens[-1]], [len(prompt) + i], [i + 1]).tokens[0]))
    assert tokens == want


@pytest.mark.parametrize("case", ["qwen3", "gemma3", "qwen3_moe"])
def test_an_hf_dir_is_served_end_to_end(tmp_path, case):
    """`xlaserve serve api_server HF_DIR` (converted into the cache on start): a completion and
    a chat completion give transformers' greedy tokens (for gemma3, past its window of 6, with
    its sliding layers' own pool). One family of each kind of layer stack: every family's
    conversion and served steps are checked in-process above."""
    import httpx

    from conftest import start_server

    config_cls, overrides = CASES[case]
    src = tmp_path / f"{case}-tiny"
    model = make_hf_checkpoint(src, config_cls, overrides)
    proc, url = start_server(tmp_path / "server.log", str(src), log_level="INFO")
    try:
        def greedy(ids, n=8):
            with torch.no_grad():  # an explicit mask: token 0 (the template's unknown words) is not padding
                t = torch.tensor([ids])
                out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[0, len(ids):].tolist()

        prompt = [int(x) for x in np.random.default_rng(5).integers(3, BASE["vocab_size"], 9)]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True, "logprobs": 0}, timeout=120).json()
        got = [int(t.removeprefix("w")) for t in r["choices"][0]["logprobs"]["tokens"]]
        assert got == greedy(prompt)
        messages = [{"role": "user", "content": "w5 w6 w7"}]
        ids = httpx.post(f"{url}/v1/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                           "ignore_eos": True, "logprobs": True}, timeout=120).json()
        got = [int(t["token"].removeprefix("w")) for t in r["choices"][0]["logprobs"]["content"]]
        assert got == greedy(ids)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if case == "gemma3":  # its two sliding layers kept their KV in a pool of their own
        assert "the 2 sliding-window layers 30 blocks" in (tmp_path / "server.log").read_text()


def test_sliding_layers_follow_transformers_rules():
    """Which layers are windowed: the config's layer_types, else the family's rule (Mistral
    every layer, Qwen2 from max_window_layers on and only with use_sliding_window); unknown
    layer kinds are refused by name. A windowed model is served to its full positions."""
    from model.config import UnsupportedConfigError, from_hf_config

    mistral = transformers.MistralConfig(**BASE, num_attention_heads=4, num_key_value_heads=2, sliding_window=8).to_dict()
    cfg = from_hf_config(mistral)
    assert cfg.sliding_window == 8 and [cfg.is_sliding(i) for i in range(2)] == [True, True]
    assert cfg.max_context == BASE["max_position_embeddings"]
    old_qwen = {**mistral, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}
    cfg = from_hf_config(old_qwen)
    assert [cfg.attention_spec(i).window for i in range(2)] == [None, 8]
    assert from_hf_config({**old_qwen, "use_sliding_window": False}).sliding_window is None
    new_qwen = transformers.Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                        max_window_layers=1).to_dict()
    assert new_qwen["layer_types"] == ["full_attention", "sliding_attention"]
    assert [from_hf_config(new_qwen).is_sliding(i) for i in range(2)] == [False, True]
    with pytest.raises(UnsupportedConfigError, match="layer_types \\['chunked_attention'\\]"):
        from_hf_config({**new_qwen, "layer_types": ["full_attention", "chunked_attention"]})
