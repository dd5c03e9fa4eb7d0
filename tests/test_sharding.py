"""Tensor and data parallel on the emulated 8-device CPU mesh: sharded runs equal the
unsharded run, weights really are split, and the decode step never gathers a weight."""

import asyncio
import re

import jax
import numpy as np
import pytest

from model import transformer as llama
from model import lora
from model.config import ModelConfig
from model.weights import init_params
from service.engine import direct
from service.engine.step_io import DecodeInputs
from service.engine.runner import ModelRunner
from service.params import SamplingParams
from sharding import MeshError, make_mesh, plan_for

# Divisible head counts, and SmolLM2's awkward ones (9 query heads, 3 KV heads) with a vocab
# that 8 does not divide either.
CONFIGS = {
    "even": ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8),
    "awkward": ModelConfig(family="llama", vocab_size=250, hidden_size=72, intermediate_size=96,
                           num_layers=2, num_heads=9, num_kv_heads=3, head_dim=8,
                           tie_word_embeddings=True),
    # Qwen3's shape: q/k norms, head_dim apart from hidden / heads, few KV heads.
    "qwen3": ModelConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, qk_norm=True),
    # Qwen2's q/k/v biases, with a window of 5 on layer 1 (Mistral's and Phi-3's math is this
    # with no bias).
    "qwen2_window": ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, qkv_bias=True,
                                sliding_window=5, sliding_layers=(False, True)),
    # Gemma 3's shape: one KV head (replicated past --tp 1), alternating sliding (4) and global
    # layers with their own rope bases, soft-caps, pre/post norms, gelu-tanh, scaled embeddings.
    "gemma": ModelConfig(family="gemma", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                         num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True, sliding_window=4,
                         sliding_layers=(True, False, True), rope_local_theta=500.0, query_pre_attn_scalar=12.0,
                         attn_softcap=2.0, final_softcap=3.0, embed_scale=8.0, post_norms=True,
                         mlp_act="gelu_tanh", tie_word_embeddings=True),
    # Mixtral's shape: 4 experts, 2 per token (split over tp 2 and 4; at tp 8 kept whole, their
    # hidden axis split instead).
    "mixtral": ModelConfig(family="mixtral", vocab_size=256, hidden_size=64, intermediate_size=64, num_layers=2,
                           num_heads=8, num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=2,
                           expert_size=64),
    # Qwen3-MoE's: 6 experts (whole on every device past tp 2), 3 per token, not renormalised,
    # layer 0 dense.
    "qwen3_moe": ModelConfig(family="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=96,
                             num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, qk_norm=True, num_experts=6,
                             experts_per_token=3, expert_size=32, norm_topk_prob=False, moe_layers=(False, True)),
}
LAYOUTS = [(2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2)]  # (tp, dp): Llama's shapes run them all
# The families after the first two run the layouts that differ for them.
FEW_LAYOUTS = {"qwen3": ((2, 1), (4, 1), (2, 2)), "qwen2_window": ((2, 1), (4, 1)), "gemma": ((2, 1), (4, 1), (8, 1)),
               "mixtral": ((2, 1), (4, 1), (8, 1)), "qwen3_moe": ((2, 1), (4, 1))}


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, init_params(cfg, seed=1, scale=0.2)) for name, cfg in CONFIGS.items()}


def greedy_run(cfg, params, plan, prompt, steps=6):
    """Prefill into slot 1 of a 2-slot runner, then greedy decode: tokens and logprobs."""
    runner = ModelRunner(cfg, params, max_batch_size=2, session_len=64, max_prefill_chunk=16,
                         plan=plan)
    runner.set_slot(1, SamplingParams(temperature=0), prompt, seed=0)
    first = direct.prefill(runner, 1, prompt, 0)
    tokens, lps = [int(first.tokens[0])], [float(first.logprobs[0])]
    for i in range(steps):
        out = direct.decode(runner, [1], [tokens[-1]], [len(prompt) + i], [i + 1])
        tokens.append(int(out.tokens[0]))
        lps.append(float(out.logprobs[0]))
    return tokens, np.asarray(lps)


