"""The native CPU kernels (decode attention, packed-weight matmul) against references: the XLA
paths they replace, numpy, and the plain param tree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import layers, transformer as llama
from model.backends.cpu import CpuKernels, Panels, kernels as cpu_kernels
from model.backends.xla import Dense, Split
from model.config import ModelConfig

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="native CPU kernel unavailable (no C++ compiler?)")


def tiny_cfg(heads=6, kv_heads=2, head_dim=16):
    return ModelConfig(family="llama", vocab_size=64, hidden_size=heads * head_dim, intermediate_size=64,
                       num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       rope_theta=10000.0, rms_norm_eps=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_kernel_matches_xla_attention_with_padding_rows(heads, kv_heads):
    """One decode step through layers.attention both ways, over a block pool whose tables name
    blocks in shuffled order: rows in any order, each with its own context length, and a
    padding row (slot out of range) whose output is zero and whose cache write is dropped."""
    cfg = tiny_cfg(heads, kv_heads)
    rng = np.random.default_rng(heads * 10 + kv_heads)
    slots, session = 5, 40
    d, h = cfg.hidden_size, cfg.head_dim
    layer = {
        "qkv": Split((Dense(jnp.asarray(rng.standard_normal((d, heads, h)) * 0.2, jnp.float32)),
                      Dense(jnp.asarray(rng.standard_normal((d, kv_heads, h)) * 0.2, jnp.float32)),
                      Dense(jnp.asarray(rng.standard_normal((d, kv_heads, h)) * 0.2, jnp.float32)))),
        "wo": Dense(jnp.asarray(rng.standard_normal((heads, h, d)) * 0.2, jnp.float32)),
    }
    per_slot = -(-(session + 1) // 16)
    shape = (1, slots * per_slot + 1, 16, kv_heads, h)  # and the block padding writes to
    kv = (jnp.asarray(rng.standard_normal(shape), jnp.float32),
          jnp.asarray(rng.standard_normal(shape), jnp.float32))
    tables = jnp.asarray(rng.permutation(slots * per_slot).reshape(slots, per_slot), jnp.int32)
    rows = jnp.asarray([3, 0, slots, 4], jnp.int32)  # row 2 pads the batch
    positions = jnp.asarray([[7], [0], [session], [39]], jnp.int32)
    x = jnp.asarray(rng.standard_normal((4, 1, d)), jnp.float32)
    cos, sin = layers.rope_cos_sin(cfg, positions)

    def run(kernel):
        backend = CpuKernels() if kernel else llama.XLA
        return jax.jit(lambda x, kv: layers.attention(cfg, layer, x, cos, sin, positions, kv, rows,
                                                      session, backend, tables=tables))(x, kv)

    want, want_kv = run(False)
    got, got_kv = run(True)
    live = np.array([0, 1, 3])
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[2].any()
    for a, b in zip(got_kv, want_kv):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_reads_only_each_rows_own_positions():
    """Garbage past a row's length must not change its output (the kernel ignores spans)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    k = rng.standard_normal((2, 16, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 16, 2, 8)).astype(np.float32)
    rows, lens = jnp.asarray([1, 0], jnp.int32), jnp.asarray([5, 16], jnp.int32)
    first = np.asarray(cpu_kernels.decode_attention(q, jnp.asarray(k), jnp.asarray(v), rows, lens))
    k[1, 5:] = 1e6
    v[1, 5:] = -1e6
    second = np.asarray(cpu_kernels.decode_attention(q, jnp.asarray(k), jnp.asarray(v), rows, lens))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_allclose(first[0], numpy_attention(np.asarray(q)[0], k, v, 1, 5),
                               rtol=1e-5, atol=1e-6)


