"""Native CPU kernels, called through XLA's FFI: attention that reads each query's own context
from the KV cache (``cpu_attention.cc``) and matmuls against weights packed into column
panels (``cpu_matmul.cc``, ``cpu_matmul_i8.cc``), with their build, their registration, the
packed weight types and the KV cache's storage format.

XLA's CPU backend runs single-token attention as a batched dot of (rows x kv heads) tiny
matrices, one library call each; at 16 rows that cost more than every matmul of the model.
The attention kernel streams each row's keys and values once and reads only the positions
the row has. XLA's dot reaches a third of the FMA peak at decode's small batches; the matmul
kernel streams weights packed once into column panels and runs near the peak from one row
to a prefill chunk.

The kernels are built on first use with the machine's C++ compiler (``-O3 -march=native``)
into the xlaserve cache and loaded from there afterwards. Where they cannot be built (no
compiler) or do not apply (not the CPU backend, float32 weights and cache, a sharded mesh),
the XLA backend runs the model instead: ``available()`` says which.

``XLASERVE_CPU_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoint import cache_dir, host_id

log = logging.getLogger(__name__)

ATTENTION = "xlaserve_decode_attention"
ATTENTION_BF16 = "xlaserve_decode_attention_bf16"
ATTENTION_INT8 = "xlaserve_decode_attention_int8"
MATMUL = "xlaserve_packed_matmul"
MATMUL_BF16 = "xlaserve_packed_matmul_bf16"
MATMUL_INT8 = "xlaserve_packed_matmul_int8"
MATMUL_W8A8 = "xlaserve_matmul_w8a8"
SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_attention.cc", "cpu_matmul.cc", "cpu_matmul_i8.cc")]
HEADER = Path(__file__).with_name("cpu_common.h")
# FFI target -> the handler's symbol in the library.
_SYMBOLS = {ATTENTION: "XlaserveDecodeAttention", ATTENTION_BF16: "XlaserveDecodeAttentionBf16",
            ATTENTION_INT8: "XlaserveDecodeAttentionInt8",
            MATMUL: "XlaservePackedMatmul", MATMUL_BF16: "XlaservePackedMatmulBf16",
            MATMUL_INT8: "XlaservePackedMatmulInt8", MATMUL_W8A8: "XlaserveMatmulW8A8"}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _build() -> Path:
    """Compile the kernels (once per source, compiler flags and jax version) and return the
    shared library's path. Raises RuntimeError with the compiler's message on failure."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    # Reassociation lets the dot products vectorize. Not -ffast-math: a library linked with it
    # turns on flush-to-zero for the whole process when it is loaded.
    # XLASERVE_CPU_MARCH builds for another target than this CPU (the tests build the AVX2
    # and pre-AVX paths this way).
    march = os.environ.get("XLASERVE_CPU_MARCH", "native")
    flags = ["-O3", f"-march={march}", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
             "-fno-signed-zeros", "-std=c++17", "-shared", "-fPIC"]
    key = hashlib.sha256(b"\0".join(
        [*(src.read_bytes() for src in (*SOURCES, HEADER)), " ".join(flags).encode(),
         jax.__version__.encode(), compiler.encode(), host_id().encode()])).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *flags, f"-I{include}", *map(str, SOURCES), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling the CPU kernels failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def available() -> bool:
    """Whether the native kernels run in this process (built and registered on first call;
    a failure is logged once and the XLA path is used)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            if os.environ.get("XLASERVE_CPU_KERNELS", "1") == "0":
                log.info("native CPU kernels turned off (XLASERVE_CPU_KERNELS=0)")
            elif jax.default_backend() == "cpu":
                try:
                    lib = ctypes.cdll.LoadLibrary(str(_build()))
                    for target, symbol in _SYMBOLS.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                    platform="cpu")
                    lib.XlaserveInt8DotNative.restype = ctypes.c_int32
                    _state["int8_dot"] = bool(lib.XlaserveInt8DotNative())
                    lib.XlaservePanelWidth.restype = ctypes.c_int32
                    _state["panel"] = int(lib.XlaservePanelWidth())
                    _state["lib"] = lib  # keep the library loaded
                    _state["ok"] = True
                except (OSError, RuntimeError) as e:
                    log.warning("attention and matmuls stay on XLA's path: %s", e)
        return bool(_state["ok"])


def use_huge_pages(tree) -> None:
    """Back every array of ``tree`` (the packed weights, the KV cache: what each step streams
    whole) with 2 MiB pages now, rather than on the first step that reads it."""
    if not available():
        return
    lib = _state["lib"]
    lib.XlaserveUseHugePages.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and x.nbytes >= 2 << 20:
            lib.XlaserveUseHugePages(x.unsafe_buffer_pointer(), x.nbytes)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                     lengths: jax.Array, tables: jax.Array | None = None, scale: float | None = None,
                     softcap: float | None = None, window: int | None = None,
                     starts: jax.Array | None = None) -> jax.Array:
    """q (B, N, H) f32; block pools (NB, BS, K, H) f32, or uint16 holding bfloat16 bits, or
    (NB, BS, K, H + 4) int8 with a scale per head (see ``to_cache``); rows, lengths (B,) int32;
    tables (R, MB) int32 -> (B, N, H) f32.

    Row b attends the sequence of table row ``rows[b]``, positions ``starts[b] .. lengths[b]-1``
    (``starts`` default: 0, or the last ``window`` positions when a window is given): position
    p is at offset p % BS of block ``tables[rows[b], p // BS]``. A row index outside ``[0, R)``
    gives zeros (padding rows). BS is a multiple of 16 (or the whole of each sequence:
    ``tables`` None reads the pool as one block per row, ``rows`` indexing blocks). Scores are
    ``q.k * scale`` (default 1/sqrt(H)), soft-capped as ``softcap * tanh(score / softcap)``
    when ``softcap`` is given."""
    _require()
    targets = {jnp.dtype(jnp.float32): ATTENTION, jnp.dtype(jnp.uint16): ATTENTION_BF16,
               jnp.dtype(jnp.int8): ATTENTION_INT8}
    if k_cache.dtype not in targets or v_cache.dtype != k_cache.dtype:
        raise ValueError("the attention kernel reads float32 caches, bfloat16 bits in uint16 ones or "
                         f"int8 ones, not {k_cache.dtype}")
    if k_cache.shape[-1] != cache_head_size(q.shape[-1], k_cache.dtype):
        raise ValueError(f"a {k_cache.dtype} cache of head size {q.shape[-1]} stores "
                         f"{cache_head_size(q.shape[-1], k_cache.dtype)} entries per head, not {k_cache.shape[-1]}")
    target = targets[jnp.dtype(k_cache.dtype)]
    if tables is None:
        tables = jnp.arange(k_cache.shape[0], dtype=jnp.int32)[:, None]
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    if starts is None:
        starts = jnp.maximum(lengths - window, 0) if window else jnp.zeros_like(lengths)
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(rows).astype(jnp.int32), lengths,
        jnp.asarray(starts).astype(jnp.int32), tables.astype(jnp.int32),
        scale=np.float32(q.shape[-1] ** -0.5 if scale is None else scale), softcap=np.float32(softcap or 0.0))


INT8_SCALE_BYTES = 4


def cache_head_size(head_dim: int, cache_dtype) -> int:
    """Entries one position's head takes in a cache of ``cache_dtype``: an int8 cache stores
    the float32 bytes of the head's scale after its values."""
    return head_dim + (INT8_SCALE_BYTES if jnp.dtype(cache_dtype) == jnp.int8 else 0)


def to_cache(x: jax.Array, cache_dtype) -> jax.Array:
    """Values (..., H) as a cache of ``cache_dtype`` stores them. A bfloat16 cache on the
    kernels is kept as uint16 bits: XLA's CPU backend widens a bfloat16 scatter's whole operand
    to float32 and back, a copy of the cache per layer and step; an integer scatter is in place.
    An int8 cache holds each head's values rounded to int8 against its largest magnitude
    (scale = max |x| / 127), then the scale's 4 bytes: (..., H + 4)."""
    if jnp.dtype(cache_dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    if jnp.dtype(cache_dtype) == jnp.int8:
        x = x.astype(jnp.float32)
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return jnp.concatenate([q, jax.lax.bitcast_convert_type(scale, jnp.int8)[..., 0, :]], axis=-1)
    return x.astype(cache_dtype)


def from_cache(stored: jax.Array, head_dim: int) -> jax.Array:
    """The float32 values a cache entry holds (``to_cache``'s inverse, up to its rounding)."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(stored, jnp.bfloat16).astype(jnp.float32)
    if stored.dtype == jnp.int8:
        scale = jax.lax.bitcast_convert_type(stored[..., head_dim:], jnp.float32)
        return stored[..., :head_dim].astype(jnp.float32) * scale[..., None]
    return stored.astype(jnp.float32)


def _require() -> None:
    if not available():
        raise RuntimeError("the native CPU kernels are not available in this process")


def panel_width() -> int:
    """Columns per packed weight panel in this build (it follows the vector ISA)."""
    _require()
    return int(_state["panel"])


WEIGHT_DTYPES = ("float32", "bfloat16", "int8", "w8a8")
W8A8_COLS, W8A8_BLOCK = 64, 64  # panel width and activation block of cpu_matmul_i8.cc


def int8_dot_native() -> bool:
    """Whether w8a8 matmuls run on AVX512-VNNI here (else a correct but slow scalar loop)."""
    _require()
    return bool(_state["int8_dot"])


def _quantize_columns(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-column symmetric int8: (q, scale) with w ~= q * scale."""
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def _live(x2: jax.Array, live: jax.Array | None) -> jax.Array:
    if live is None:
        return jnp.full((1,), x2.shape[0], jnp.int32)
    return jnp.reshape(live, (1,)).astype(jnp.int32)


def _call(x: jax.Array, n: int, width: int, target: str, *operands, live=None) -> jax.Array:
    """x (..., K) through the FFI matmul ``target``: float32 (..., n)."""
    _require()
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x2.shape[0], width), jnp.float32)
    y = jax.ffi.ffi_call(target, out)(x2, *operands, _live(x2, live))
    if width != n:
        y = y[:, :n]
    return y.reshape(*lead, n)


