"""The GPU ragged paged-attention kernel: against an independent per-query reference, against
the XLA gather path in every call shape the engine makes, inside a whole engine (the same
tokens as the XLA path) and per device on a mesh. On a CPU it runs in Pallas interpret mode;
on a GPU (``tools/gpu_check.sh`` runs ``-m gpu``) compiled."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.backends.gpu import GpuKernels, ragged_paged_attention, supported
from model.backends.xla import Xla
from model.config import AttentionSpec, ModelConfig
from model.weights import init_params

pytestmark = pytest.mark.gpu
# Compiled where there is a GPU, else the same kernel as XLA ops.
INTERPRET = jax.default_backend() != "gpu"


def reference(q, k_pool, v_pool, rows, positions, tables, spec):
    """Each query's attention computed alone in float64 numpy from its row's table: zeros for
    padding (a row out of range, a position past the table)."""
    q, k_pool, v_pool = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k_pool, v_pool))
    m, n, _ = q.shape
    replicas, _, block, k_heads, _ = k_pool.shape
    slots, max_blocks = tables.shape
    group = n // k_heads
    out = np.zeros_like(q)
    for i, (row, p) in enumerate(zip(rows, positions)):
        if not (0 <= row < slots and 0 <= p < max_blocks * block):
            continue
        seen = np.arange(p + 1)
        if spec.window is not None:
            seen = seen[seen > p - spec.window]
        replica, blocks, offsets = row // (slots // replicas), tables[row, seen // block], seen % block
        keys, values = k_pool[replica, blocks, offsets], v_pool[replica, blocks, offsets]  # (S, K, H)
        for head in range(n):
            s = keys[:, head // group] @ q[i, head] * spec.scale
            if spec.softcap is not None:
                s = spec.softcap * np.tanh(s / spec.softcap)
            w = np.exp(s - s.max())
            out[i, head] = (w / w.sum()) @ values[:, head // group]
    return out


def pools(rng, replicas, blocks, block, k_heads, head, dtype):
    shape = (replicas, blocks + 1, block, k_heads, head)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))


def shuffled_tables(rng, slots, max_blocks, blocks):
    """Each row's blocks in a random order, from the whole pool (rows share none)."""
    order = rng.permutation(blocks)[:slots * max_blocks]
    return order.reshape(slots, max_blocks).astype(np.int32)


def flat_call(chunks, slots, pad_position, pad=3):
    """Flat rows and positions of chunks (row, start, length) in order, then padding tokens."""
    rows = [r for r, _, n in chunks for _ in range(n)] + [slots] * pad
    positions = [p for _, s, n in chunks for p in range(s, s + n)] + [pad_position] * pad
    return np.asarray(rows, np.int32), np.asarray(positions, np.int32)


# (query heads, KV heads): GQA ratios 1, 4 and 8, and 3 (a group padded to a power of two).
CASES = [
    (8, 8, None, None, jnp.float32),
    (8, 2, 24, None, jnp.float32),
    (8, 1, None, 30.0, jnp.float32),
    (12, 4, 7, 20.0, jnp.float32),
    (8, 2, None, None, jnp.bfloat16),
    (8, 1, 24, 30.0, jnp.bfloat16),
]