def numpy_attention(q, k, v, row, length, scale=None, softcap=None, window=None):
    """One batch row by hand: q (N, H), caches (R, S, K, H); the last ``window`` positions
    only when one is given."""
    n, h = q.shape
    kv_heads = k.shape[2]
    first = 0 if window is None else max(0, length - window)
    qq = q.reshape(kv_heads, n // kv_heads, h)
    scores = np.einsum("kgh,skh->kgs", qq, k[row, first:length]) * (h ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("kgs,skh->kgh", p, v[row, first:length]).reshape(n, h)


@pytest.mark.parametrize("head_dim,storage", [(64, "float32"), (64, "bfloat16"), (64, "int8"), (24, "float32")])
@pytest.mark.parametrize("window", [1, 7, 100, 600])
def test_windowed_softcapped_attention_matches_numpy(head_dim, storage, window):
    """A sliding window (each query sees its last ``window`` positions), a soft-cap and a scale
    other than 1/sqrt(H), as Gemma and Mistral layers ask: a prefill chunk whose queries'
    windows start at different positions inside one block, rows past and within their
    window, long rows in pieces, and every cache format and the scalar path."""
    rng = np.random.default_rng(window + head_dim)
    t = 40
    k = (3 * rng.standard_normal((3, 1300, 2, head_dim))).astype(np.float32)
    v = rng.standard_normal((3, 1300, 2, head_dim)).astype(np.float32)
    rows = np.array([1] * t + [0, 2, 2, 5], np.int32)
    lens = np.array(list(range(650, 650 + t)) + [1300, 5, 90, 3], np.int32)
    q = rng.standard_normal((len(rows), 6, head_dim)).astype(np.float32)
    kc, vc = (cpu_kernels.to_cache(jnp.asarray(x), jnp.dtype(storage).type if storage != "bfloat16"
                                   else jnp.uint16) for x in (k, v))
    if storage != "float32":  # compare against the values the cache holds
        k, v = (np.asarray(cpu_kernels.from_cache(c, head_dim)) for c in (kc, vc))
    # Far garbage: a read before any window shows as a wrong (or non-finite) output.
    got = np.asarray(cpu_kernels.decode_attention(jnp.asarray(q), kc, vc, jnp.asarray(rows), jnp.asarray(lens),
                                                  scale=0.11, softcap=5.0, window=window))
    tol = 2e-2 if storage == "int8" else 1e-4
    for b in range(len(rows) - 1):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k, v, rows[b], lens[b], 0.11, 5.0, window),
                                   rtol=tol, atol=tol / 10)
    assert not got[-1].any()  # the padding row


def test_windowed_attention_never_reads_before_the_window():
    """Positions before a row's window hold NaN: the output stays finite and equal to the
    window's attention (the kernel never reads them, beyond the block a window starts in)."""
    rng = np.random.default_rng(4)
    h, window = 32, 20
    k = rng.standard_normal((1, 900, 2, h)).astype(np.float32)
    v = rng.standard_normal((1, 900, 2, h)).astype(np.float32)
    lens = np.array([900, 899, 600], np.int32)
    q = rng.standard_normal((3, 4, h)).astype(np.float32)
    kn, vn = k.copy(), v.copy()
    kn[:, :560], vn[:, :560] = np.nan, np.nan  # every row's window starts past 576
    got = np.asarray(cpu_kernels.decode_attention(*map(jnp.asarray, (q, kn, vn, np.zeros(3, np.int32), lens)),
                                                  window=window))
    assert np.isfinite(got).all()
    for b in range(3):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k, v, 0, lens[b], window=window),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim,scale", [(16, 1.0), (64, 1.0), (64, 6.0), (128, 1.0), (24, 1.0)])
def test_long_rows_split_into_pieces_match_numpy(head_dim, scale):
    """Rows longer than one piece (512 positions) are attended piecewise and merged. Head
    sizes cover the vector paths (one and several vectors per head) and the scalar one; a
    large scale spreads the scores over the exponential's whole range."""
    rng = np.random.default_rng(head_dim)
    q = (scale * rng.standard_normal((3, 6, head_dim))).astype(np.float32)
    k = rng.standard_normal((3, 1300, 2, head_dim)).astype(np.float32)
    v = rng.standard_normal((3, 1300, 2, head_dim)).astype(np.float32)
    rows, lens = np.array([2, 0, 1], np.int32), np.array([1300, 513, 40], np.int32)
    got = np.asarray(cpu_kernels.decode_attention(*map(jnp.asarray, (q, k, v, rows, lens))))
    for b in range(3):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k, v, rows[b], lens[b]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim,bf16", [(64, False), (64, True), (24, False)])
