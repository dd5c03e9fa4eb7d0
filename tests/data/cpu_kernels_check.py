"""Run by test_cpu_kernels in a subprocess built for another instruction set (XLASERVE_CPU_MARCH):
every kernel entry point against numpy."""
import numpy as np, jax.numpy as jnp
from model.backends.cpu import kernels as cpu_kernels
assert cpu_kernels.available()
rng = np.random.default_rng(0)
m, k, n = 7, 100, 70
x = rng.standard_normal((m, k)).astype(np.float32)
w = rng.standard_normal((k, n)).astype(np.float32)
for kind in ("float32", "bfloat16", "int8"):
    p = cpu_kernels.pack(jnp.asarray(w), kind)
    got = np.asarray(cpu_kernels.matmul(jnp.asarray(x), p, n))
    np.testing.assert_allclose(got, x @ np.asarray(cpu_kernels.unpack(p, n)), rtol=1e-4, atol=1e-4)
p = cpu_kernels.pack(jnp.asarray(w), "w8a8")
got = np.asarray(cpu_kernels.matmul(jnp.asarray(x), p, n))
assert np.abs(got - x @ w).max() <= 0.03 * np.abs(x @ w).max()
q = rng.standard_normal((2, 6, 64)).astype(np.float32)
kc = rng.standard_normal((2, 300, 2, 64)).astype(np.float32)
vc = rng.standard_normal((2, 300, 2, 64)).astype(np.float32)
rows, lens = np.array([1, 0], np.int32), np.array([300, 17], np.int32)
for dtype in (jnp.float32, jnp.uint16, jnp.int8):  # the cache as each kind stores it
    ks, vs = (cpu_kernels.to_cache(jnp.asarray(c), dtype) for c in (kc, vc))
    k32, v32 = (np.asarray(cpu_kernels.from_cache(c, 64)) for c in (ks, vs))
    got = np.asarray(cpu_kernels.decode_attention(jnp.asarray(q), ks, vs, *map(jnp.asarray, (rows, lens))))
    for b in range(2):
        qq = q[b].reshape(2, 3, 64)
        sc = np.einsum("kgh,skh->kgs", qq, k32[rows[b], :lens[b]]) / 8.0
        pr = np.exp(sc - sc.max(-1, keepdims=True)); pr /= pr.sum(-1, keepdims=True)
        want = np.einsum("kgs,skh->kgh", pr, v32[rows[b], :lens[b]]).reshape(6, 64)
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)
print("panel", cpu_kernels.panel_width(), "vnni", cpu_kernels.int8_dot_native(), "ok")