def test_mesh_needs_enough_devices():
    with pytest.raises(MeshError, match="--tp 4 --dp 4 needs 16 devices, found 8"):
        make_mesh(4, 4)
    mesh = make_mesh(2, 4)
    assert mesh.shape == {"data": 4, "model": 2}


@pytest.mark.parametrize("name, tp, dp", [(name, tp, dp) for name in sorted(CONFIGS) for tp, dp in LAYOUTS
                                          if (tp, dp) in FEW_LAYOUTS.get(name, LAYOUTS)])
def test_sharded_logits_and_tokens_equal_unsharded(models, name, tp, dp):
    cfg, params = models[name]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    want = np.asarray(jax.jit(lambda p, t: llama.full_logits(llama.prepare(p, cfg), cfg, t))(params, tokens))
    plan = plan_for(cfg, make_mesh(tp, dp), slots=2)
    sharded = jax.device_put(params, plan.param_shardings(cfg))
    got = np.asarray(jax.jit(lambda p, t: llama.full_logits(llama.prepare(p, cfg), cfg, t))(sharded, tokens))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)

    prompt = [int(x) for x in tokens[0, :7]]  # past the gemma config's window of 4
    ref_tokens, ref_lps = greedy_run(cfg, params, None, prompt)
    got_tokens, got_lps = greedy_run(cfg, params, plan, prompt)
    assert got_tokens == ref_tokens
    np.testing.assert_allclose(got_lps, ref_lps, atol=2e-5)


def test_fallbacks_are_named():
    plan = plan_for(CONFIGS["awkward"], make_mesh(4, 1))
    assert plan.rules["heads"] is None and plan.rules["kv_heads"] is None and plan.rules["vocab"] is None
    assert any("heads (9)" in note for note in plan.fallbacks)
    assert plan.rules["mlp"] == "model"  # 96 splits: the MLP still runs tensor parallel
    plan = plan_for(CONFIGS["even"], make_mesh(8, 1))
    assert plan.rules["heads"] == "model" and plan.rules["kv_heads"] is None  # 4 KV heads < 8
    assert plan.rules["mlp"] == "model"


def test_params_really_are_sharded(models):
    cfg, params = models["even"]
    plan = plan_for(cfg, make_mesh(4, 1))
    sharded = jax.device_put(params, plan.param_shardings(cfg))
    layer = sharded["layers"][0]
    for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 0), ("wq", 1), ("wk", 1), ("wo", 0)):
        full = layer[name].shape
        shards = layer[name].addressable_shards
        assert len(shards) == 4
        for s in shards:
            expect = list(full)
            expect[dim] //= 4
            assert s.data.shape == tuple(expect), name
    assert {s.data.shape for s in sharded["embed"].addressable_shards} == {(64, 64)}


def test_experts_are_split_over_the_model_axis(models):
    """Expert parallel: at --tp 4 each device holds one of Mixtral's 4 experts; at --tp 8 (4
    does not divide) every device holds all 4 with an eighth of each expert's hidden axis."""
    cfg, params = models["mixtral"]
    for tp, shape in ((4, {"we_gate": (1, 64, 64), "we_down": (1, 64, 64)}),
                      (8, {"we_gate": (4, 64, 8), "we_down": (4, 8, 64)})):
        plan = plan_for(cfg, make_mesh(tp, 1))
        layer = jax.device_put(params, plan.param_shardings(cfg))["layers"][1]
        for name, want in shape.items():
            assert {s.data.shape for s in layer[name].addressable_shards} == {want}, (tp, name)
        assert {s.data.shape for s in layer["router"].addressable_shards} == {(64, 4)}  # replicated