def test_prefill_chunk_queries_attend_in_blocks_like_numpy(head_dim, bf16):
    """A prefill chunk's queries (one cache row, consecutive lengths) share passes over the
    keys in blocks of queries. Here a 40-query chunk after 500 positions (blocks of 16 that
    straddle the 512-position pieces), a second row's chunk of 3, a decode row between them and
    a padding row: each query must see exactly its own positions."""
    rng = np.random.default_rng(head_dim + bf16)
    t = 40
    k = rng.standard_normal((3, 700, 2, head_dim)).astype(np.float32)
    v = rng.standard_normal((3, 700, 2, head_dim)).astype(np.float32)
    if bf16:  # compare against the values the bf16 cache holds
        k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (k, v))
    rows = np.array([1] * t + [0] + [2] * 3 + [7], np.int32)
    lens = np.array(list(range(501, 501 + t)) + [9] + [5, 6, 7] + [3], np.int32)
    q = rng.standard_normal((len(rows), 6, head_dim)).astype(np.float32)
    kc, vc = (cpu_kernels.to_cache(jnp.asarray(x), jnp.uint16 if bf16 else jnp.float32) for x in (k, v))
    got = np.asarray(cpu_kernels.decode_attention(jnp.asarray(q), kc, vc, jnp.asarray(rows), jnp.asarray(lens)))
    for b in range(len(rows) - 1):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k, v, rows[b], lens[b]),
                                   rtol=1e-4, atol=1e-5)
    assert not got[-1].any()  # the padding row (cache row 7 does not exist)


def test_loading_the_kernel_keeps_subnormal_floats():
    """The library must not switch the process to flush-to-zero (as -ffast-math builds do)."""
    assert cpu_kernels.available()
    tiny = np.array([1e-40], np.float32)
    assert (tiny * np.float32(1.0))[0] != 0
    assert np.nextafter(np.float32(0), np.float32(1)) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "w8a8"])
def test_matmul_multiplies_only_live_rows(dtype):
    """With ``live``, the rows before it are the full product's and the rest are zeros (even
    where x holds NaN: they are never read); the count comes at run time, one compile."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    packed = cpu_kernels.pack(jnp.asarray(rng.standard_normal((64, 72)).astype(np.float32)), dtype)
    full = np.asarray(cpu_kernels.matmul(jnp.asarray(x), packed, 72))
    f = jax.jit(lambda x, p, live: cpu_kernels.matmul(x, p, 72, live))
    for live in (0, 1, 7, 19, 20, 25):
        padded = x.copy()
        padded[live:] = np.nan
        got = np.asarray(f(padded, packed, np.int32(live)))
        np.testing.assert_array_equal(got[:live], full[:live])
        assert (got[live:] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (7, 100, 70), (16, 64, 3 * 64 + 5), (200, 32, 64),
                                   (13, 33, 129), (0, 8, 8)])
def test_packed_matmul_matches_numpy(m, k, n, dtype):
    """Batch rows from one to past a work item's row block, widths that do not fill the last
    panel, and an empty batch; each weight format against numpy on the weight it stores
    (float32 exactly, bfloat16 rounded, int8 within half a step of its column's scale)."""
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = cpu_kernels.pack(jnp.asarray(w), dtype)
    nr = cpu_kernels.panel_width()
    assert cpu_kernels.panels(packed).shape == (-(-n // nr), k, nr)
    stored = np.asarray(cpu_kernels.unpack(packed, n))
    if dtype == "float32":
        np.testing.assert_array_equal(stored, w)
    elif dtype == "bfloat16":
        np.testing.assert_array_equal(stored, np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))
    else:
        step = np.abs(w).max(axis=0) / 127
        assert (np.abs(stored - w) <= step / 2 + 1e-7).all()
        np.testing.assert_allclose(np.asarray(cpu_kernels.columns(packed, jnp.arange(n), k)), stored.T,
                                   rtol=1e-6)
    got = np.asarray(jax.jit(lambda x, p: cpu_kernels.matmul(x, p, n))(x, packed))
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, x.astype(np.float64) @ stored, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_packed_params_give_the_same_logits(tied, bias):
    """The whole model on packed weights (fused q/k/v and gate/up, packed head, embedding read
    from a packed tied head) against the plain param tree through XLA."""
    from model.weights import init_params

    cfg = ModelConfig(family="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, qkv_bias=bias)
    params = init_params(cfg, seed=3, scale=0.1)
    packed = CpuKernels().prepare(params, cfg)
    assert isinstance(packed["layers"][0]["qkv"], Panels) and (packed["embed"] is packed["head"]) == tied
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 9)), jnp.int32)
    want = np.asarray(llama.full_logits(llama.prepare(params, cfg), cfg, tokens))
    got = np.asarray(llama.full_logits(packed, cfg, tokens))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_packed_weights_compute_in_float32():
    """A bfloat16 model packs its matrices as bfloat16 and computes in float32: its logits
    equal the plain tree's in float32 with the same bfloat16-rounded weights."""
    from model.weights import init_params

    cfg = ModelConfig(family="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16")
    params = init_params(cfg, seed=5, scale=0.1)
    packed = CpuKernels().prepare(params, cfg)
    assert packed["layers"][0]["qkv"].panels.dtype == jnp.bfloat16
    assert packed["layers"][0]["attn_norm"].dtype == jnp.float32
    rounded = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    cfg32 = dataclasses.replace(cfg, dtype="float32")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 100, (2, 9)), jnp.int32)
    want = np.asarray(llama.full_logits(llama.prepare(rounded, cfg32), cfg32, tokens))
    got = np.asarray(llama.full_logits(packed, cfg32, tokens))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize,max_kl", [("int8", 0.02), ("w8a8", 0.03)])
