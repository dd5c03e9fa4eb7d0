"""The bundled SmolLM2 GGUF: weights, tokenizer and chat template equal transformers' own
GGUF loader's; and the real model answers like transformers does."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from model.chat_template import render  # noqa: E402
from model.checkpoint import load_config, load_params  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from service.models import default_gguf  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Prices rose 12.5% to $1,234,567 in 2024; call 555-0199.",
    "Emoji: 🎉🚀👍🏽 and ✨ sparkles",
    "中文测试：今天天气很好。日本語のテキストも。한국어",
    "  leading spaces, trailing tabs\t\t and\nnew\r\nlines  ",
    "<|im_start|>user\nHi<|im_end|>",
]


@pytest.fixture(scope="module")
def hf_gguf():
    path = default_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    cfg = load_config(default_checkpoint)
    return cfg, load_params(default_checkpoint, cfg), Tokenizer.from_dir(default_checkpoint)


def test_weights_equal_transformers_dequantized(hf_gguf, ours):
    _, model = hf_gguf
    cfg, params, _ = ours
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"])
    for i in (0, cfg.num_layers - 1):
        layer, pre = params["layers"][i], f"model.layers.{i}."
        pairs = {
            "wq": sd[pre + "self_attn.q_proj.weight"].T.reshape(d, n, h),
            "wk": sd[pre + "self_attn.k_proj.weight"].T.reshape(d, k, h),
            "wv": sd[pre + "self_attn.v_proj.weight"].T.reshape(d, k, h),
            "wo": sd[pre + "self_attn.o_proj.weight"].T.reshape(n, h, d),
            "w_gate": sd[pre + "mlp.gate_proj.weight"].T,
            "w_up": sd[pre + "mlp.up_proj.weight"].T,
            "w_down": sd[pre + "mlp.down_proj.weight"].T,
            "attn_norm": sd[pre + "input_layernorm.weight"],
            "mlp_norm": sd[pre + "post_attention_layernorm.weight"],
        }
        for name, want in pairs.items():
            np.testing.assert_array_equal(np.asarray(layer[name]), want, err_msg=f"layer {i} {name}")


def test_tokenizer_matches_transformers(hf_gguf, ours):
    hf_tok, _ = hf_gguf
    tok = ours[2]
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template_renders_identically(hf_gguf, ours):
    hf_tok, _ = hf_gguf
    tok = ours[2]
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            got = render(tok.chat_template, msgs, add_generation_prompt=gen,
                         bos_token=tok.bos_token, eos_token=tok.eos_token)
            assert got == want


PROMPTS = ["What is the capital of France?", "Write a short poem about the ocean.",
           "List three uses of Python."]


def test_real_model_first_32_greedy_tokens_equal_transformers(hf_gguf, ours):
    """Through the engine (prefill + batched decode), all three prompts at once."""
    import asyncio

    from service.engine import Engine
    from service.engine.runner import ModelRunner
    from service.params import SamplingParams

    hf_tok, model = hf_gguf
    cfg, params, tok = ours
    runner = ModelRunner(cfg, params, max_batch_size=4, session_len=128, eos_ids=tok.eos_ids)
    engine = Engine(runner, tok)
    engine.start()
    prompts = [tok.encode(render(tok.chat_template, [{"role": "user", "content": q}],
                                 bos_token=tok.bos_token), add_special_tokens=False) for q in PROMPTS]

    async def run(ids):
        got = []
        async for out in engine.generate(ids, SamplingParams(temperature=0, max_tokens=32)):
            got.extend(out.token_ids)
        return got

    async def run_all():
        return await asyncio.gather(*[run(ids) for ids in prompts])

    try:
        ours_tokens = asyncio.run(run_all())
    finally:
        engine.stop()
    for ids, got in zip(prompts, ours_tokens):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(tok.eos_ids))[0, len(ids):].tolist()
        assert got == ref, (tok.decode(got), tok.decode(ref))
    answer = tok.decode(ours_tokens[0])
    assert "Paris" in answer, answer


def test_prompt_logprobs_equal_transformers(hf_gguf, ours):
    """A scored prompt (echo with logprobs) through the engine, one prompt cut into chunks and
    another packed beside it, after the same text was cached by an earlier request: each
    prompt token's logprob given the ones before equals transformers' log-softmax, and so does
    the best alternative's. With max_tokens 0 nothing is generated."""
    import asyncio

    from service.engine import Engine
    from service.engine.runner import ModelRunner
    from service.params import SamplingParams

    _, model = hf_gguf
    cfg, params, tok = ours
    runner = ModelRunner(cfg, params, max_batch_size=4, session_len=256, eos_ids=tok.eos_ids,
                         max_prefill_chunk=32)
    engine = Engine(runner, tok)
    engine.start()
    texts = [CORPUS[0] + " " + CORPUS[2] + " " + CORPUS[5], CORPUS[1]]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[0]) > 32  # cut into chunks

    async def run(ids, params):
        outs = [out async for out in engine.generate(ids, params)]
        return outs

    async def run_all():
        await run(prompts[0], SamplingParams(temperature=0, max_tokens=2))  # caches the prompt
        return await asyncio.gather(run(prompts[0], SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2)),
                                    run(prompts[1], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)))

    try:
        scored = asyncio.run(run_all())
    finally:
        engine.stop()
    zero, one = scored
    assert len(zero) == 1 and zero[0].finish_reason == "length" and zero[0].token_ids == []
    assert zero[0].completion_tokens == 0 and zero[0].cached_tokens == 0
    assert len(one[0].token_ids) == 1
    for ids, outs in zip(prompts, scored):
        got = outs[0].prompt_logprobs
        assert [t.token_id for t in got] == ids[1:]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        want = ref[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose([t.logprob for t in got], want, atol=2e-3)
        np.testing.assert_allclose([t.top[0][1] for t in got], ref[:-1].max(-1), atol=2e-3)
        assert all(len(t.top) == 2 for t in got)