def _weight_gathers(hlo: str, full_shapes: set[tuple[int, ...]], ops: str = "all-gather") -> list[str]:
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*\w+\[([\d,]*)\][^ ]*\s+(?:" + ops + r")(?:-start)?\(", line)
        if m:
            shape = tuple(int(x) for x in m.group(1).split(",") if x)
            if shape in full_shapes:
                found.append(line.strip())
    return found


@pytest.mark.parametrize("name, tp, dp", [("even", 2, 1), ("even", 4, 2), ("mixtral", 4, 1), ("gemma", 2, 2)])
def test_decode_step_gathers_no_weights(models, name, tp, dp):
    """Nor the KV cache: each row's blocks (a windowed layer's too) are read on the devices of
    its replica's pool, with no collective over the cache or the blocks read. (Where KV heads
    are replicated, the step's own new K/V, one position per row, may be gathered before it
    is written: activations, not the cache.)"""
    cfg, params = models[name]
    plan = plan_for(cfg, make_mesh(tp, dp), slots=4)
    # With LoRA adapter slots, every row on one: their A and B are sharded with the projection
    # they feed, so they are never gathered either.
    bank = lora.BankSpec(2, 8, lora.ATTENTION + lora.MLP)
    runner = ModelRunner(cfg, params, max_batch_size=4, session_len=64, plan=plan, adapters=bank)
    b = runner.shapes.batch_sizes[-1]
    z = np.zeros((b,), np.int32)
    rows = None if runner.full_width else np.arange(b, dtype=np.int32)
    allowed = runner.shapes.allowed(b, [], None)
    inputs = DecodeInputs(z, z, z, rows, z, allowed, np.int32(len(z)), runner.shapes.spans[0])
    hlo = runner._decode.lower(runner.params, runner.cache, runner.sampling, runner.rope, runner.eos_mask,
                               direct.identity_tables(runner), runner.bank, inputs).compile().as_text()
    full_shapes = {tuple(x.shape) for x in jax.tree.leaves((params, runner.bank)) if x.ndim >= 2}
    pool = runner.cache[0][0].shape  # (R, NB, BS, K, E)
    r, nb, bs, k, e = pool
    read = -(-runner.shapes.spans[0] // bs)  # blocks read per row at the smallest span
    cache_shapes = {pool, (r * nb, bs, k, e), (r * nb * bs, k, e)}
    for blocks in {read, runner.max_blocks} | {m for m in range(1, read + 1)}:
        cache_shapes |= {(b, blocks * bs, k, e), (b, blocks, bs, k, e), (r, b // r, blocks, bs, k, e)}
    assert "all-gather" in hlo or "all-reduce" in hlo  # it is a sharded program
    assert _weight_gathers(hlo, full_shapes | cache_shapes) == []
    assert _weight_gathers(hlo, cache_shapes, ops="all-reduce|all-to-all|collective-permute") == []


def test_engine_batched_serving_tp2_dp2_equals_single_device(default_checkpoint, models):
    from model.tokenizer import Tokenizer
    from service.engine import Engine

    tokenizer = Tokenizer.from_dir(default_checkpoint)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8)
    params = init_params(cfg, seed=2, scale=0.3)
    rng = np.random.default_rng(5)
    prompts = [[int(x) for x in rng.integers(100, 30000, n)] for n in (5, 23, 11)]
    prompts.append(list(prompts[1]))  # shares its prefill by a KV copy between slots
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)

    def serve(plan):
        runner = ModelRunner(cfg, params, max_batch_size=4, session_len=128, max_prefill_chunk=16,
                             eos_ids=tokenizer.eos_ids, plan=plan)
        engine = Engine(runner, tokenizer)

        async def one(ids, sp):
            toks = []
            async for out in engine.generate(ids, sp):
                toks += out.token_ids
            return toks

        async def all_():
            return await asyncio.gather(*[one(ids, greedy if i % 2 == 0 else seeded)
                                          for i, ids in enumerate(prompts)])

        engine.start()
        try:
            return asyncio.run(all_())
        finally:
            engine.stop()

    single = serve(None)
    assert serve(plan_for(cfg, make_mesh(2, 2), slots=4)) == single
    assert all(len(t) == 10 for t in single)