def test_int8_weights_keep_the_real_models_predictions(default_checkpoint, quantize, max_kl):
    """int8 weights (with float32 or int8 activations) on the bundled model against its
    float32 weights, all on the CPU kernels, over a paragraph of English: the same next token
    almost everywhere, a small divergence, and no loss in the text's likelihood."""
    from model.checkpoint import load_config, load_params
    from model.tokenizer import Tokenizer

    cfg = load_config(default_checkpoint)
    params = load_params(default_checkpoint, cfg)
    text = ("The history of astronomy is the study of how people have observed the sky over "
            "thousands of years. Early civilizations tracked the motion of the Sun, the Moon and "
            "the planets to keep calendars, and later scholars built instruments to measure the "
            "positions of stars with growing precision.")
    ids = jnp.asarray([Tokenizer.from_dir(default_checkpoint).encode(text)], jnp.int32)
    logp = [jax.nn.log_softmax(llama.full_logits(CpuKernels().prepare(params, cfg, q), cfg, ids,
                                                 backend=CpuKernels())[0]) for q in (None, quantize)]
    ref, quant = (np.asarray(x, np.float64) for x in logp)
    assert (ref.argmax(-1) == quant.argmax(-1)).mean() >= 0.9
    kl = (np.exp(ref) * (ref - quant)).sum(-1)
    assert kl.mean() < max_kl, kl.mean()
    targets = np.asarray(ids[0, 1:])
    nll = [-x[np.arange(len(targets)), targets].mean() for x in (ref, quant)]
    assert nll[1] < nll[0] + 0.1, nll


