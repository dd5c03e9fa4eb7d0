"""Decode attention as a native CPU kernel (``cpu_attention.cc``), called through XLA's FFI.

XLA's CPU backend runs single-token attention as a batched dot of (rows x kv heads) tiny
matrices, one library call each; at 16 rows that cost more than every matmul of the model.
The kernel streams each row's keys and values once and reads only the positions the row
has. It is built on first use with the machine's C++ compiler (``-O3 -march=native``) into
the xlaserve cache and loaded from there afterwards. Where it cannot be built (no compiler)
or does not apply (not the CPU backend, a cache that is not float32, a sharded mesh), the
caller keeps the XLA path: ``available()`` says which.

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

import jax
import jax.numpy as jnp

from model.checkpoint import cache_dir

log = logging.getLogger(__name__)

TARGET = "xlaserve_decode_attention"
SOURCE = Path(__file__).with_name("cpu_attention.cc")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _build() -> Path:
    """Compile the kernel (once per source, compiler flags and jax version) and return the
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
        [SOURCE.read_bytes(), " ".join(flags).encode(), jax.__version__.encode(),
         compiler.encode()])).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def available() -> bool:
    """Whether decode attention runs in the native kernel in this process (built and
    registered on first call; a failure is logged once and the XLA path is used)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            if os.environ.get("XLASERVE_CPU_KERNELS", "1") == "0":
                log.info("native CPU kernels turned off (XLASERVE_CPU_KERNELS=0)")
            elif jax.default_backend() == "cpu":
                try:
                    lib = ctypes.cdll.LoadLibrary(str(_build()))
                    jax.ffi.register_ffi_target(
                        TARGET, jax.ffi.pycapsule(lib.XlaserveDecodeAttention), platform="cpu")
                    _state["lib"] = lib  # keep the library loaded
                    _state["ok"] = True
                except (OSError, RuntimeError) as e:
                    log.warning("decode attention stays on XLA's path: %s", e)
        return bool(_state["ok"])


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                     lengths: jax.Array) -> jax.Array:
    """q (B, N, H) f32; caches (R, S, K, H) f32; rows, lengths (B,) int32 -> (B, N, H).

    Row b attends cache row ``rows[b]``, positions ``0 .. lengths[b]-1``; a row index
    outside ``[0, R)`` gives zeros (padding rows)."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_cache, v_cache, rows.astype(jnp.int32),
        lengths.astype(jnp.int32))