class _Packed:
    """What every packed weight does: multiply (``apply``), split one product into parts
    (``apply_split``), and read columns back as rows (``lookup``: an embedding from a tied
    head). ``live`` (int32 scalar): only the first ``live`` rows of x (flattened over its
    leading dims) are multiplied, the output's others are zeros; padding placed last costs
    nothing."""

    n: int  # the weight's columns (the padding to whole panels excluded)

    def apply_split(self, x: jax.Array, sizes: tuple[int, ...], live=None) -> tuple[jax.Array, ...]:
        y = self.apply(x, live)
        out, at = [], 0
        for size in sizes:
            out.append(y[..., at:at + size])
            at += size
        return tuple(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Panels(_Packed):
    """A (K, n) float32 or bfloat16 weight as column panels (P, K, NR), zero-padded to whole
    panels; the kernel widens bfloat16 to float32 as it loads it."""

    panels: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))

    def apply(self, x, live=None):
        p, _, nr = self.panels.shape
        target = MATMUL if self.panels.dtype == jnp.float32 else MATMUL_BF16
        return _call(x, self.n, p * nr, target, self.panels, live=live)

    def lookup(self, ids):
        nr = self.panels.shape[-1]
        return self.panels[ids // nr, :, ids % nr].astype(jnp.float32)

    def unpack(self):
        p, k, nr = self.panels.shape
        return self.panels.astype(jnp.float32).transpose(1, 0, 2).reshape(k, p * nr)[:, :self.n]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Panels(_Packed):
    """Weight-only int8: panels (P, K, NR) of int8 and one float32 scale per column; the
    products are float32."""

    q: jax.Array
    scale: jax.Array  # (P * NR,)
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def panels(self):
        return self.q

    def apply(self, x, live=None):
        p, _, nr = self.q.shape
        return _call(x, self.n, p * nr, MATMUL_INT8, self.q, self.scale, live=live)

    def lookup(self, ids):
        nr = self.q.shape[-1]
        return self.q[ids // nr, :, ids % nr].astype(jnp.float32) * self.scale[ids][..., None]

    def unpack(self):
        p, k, nr = self.q.shape
        w = self.q.astype(jnp.float32).transpose(1, 0, 2).reshape(k, p * nr)
        return (w * self.scale)[:, :self.n]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W8A8Panels(_Packed):
    """int8 weights laid out for int8 dot products with activations quantized per row and
    block of 64 on entry: q8 (P, Kp/4, 64, 4), a scale and the 128-offset column sums per
    block (see cpu_matmul_i8.cc)."""

    q8: jax.Array
    scale: jax.Array
    colsum: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))

    def apply(self, x, live=None):
        return _call(x, self.n, self.scale.shape[0], MATMUL_W8A8, self.q8, self.scale, self.colsum,
                     live=live)

    def lookup(self, ids):
        cols = self.q8[ids // W8A8_COLS, :, ids % W8A8_COLS, :]  # (..., Kp/4, 4)
        out = cols.reshape(*ids.shape, -1)[..., :self.k].astype(jnp.float32)
        return out * self.scale[ids][..., None]

    def unpack(self):
        p, g, cols, _ = self.q8.shape
        w = self.q8.astype(jnp.float32).transpose(1, 3, 0, 2).reshape(g * 4, p * cols)
        return (w * self.scale)[:self.k, :self.n]


PackedWeight = Panels | Int8Panels | W8A8Panels


def pack(w: jax.Array, dtype="float32") -> PackedWeight:
    """A (K, N) weight in the layout a matmul kernel streams, zero-padded to whole panels.

    ``dtype``: float32 or bfloat16 panels; int8: weight-only quantization with one float32
    scale per column, float32 products; w8a8: the same weight quantization laid out for int8
    dot products."""
    name = dtype if dtype == "w8a8" else jnp.dtype(dtype).name
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"packed weights are one of {', '.join(WEIGHT_DTYPES)}, not {name}")
    k, n = w.shape
    w = w.astype(jnp.float32)
    if name == "w8a8":
        kp = -(-k // W8A8_BLOCK) * W8A8_BLOCK
        p = -(-n // W8A8_COLS)
        w = jnp.pad(w, ((0, kp - k), (0, p * W8A8_COLS - n)))
        q, scale = _quantize_columns(w)
        colsum = 128 * q.astype(jnp.int32).reshape(kp // W8A8_BLOCK, W8A8_BLOCK, -1).sum(axis=1)
        q4 = q.reshape(kp // 4, 4, p, W8A8_COLS).transpose(2, 0, 3, 1)
        return W8A8Panels(q4, scale, colsum, n=n, k=k)
    nr = panel_width()
    panels = -(-n // nr)
    w = jnp.pad(w, ((0, 0), (0, panels * nr - n)))
    if name == "int8":
        q, scale = _quantize_columns(w)
        return Int8Panels(q.reshape(k, panels, nr).transpose(1, 0, 2), scale, n=n)
    return Panels(w.astype(name).reshape(k, panels, nr).transpose(1, 0, 2), n=n)


def panels(packed: Panels | Int8Panels) -> jax.Array:
    """The (P, K, NR) panel array of a float32, bfloat16 or int8 packed weight."""
    return packed.panels


def unpack(packed: PackedWeight, n: int | None = None, k: int | None = None) -> jax.Array:
    """The (K, n) float32 weight back from its panels (dequantized when quantized)."""
    w = packed.unpack()
    return w[:k, :n]


def columns(packed: PackedWeight, ids: jax.Array, k: int | None = None) -> jax.Array:
    """Columns ``ids`` (...) of the packed (K, N) weight, float32 (..., K)."""
    return packed.lookup(ids)


def matmul(x: jax.Array, packed: PackedWeight, n: int | None = None, live: jax.Array | None = None) -> jax.Array:
    """x (..., K) @ W (K, n) with W given as ``pack(W)``; float32 (..., n), computed in float32
    whatever the packed dtype (w8a8: int8 products, int32 sums)."""
    if n is not None and n != packed.n:
        raise ValueError(f"the packed weight has {packed.n} columns, not {n}")
    return packed.apply(x, live)