@pytest.mark.parametrize("kv_dtype,max_kl", [(jnp.uint16, 0.0005), (jnp.int8, 0.005)])
def test_reduced_kv_caches_keep_the_real_models_predictions(default_checkpoint, kv_dtype, max_kl):
    """The bundled model over a paragraph with its keys and values stored in bfloat16 (as
    uint16 bits) or int8 (a scale per position and head) against a float32 cache: the same
    next token almost everywhere, a small divergence, and no loss in the text's likelihood."""
    from model.checkpoint import load_config, load_params
    from model.tokenizer import Tokenizer

    cfg = load_config(default_checkpoint)
    params = CpuKernels().prepare(load_params(default_checkpoint, cfg), cfg, None)
    text = ("In the spring the river rose over its banks, and the farmers who lived along it moved "
            "their animals to higher ground. When the water went down it left a layer of rich "
            "soil, and that year the harvest was the best anyone could remember.")
    ids = jnp.asarray([Tokenizer.from_dir(default_checkpoint).encode(text)], jnp.int32)
    logp = [jax.nn.log_softmax(llama.full_logits(params, cfg, ids, backend=CpuKernels(), kv_dtype=dt)[0])
            for dt in (jnp.float32, kv_dtype)]
    ref, reduced = (np.asarray(x, np.float64) for x in logp)
    assert (ref.argmax(-1) == reduced.argmax(-1)).mean() >= 0.9
    kl = (np.exp(ref) * (ref - reduced)).sum(-1)
    assert 0 < kl.mean() < max_kl, kl.mean()
    targets = np.asarray(ids[0, 1:])
    nll = [-x[np.arange(len(targets)), targets].mean() for x in (ref, reduced)]
    assert nll[1] < nll[0] + 0.05, nll


@pytest.mark.parametrize("flag", [("--quantize", "int8"), ("--quantize", "w8a8"),
                                  ("--kv-cache-dtype", "int8")])
def test_generate_with_int8_weights_and_where_it_cannot_run(default_checkpoint, flag):
    """``--quantize`` and an int8 KV cache serve from the CLI; with a sharded mesh they are
    refused in one line. (A raw completion: the chat answer's first token is a near tie, 0.1
    logits, even at float32.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def generate(*extra, devices=1):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        return subprocess.run([sys.executable, "-m", "service.cli", "generate", "--raw", "--prompt",
                               "The capital of France is", "--max-tokens", "8",
                               "--log-level", "WARNING", *flag, *extra],
                              env=env, cwd=root, capture_output=True, text=True, timeout=600)

    ok = generate()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Paris" in ok.stdout
    bad = generate("--tp", "2", devices=2)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"xlaserve: error: {' '.join(flag)} runs on the native CPU kernels only: one CPU device, "
        "no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0"]


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (16, 576, 200), (13, 33, 129), (200, 64, 64),
                                   (5, 1536, 70), (0, 64, 64)])
def test_w8a8_matmul_matches_numpy_on_quantized_operands(m, k, n):
    """int8 activations per row and block of 64 (zero padding past K), int8 weights per
    column: the kernel's sums equal numpy's on the same quantized values, and stay within
    about a percent of the float32 product."""
    rng = np.random.default_rng(m * 7 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, :3] *= 20  # an outlier column, as activations have
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = cpu_kernels.pack(jnp.asarray(w), "w8a8")
    stored = np.asarray(cpu_kernels.unpack(packed, n, k))
    assert (np.abs(stored - w) <= np.abs(w).max(axis=0) / 254 + 1e-7).all()
    np.testing.assert_allclose(np.asarray(cpu_kernels.columns(packed, jnp.arange(n), k)), stored.T,
                               rtol=1e-6)
    block = cpu_kernels.W8A8_BLOCK
    kp = -(-k // block) * block
    xb = np.pad(x, ((0, 0), (0, kp - k))).reshape(m, kp // block, block)
    scale = np.abs(xb).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1
    xq = (np.clip(np.rint(xb / scale), -127, 127) * scale).reshape(m, kp)[:, :k]
    got = np.asarray(jax.jit(lambda x, p: cpu_kernels.matmul(x, p, n))(x, packed))
    assert got.shape == (m, n)
    want = xq.astype(np.float64) @ stored
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(want).max(initial=0)))
    exact = x.astype(np.float64) @ w
    if m:
        assert np.abs(got - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("head_dim", [64, 48, 32, 24])
def test_bfloat16_cache_attends_like_its_float32_values(head_dim):
    """A bfloat16 KV cache: the kernel widens each value exactly, so its output equals numpy's
    over the same values in float32 (head sizes of the paths: an even and an odd number of
    vectors, two vectors, scalar; several pieces per row)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3, 6, head_dim)).astype(np.float32)
    k = cpu_kernels.to_cache(jnp.asarray(rng.standard_normal((3, 700, 2, head_dim))), jnp.uint16)
    v = cpu_kernels.to_cache(jnp.asarray(rng.standard_normal((3, 700, 2, head_dim))), jnp.uint16)
    rows, lens = np.array([2, 0, 1], np.int32), np.array([700, 513, 40], np.int32)
    got = np.asarray(cpu_kernels.decode_attention(jnp.asarray(q), k, v, jnp.asarray(rows), jnp.asarray(lens)))
    k32, v32 = (np.asarray(jax.lax.bitcast_convert_type(x, jnp.bfloat16), np.float32) for x in (k, v))
    for b in range(3):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k32, v32, rows[b], lens[b]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 48, 32, 24])