@pytest.mark.parametrize("heads,k_heads,window,softcap,dtype", CASES)
def test_kernel_matches_per_query_reference(heads, k_heads, window, softcap, dtype):
    """A ragged call mixing prefill chunks (one longer than a tile, one crossing block
    boundaries from a cached start) with decode rows and padding, over shuffled blocks."""
    rng = np.random.default_rng(heads * 10 + k_heads)
    block, max_blocks, slots, head = 16, 6, 8, 32
    k_pool, v_pool = pools(rng, 1, 60, block, k_heads, head, dtype)
    tables = shuffled_tables(rng, slots, max_blocks, 60)
    chunks = [(3, 0, 21), (1, 37, 1), (5, 70, 1), (0, 10, 40), (7, 95, 1), (2, 29, 5)]
    rows, positions = flat_call(chunks, slots, max_blocks * block)
    q = jnp.asarray(rng.standard_normal((len(rows), heads, head)), dtype)
    spec = AttentionSpec(scale=head ** -0.5, window=window, softcap=softcap)
    got = ragged_paged_attention(q, k_pool, v_pool, jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(tables),
                                 spec, interpret=INTERPRET, segments=len(chunks) + 1)
    want = reference(q, k_pool, v_pool, rows, positions, tables, spec)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
    assert not np.asarray(got[-3:]).any()  # padding's outputs are zeros


def test_kernel_reads_each_rows_own_data_replica():
    """Decode rows of two data replicas: a row's blocks come from its replica's pool."""
    rng = np.random.default_rng(1)
    k_pool, v_pool = pools(rng, 2, 30, 16, 2, 16, jnp.float32)
    tables = np.concatenate([shuffled_tables(rng, 4, 4, 30), shuffled_tables(rng, 4, 4, 30)])
    rows, positions = flat_call([(r, 5 * r + 3, 1) for r in range(8)], 8, 64, pad=0)
    q = jnp.asarray(rng.standard_normal((8, 4, 16)), jnp.float32)
    spec = AttentionSpec(scale=0.25)
    got = ragged_paged_attention(q, k_pool, v_pool, jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(tables),
                                 spec, interpret=INTERPRET, tile_rows=16)
    np.testing.assert_allclose(got, reference(q, k_pool, v_pool, rows, positions, tables, spec), atol=1e-5)


@pytest.mark.parametrize("shape", ["full width", "compacted decode", "one chunk", "packed prefill"])
def test_backend_attend_equals_the_xla_gather(shape):
    """``GpuKernels.attend`` against ``Xla.attend`` on the same call, in each of the engine's
    call shapes (rows None, a row per batch row, a row per token)."""
    rng = np.random.default_rng(2)
    slots, block, max_blocks, heads, k_heads, head = 4, 16, 8, 8, 2, 16
    k_pool, v_pool = pools(rng, 1, 40, block, k_heads, head, jnp.float32)
    tables = jnp.asarray(shuffled_tables(rng, slots, max_blocks, 40))
    spec, span = AttentionSpec(scale=0.25, window=40), max_blocks * block
    pad = max_blocks * block
    if shape == "full width":
        rows, positions = None, np.asarray([[17], [pad], [90], [3]], np.int32)
    elif shape == "compacted decode":
        rows, positions = np.asarray([2, 0, slots], np.int32), np.asarray([[33], [64], [pad]], np.int32)
    elif shape == "one chunk":
        rows, positions = np.asarray([1], np.int32), np.arange(20, 52, dtype=np.int32)[None]
    else:
        r, p = flat_call([(2, 0, 9), (0, 50, 1), (3, 30, 14)], slots, pad, pad=40)  # 64 tokens: XLA packs 4
        rows, positions = r[None], p[None]
    q = jnp.asarray(rng.standard_normal((*positions.shape, heads, head)), jnp.float32)
    rows = None if rows is None else jnp.asarray(rows)
    got = GpuKernels(interpret=INTERPRET).attend(q, (k_pool, v_pool), rows, jnp.asarray(positions), span, spec, tables)
    want = Xla(pack_prompts=shape == "packed prefill").attend(q, (k_pool, v_pool), rows, jnp.asarray(positions),
                                                               span, spec, tables)
    real = np.asarray(positions < pad)  # padding's outputs differ by design (zeros here)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


