"""Native CPU kernels, called through XLA's FFI: decode attention (``cpu_attention.cc``) and
the matmul against packed weights (``cpu_matmul.cc``).

XLA's CPU backend runs single-token attention as a batched dot of (rows x kv heads) tiny
matrices, one library call each; at 16 rows that cost more than every matmul of the model.
The attention kernel streams each row's keys and values once and reads only the positions
the row has. XLA's dot reaches a third of the FMA peak at decode's small batches; the matmul
kernel streams weights packed once into column panels and runs near the peak from one row
to a prefill chunk.

The kernels are built on first use with the machine's C++ compiler (``-O3 -march=native``)
into the xlaserve cache and loaded from there afterwards. Where they cannot be built (no
compiler) or do not apply (not the CPU backend, float32 weights and cache, a sharded mesh),
the caller keeps the XLA path: ``available()`` says which.

``XLASERVE_CPU_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from model.checkpoint import cache_dir

log = logging.getLogger(__name__)

ATTENTION = "xlaserve_decode_attention"
MATMUL = "xlaserve_packed_matmul"
MATMUL_BF16 = "xlaserve_packed_matmul_bf16"
MATMUL_INT8 = "xlaserve_packed_matmul_int8"
SOURCES = [Path(__file__).with_name("cpu_attention.cc"), Path(__file__).with_name("cpu_matmul.cc")]

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
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
             "-fno-signed-zeros", "-std=c++17", "-shared", "-fPIC"]
    key = hashlib.sha256(b"\0".join(
        [*(src.read_bytes() for src in SOURCES), " ".join(flags).encode(),
         jax.__version__.encode(), compiler.encode()])).hexdigest()[:16]
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
                    jax.ffi.register_ffi_target(
                        ATTENTION, jax.ffi.pycapsule(lib.XlaserveDecodeAttention), platform="cpu")
                    jax.ffi.register_ffi_target(
                        MATMUL, jax.ffi.pycapsule(lib.XlaservePackedMatmul), platform="cpu")
                    jax.ffi.register_ffi_target(
                        MATMUL_BF16, jax.ffi.pycapsule(lib.XlaservePackedMatmulBf16), platform="cpu")
                    jax.ffi.register_ffi_target(
                        MATMUL_INT8, jax.ffi.pycapsule(lib.XlaservePackedMatmulInt8), platform="cpu")
                    lib.XlaservePanelWidth.restype = ctypes.c_int32
                    _state["panel"] = int(lib.XlaservePanelWidth())
                    _state["lib"] = lib  # keep the library loaded
                    _state["ok"] = True
                except (OSError, RuntimeError) as e:
                    log.warning("attention and matmuls stay on XLA's path: %s", e)
        return bool(_state["ok"])


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                     lengths: jax.Array) -> jax.Array:
    """q (B, N, H) f32; caches (R, S, K, H) f32; rows, lengths (B,) int32 -> (B, N, H).

    Row b attends cache row ``rows[b]``, positions ``0 .. lengths[b]-1``; a row index
    outside ``[0, R)`` gives zeros (padding rows)."""
    _require()
    return jax.ffi.ffi_call(ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_cache, v_cache, rows.astype(jnp.int32),
        lengths.astype(jnp.int32))


def _require() -> None:
    if not available():
        raise RuntimeError("the native CPU kernels are not available in this process")


def panel_width() -> int:
    """Columns per packed weight panel in this build (it follows the vector ISA)."""
    _require()
    return int(_state["panel"])


WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


def pack(w: jax.Array, dtype="float32") -> Any:
    """A (K, N) weight as (P, K, NR) column panels, zero-padded to P * NR >= N columns.

    ``dtype``: float32, bfloat16 (the kernel widens it to float32 as it loads it), or int8:
    weight-only quantization with one float32 scale per column (max |w| / 127), returned as
    ``{"q": panels, "scale": (P * NR,)}``. Products and sums are float32 in every case."""
    name = jnp.dtype(dtype).name
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"packed weights are one of {', '.join(WEIGHT_DTYPES)}, not {name}")
    nr = panel_width()
    k, n = w.shape
    panels = -(-n // nr)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, panels * nr - n)))
    if name == "int8":
        amax = jnp.max(jnp.abs(w), axis=0)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
        q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        return {"q": q.reshape(k, panels, nr).transpose(1, 0, 2), "scale": scale}
    return w.astype(name).reshape(k, panels, nr).transpose(1, 0, 2)


def panels(packed: Any) -> jax.Array:
    """The (P, K, NR) panel array of a packed weight."""
    return packed["q"] if isinstance(packed, dict) else packed


def unpack(packed: Any, n: int) -> jax.Array:
    """The (K, n) float32 weight back from its panels (dequantized for int8)."""
    p, k, nr = panels(packed).shape
    w = panels(packed).astype(jnp.float32).transpose(1, 0, 2).reshape(k, p * nr)
    if isinstance(packed, dict):
        w = w * packed["scale"]
    return w[:, :n]


def columns(packed: Any, ids: jax.Array) -> jax.Array:
    """Columns ``ids`` (...) of the packed weight, float32 (..., K): an embedding read from a
    packed tied head."""
    nr = panels(packed).shape[-1]
    out = panels(packed)[ids // nr, :, ids % nr].astype(jnp.float32)
    if isinstance(packed, dict):
        out = out * packed["scale"][ids][..., None]
    return out


def matmul(x: jax.Array, packed: Any, n: int) -> jax.Array:
    """x (..., K) @ W (K, n) with W given as ``pack(W)``; float32 (..., n), computed in float32
    whatever the packed dtype."""
    _require()
    lead, k = x.shape[:-1], x.shape[-1]
    p, _, nr = panels(packed).shape
    x2 = x.reshape(-1, k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x2.shape[0], p * nr), jnp.float32)
    if isinstance(packed, dict):
        y = jax.ffi.ffi_call(MATMUL_INT8, out)(x2, packed["q"], packed["scale"])
    else:
        y = jax.ffi.ffi_call(MATMUL if packed.dtype == jnp.float32 else MATMUL_BF16, out)(x2, packed)
    if p * nr != n:
        y = y[:, :n]
    return y.reshape(*lead, n)