def test_int8_cache_attends_like_its_dequantized_values(head_dim):
    """An int8 KV cache (values and a float32 scale per position and head): the kernel's output
    equals numpy's over the dequantized values, and those are within half a step of the
    originals (head sizes of the vector and scalar paths; several pieces per row)."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((3, 6, head_dim)).astype(np.float32)
    k_in, v_in = (rng.standard_normal((3, 700, 2, head_dim)).astype(np.float32) * 3 for _ in range(2))
    k_in[1, 5, 0] = 0.0  # a head of zeros: scale 1, values 0
    k, v = (cpu_kernels.to_cache(jnp.asarray(x), jnp.int8) for x in (k_in, v_in))
    assert k.dtype == jnp.int8 and k.shape == (3, 700, 2, head_dim + 4)
    k32, v32 = (np.asarray(cpu_kernels.from_cache(x, head_dim)) for x in (k, v))
    for x, x32 in ((k_in, k32), (v_in, v32)):
        step = np.abs(x).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(x32 - x) <= step / 2 + 1e-6)
    assert np.all(k32[1, 5, 0] == 0.0)
    rows, lens = np.array([2, 0, 1], np.int32), np.array([700, 513, 40], np.int32)
    got = np.asarray(cpu_kernels.decode_attention(jnp.asarray(q), k, v, jnp.asarray(rows), jnp.asarray(lens)))
    for b in range(3):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k32, v32, rows[b], lens[b]),
                                   rtol=1e-4, atol=1e-5)


def test_bfloat16_kv_cache_serves_like_float32(default_checkpoint):
    """A runner with ``kv_cache_dtype="bfloat16"`` stores half the bytes (bfloat16 bits in
    uint16, scattered in place) and greedy decoding follows the float32 cache's tokens."""
    from service.params import SamplingParams
    from service.engine import direct
    from service.engine.config import EngineConfig
    from service.models import build_runner

    out = {}
    for kv in ("float32", "bfloat16"):
        runner, tok = build_runner(default_checkpoint, EngineConfig(max_batch_size=1, session_len=128,
                                                                    kv_cache_dtype=kv))
        assert runner.cache[0][0].dtype == (jnp.float32 if kv == "float32" else jnp.uint16)
        prompt = tok.encode("The capital of France is")
        runner.set_slot(0, SamplingParams(temperature=0), prompt, 0)
        token = int(direct.prefill(runner, 0, prompt, 0).tokens[0])
        tokens = [token]
        for i in range(8):
            token = int(direct.decode(runner, [0], [token], [len(prompt) + i], [i + 1]).tokens[0])
            tokens.append(token)
        out[kv] = tokens
    assert out["bfloat16"] == out["float32"]


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3"])
def test_kernels_built_for_older_instruction_sets_compute_the_same(march, tmp_path):
    """Machines without AVX-512 (AVX2 only, or SSE only) build the same sources with narrower
    vectors and the scalar int8 dot product: each entry point still matches numpy. The build's
    panel width and int8 path follow from what the compiler enables for that -march (asked
    here, not assumed): the vector width, and VNNI only with AVX512-VNNI and -BW."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    macros = subprocess.run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", "-"], input="",
                            capture_output=True, text=True, check=True).stdout.split()
    # cpu_matmul.cc's panel: kVW floats per vector times kNV vectors (AVX-512: 16 x 4, AVX: 8 x 2,
    # older: 4 x 2).
    panel = 64 if "__AVX512F__" in macros else 16 if "__AVX__" in macros else 8
    vnni = "__AVX512VNNI__" in macros and "__AVX512BW__" in macros

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLASERVE_CPU_MARCH": march, "XLASERVE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, str(root / "tests" / "data" / "cpu_kernels_check.py")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["panel", str(panel), "vnni", str(vnni), "ok"]


def test_freed_step_buffers_stay_in_the_process_heap():
    """After keep_freed_memory, a block of 20 MiB (a prefill step's activations) comes from
    malloc's heap, where freed memory is reused, not from a fresh mapping that would fault
    in page by page on every step. Run in a fresh process: the setting is process-wide."""
    import subprocess
    import sys

    code = """
import ctypes, sys
sys.path.insert(0, {root!r})
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from model.backends import keep_freed_memory
    assert keep_freed_memory()
p = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd)
"""
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    mapped = {mode: int(subprocess.run([sys.executable, "-c", code.format(root=root), mode],
                                       capture_output=True, text=True, check=True).stdout.split()[-1])
              for mode in ("default", "keep")}
    assert mapped["default"] >= 20 << 20  # glibc's default maps a fresh block that large
    assert mapped["keep"] < 20 << 20


def paged(x, block, rng):
    """A (R, S, K, E) cache as a block pool (NB, block, K, E) in shuffled order, with each
    row's table (R, S / block) and spare blocks of garbage."""
    r, s = x.shape[:2]
    per_row = s // block
    order = rng.permutation(r * per_row + 3)  # 3 spare blocks nobody's table names
    pool = np.full((len(order), block, *x.shape[2:]), 7, x.dtype)
    tables = order[:r * per_row].reshape(r, per_row).astype(np.int32)
    pool[tables.reshape(-1)] = x.reshape(r * per_row, block, *x.shape[2:])
    return pool, tables