@pytest.mark.parametrize("shape", ["one chunk", "packed prefill"])
@pytest.mark.parametrize("window", [None, 6])
def test_attention_limits_equal_the_xla_gather(shape, window):
    """Queries inside an image (tokens that see up to their image's last position, the window
    still starting from their own) on the kernel equal the XLA gather with the same limits, an
    image crossing a tile boundary (tiles of 16 tokens here) included."""
    rng = np.random.default_rng(3)
    slots, block, max_blocks, heads, k_heads, head = 4, 16, 8, 8, 2, 16
    k_pool, v_pool = pools(rng, 1, 40, block, k_heads, head, jnp.float32)
    tables = jnp.asarray(shuffled_tables(rng, slots, max_blocks, 40))
    spec, span, pad = AttentionSpec(scale=0.25, window=window), max_blocks * block, max_blocks * block
    if shape == "one chunk":
        rows, positions = np.asarray([1], np.int32), np.arange(20, 52, dtype=np.int32)[None]
        spans = [(25, 30), (33, 42)]  # the second crosses the tile boundary at position 36
    else:
        r, p = flat_call([(2, 0, 9), (0, 50, 1), (3, 30, 14)], slots, pad, pad=40)
        rows, positions = r[None], p[None]
        spans = [(2, 7), (33, 41)]  # positions inside rows 2 and 3's chunks
    limits = positions.copy()
    for lo, hi in spans:
        inside = (positions >= lo) & (positions < hi) & (positions < pad)
        limits[inside] = hi - 1
    q = jnp.asarray(rng.standard_normal((*positions.shape, heads, head)), jnp.float32)
    args = (q, (k_pool, v_pool), jnp.asarray(rows), jnp.asarray(positions), span, spec, tables)
    got = GpuKernels(interpret=INTERPRET).attend(*args, limits=jnp.asarray(limits))
    want = Xla(pack_prompts=shape == "packed prefill").attend(*args, limits=jnp.asarray(limits))
    causal = Xla(pack_prompts=shape == "packed prefill").attend(*args)
    real = np.asarray(positions < pad)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    assert np.abs(np.asarray(got)[real] - np.asarray(causal)[real]).max() > 1e-3  # the limits mattered


def test_unused_work_items_walk_no_blocks():
    """Items past the call's tiles (length 0) and padding tiles get first position -1, so the
    kernel's block loop is empty for them; real tiles keep their first token's position."""
    from model.backends.gpu import _work_items

    # Row 0 at positions 100..104, then row 1 at 7..8, then two padding tokens (row out of range).
    rows = jnp.asarray([0, 0, 0, 0, 0, 1, 1, 4, 4], jnp.int32)
    positions = jnp.asarray([100, 101, 102, 103, 104, 7, 8, 0, 0], jnp.int32)
    starts, lengths, item_rows, first = (np.asarray(x) for x in _work_items(rows, positions, tq=4, n_items=8,
                                                                           slots=4, limit=512))
    assert starts.tolist() == [0, 4, 5, 7, 9, 9, 9, 9]
    assert lengths.tolist() == [4, 1, 2, 2, 0, 0, 0, 0]
    assert first.tolist() == [100, 104, 7, -1, -1, -1, -1, -1]
    assert item_rows[:3].tolist() == [0, 0, 1]


def test_supported_head_sizes():
    assert supported(64) and supported(128) and supported(16)
    assert not supported(96) and not supported(8)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    # A word-level tokenizer: the GPU check runs this file where the bundled model is not installed.
    from conftest import write_tiny_tokenizer
    from model.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tiny16")
    write_tiny_tokenizer(path, 512)
    tokenizer = Tokenizer.from_dir(path)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16)
    return cfg, init_params(cfg, seed=0, scale=0.5), tokenizer


def test_engine_on_the_kernel_gives_the_xla_paths_tokens(tiny16):
    """Greedy and seeded requests sent together (packed prefill calls, decode rows riding
    along, decode steps) give the same tokens with attention in the kernel as on XLA."""
    from service.engine import Engine
    from service.engine.runner import ModelRunner
    from service.params import SamplingParams

    cfg, params, tokenizer = tiny16
    rng = np.random.default_rng(3)
    prompts = [[int(x) for x in rng.integers(3, 512, n)] for n in (5, 19, 40)]
    jobs = [(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in prompts]
    jobs.append((prompts[1], SamplingParams(temperature=0.9, seed=4, max_tokens=8, ignore_eos=True)))

    def tokens(backend):
        runner = ModelRunner(cfg, params, max_batch_size=4, session_len=96, eos_ids=tokenizer.eos_ids,
                             max_prefill_chunk=32, block_size=16, backend=backend)
        engine = Engine(runner, tokenizer)

        async def one(ids, p):
            return [t async for out in engine.generate(ids, p) for t in out.token_ids]

        async def together():
            return await asyncio.gather(*[one(ids, p) for ids, p in jobs])

        engine.start()
        try:
            return asyncio.run(together())
        finally:
            engine.stop()

    assert tokens(GpuKernels(interpret=INTERPRET)) == tokens(Xla())


def test_kernel_per_device_on_a_tensor_parallel_mesh():
    """Inside shard_map over ``model`` (heads split), the same outputs as on one device."""
    from sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip(f"needs 4 devices, this machine has {len(jax.devices())}")
    rng = np.random.default_rng(4)
    k_pool, v_pool = pools(rng, 1, 30, 16, 4, 16, jnp.float32)
    tables = jnp.asarray(shuffled_tables(rng, 4, 6, 30))
    rows, positions = flat_call([(1, 0, 12), (3, 40, 1), (0, 7, 3)], 4, 96, pad=4)
    q = jnp.asarray(rng.standard_normal((1, len(rows), 8, 16)), jnp.float32)
    args = (q, (k_pool, v_pool), jnp.asarray(rows[None]), jnp.asarray(positions[None]), 96, AttentionSpec(0.25),
            tables)
    mesh = make_mesh(4, 1)
    sharded = jax.jit(lambda *a: GpuKernels(mesh=mesh, interpret=INTERPRET).attend(*a[:4], 96, a[4], a[5]),
                      static_argnums=(4,))
    got = sharded(q, (k_pool, v_pool), args[2], args[3], AttentionSpec(0.25), tables)
    want = GpuKernels(interpret=INTERPRET).attend(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("window,softcap,dtype,group,limited", [
    (None, None, jnp.bfloat16, 4, False), (64, 30.0, jnp.bfloat16, 8, False), (None, None, jnp.float32, 1, False),
    (None, None, jnp.float16, 3, False), (64, None, jnp.bfloat16, 4, True)])
def test_kernel_lowers_to_triton_for_cuda(window, softcap, dtype, group, limited):
    """Every op of the kernel has a Triton lowering: the call exported for CUDA (on any machine)
    holds the Triton custom call, with the grid the work items give (``limited``: with each
    query's attention limit, as an image's tokens have)."""
    from jax import export

    heads, k_heads, head = 2 * group, 2, 128
    spec = AttentionSpec(scale=head ** -0.5, window=window, softcap=softcap)
    f = jax.jit(lambda q, k, v, r, p, t: ragged_paged_attention(q, k, v, r, p, t, spec, segments=9,
                                                                limits=p if limited else None))
    args = (jax.ShapeDtypeStruct((64, heads, head), dtype), *[jax.ShapeDtypeStruct((1, 33, 32, k_heads, head), dtype)] * 2,
            *[jax.ShapeDtypeStruct((64,), jnp.int32)] * 2, jax.ShapeDtypeStruct((8, 4), jnp.int32))
    triton = "__gpu$xla.gpu.triton"
    # With no GPU here, the target GPU is named abstractly (newer JAX asks for one to pick the
    # Triton compute capability; older ones take it as a no-op).
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = export.export(f, platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(*args)
    text = exported.mlir_module()
    assert f"@{triton}" in text and "grid_y = 2" in text  # one program per KV head