@pytest.mark.parametrize("block", [16, 32, 48])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("window", [None, 7, 100])
def test_paged_attention_reads_through_block_tables(block, storage, window):
    """The kernel over a shuffled block pool equals numpy over the rows the tables spell out:
    a prefill chunk that crosses blocks and pieces, decode rows, windows starting inside a
    block, each cache format, and a padding row."""
    rng = np.random.default_rng(block + len(storage) + (window or 0))
    h, s = 64, 96 * 12
    k = (2 * rng.standard_normal((3, s, 2, h))).astype(np.float32)
    v = rng.standard_normal((3, s, 2, h)).astype(np.float32)
    t = 37
    rows = np.array([1] * t + [0, 2, 9], np.int32)
    lens = np.array(list(range(520, 520 + t)) + [s, 33, 4], np.int32)
    q = rng.standard_normal((len(rows), 6, h)).astype(np.float32)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.uint16, "int8": jnp.int8}[storage]
    kc, vc = (np.asarray(cpu_kernels.to_cache(jnp.asarray(x), dtype)) for x in (k, v))
    k32, v32 = (np.asarray(cpu_kernels.from_cache(jnp.asarray(c), h)) for c in (kc, vc))
    (kp, tables), (vp, _) = paged(kc, block, np.random.default_rng(1)), paged(vc, block, np.random.default_rng(1))
    got = np.asarray(cpu_kernels.decode_attention(*map(jnp.asarray, (q, kp, vp, rows, lens, tables)),
                                                  window=window))
    for b in range(len(rows) - 1):
        np.testing.assert_allclose(got[b], numpy_attention(q[b], k32, v32, rows[b], lens[b], window=window),
                                   rtol=1e-4, atol=1e-5)
    assert not got[-1].any()  # the padding row (table row 9 does not exist)


def test_a_table_naming_a_block_outside_the_pool_is_an_error():
    q = jnp.zeros((1, 2, 16), jnp.float32)
    pool = jnp.zeros((4, 16, 1, 16), jnp.float32)
    with pytest.raises(Exception, match="outside the pool"):
        np.asarray(cpu_kernels.decode_attention(q, pool, pool, jnp.zeros(1, jnp.int32), jnp.asarray([20], jnp.int32),
                                                jnp.asarray([[0, 9]], jnp.int32)))
